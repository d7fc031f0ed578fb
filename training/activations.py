"""Stories -> tokens -> residual-stream vectors -> shuffled batches for SAE training.

Stories come from `training.stories` (load_stories / split_stories); only pass the train split here
when building training data. Shapes in docstrings follow jaxtyping, e.g. Float[Tensor, "n d_model"].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.base_model import BaseModel, residual_at


class TokenBatch(NamedTuple):
    input_ids: Tensor  # Int[Tensor, "n ctx"]
    attention_mask: Tensor  # Int[Tensor, "n ctx"], 0 at padding


def tokenize_stories(
    tokenizer, stories: list[str], context_size: int, pack: bool = True, prepend_bos: bool = False
) -> TokenBatch:
    """Pack (stories joined by EOS, cut into full windows; the ragged tail is dropped) or pad (one story
    per row, truncated to `context_size`, right-padded and masked). `prepend_bos` starts every row with BOS.
    """
    if context_size < 2:
        raise ValueError("context_size must be >= 2")
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos] if prepend_bos else []
    encoded = tokenizer(list(stories), add_special_tokens=False).input_ids
    width = context_size - len(bos)
    if pack:
        stream = [t for ids in encoded for t in (*ids, eos)]
        n = len(stream) // width
        if n == 0:
            raise ValueError(f"{len(stream)} tokens do not fill one window of {width}: pass more stories")
        ids = torch.tensor(stream[: n * width], dtype=torch.long).view(n, width)
        ids = torch.cat([torch.tensor(bos, dtype=torch.long).expand(n, len(bos)), ids], dim=1)
        return TokenBatch(ids, torch.ones_like(ids))
    rows = [bos + e[:width] for e in encoded if e]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(rows), context_size), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return TokenBatch(ids, mask)


def harvest_activations(
    bm: BaseModel, tokens: TokenBatch, layer: int | str, batch_size: int = 8, progress: bool = True
) -> Tensor:
    """Float[Tensor, "n_tokens d_model"] (fp32, CPU): the residual at `layer` for every unpadded token,
    row by row in order. Each forward pass stops after the hooked block."""
    out = []
    for start in tqdm(range(0, len(tokens.input_ids), batch_size), desc="harvest", unit="batch", disable=not progress):
        ids = tokens.input_ids[start : start + batch_size]
        mask = tokens.attention_mask[start : start + batch_size]
        acts = residual_at(bm, ids, mask, layer)
        out.append(acts[mask.to(acts.device).bool()].float().cpu())
    if not out:
        return torch.zeros(0, bm.d_model)
    return torch.cat(out)


class ActivationBuffer:
    """Endless shuffled batches of activation vectors [batch_size, d_model].

    Each epoch is a fresh permutation (seeded by (seed, epoch)) that visits every vector exactly once;
    a batch may straddle two epochs, so every batch is full. `state_dict()` is plain ints (JSON-able)
    and `load_state_dict` resumes the exact same order.
    """

    def __init__(self, acts: Tensor, batch_size: int, seed: int = 0, device: str | torch.device = "cpu"):
        if len(acts) == 0:
            raise ValueError("no activations to buffer")
        self.acts, self.batch_size, self.seed, self.device = acts, batch_size, seed, device
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.acts), generator=g)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.acts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n", len(self.acts)) != len(self.acts) or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"buffer state {state} does not match this buffer ({len(self.acts)} vectors, seed {self.seed})"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)

    @property
    def vectors_seen(self) -> int:
        return self.epoch * len(self.acts) + self.position

    def next_batch(self) -> Tensor:
        """Float[Tensor, "batch_size d_model"]."""
        parts, need = [], self.batch_size
        while need:
            take = self._perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(self.acts):
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return self.acts[torch.cat(parts)].to(self.device)

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next_batch()


def harvest_stories(
    bm: BaseModel,
    stories: list[str],
    layer: int | str,
    context_size: int,
    pack: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> Tensor:
    """tokenize_stories + harvest_activations with the model's BOS convention."""
    tokens = tokenize_stories(bm.tokenizer, stories, context_size, pack, bm.prepend_bos)
    return harvest_activations(bm, tokens, layer, batch_size, progress)
