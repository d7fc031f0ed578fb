"""Stories -> tokens -> residual vectors, chunk by chunk: the harvesting side of the streaming pipeline.

Each chunk of stories (`training.story_stream`) is one forward pass: one story per row, truncated to the
context size, right-padded to the chunk's longest story and masked; the pass stops after the hooked
block; the unpadded tokens' residuals, in row order, are one ActivationChunk. The cache writer stores
exactly these chunks, so a run from the cache sees the vectors a streaming run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.base_model import BaseModel, residual_at
from training.activations import tokenize_stories
from training.shuffle_buffer import ActivationChunk
from training.story_stream import StoryChunk, StoryChunkStream


def harvest_chunk(bm: BaseModel, stories: list[str], layer: int, context_size: int) -> Tensor:
    """Float[Tensor, "n_tokens d_model"] (fp32, on the model's device): every token of `stories`, in order."""
    tokens = tokenize_stories(bm.tokenizer, stories, context_size, pack=False, prepend_bos=bm.prepend_bos)
    width = max(int(tokens.attention_mask.sum(1).max()), 1)
    ids, mask = tokens.input_ids[:, :width], tokens.attention_mask[:, :width]
    acts = residual_at(bm, ids, mask, layer)
    return acts[mask.to(acts.device).bool()].float()


class StoryActivations:
    """ActivationChunks harvested from a StoryChunkStream (a ChunkSource of training.shuffle_buffer)."""

    def __init__(self, bm: BaseModel, stories: StoryChunkStream, layer: int, context_size: int,
                 progress: bool = False):
        """`progress`: a tqdm bar of harvested tokens (the first buffer fill can take minutes on a CPU)."""
        self.bm, self.stories, self.layer, self.context_size = bm, stories, layer, context_size
        self.progress = progress

    def __iter__(self) -> Iterator[ActivationChunk]:
        with tqdm(desc="harvest", unit="tok", unit_scale=True, disable=not self.progress, position=1,
                  leave=False) as bar:
            for chunk in self.stories:
                vectors = harvest_chunk(self.bm, chunk.stories, self.layer, self.context_size)
                bar.update(len(vectors))
                yield ActivationChunk(chunk.epoch, vectors)

    def harvested_chunks(self) -> Iterator[tuple[StoryChunk, Tensor]]:
        """One epoch of (story chunk, its vectors): what the activation cache stores."""
        epoch = self.stories.position.epoch
        for chunk in self.stories:
            if chunk.epoch != epoch:
                return
            yield chunk, harvest_chunk(self.bm, chunk.stories, self.layer, self.context_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stories", **self.stories.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stories":
            raise ValueError(f"the checkpoint was trained from {state.get('kind')!r} data, not a story stream")
        self.stories.load_state_dict({k: v for k, v in state.items() if k != "kind"})


def model_dtype(name: str) -> torch.dtype:
    """`fp32` / `bf16` / `fp16` -> the torch dtype of the language model's forward pass."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown --model-dtype {name!r}: choose from {sorted(table)}")
    return table[name]
