"""Training data of the base model: stories per source, their split, packed training and validation blocks."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from training.base_lm.config import BaseLMConfig, BaseLMError
from training.stories import StorySplit, default_base_lm_sources, load_stories, split_stories


def resolve_data(cfg: BaseLMConfig) -> list[str]:
    return [str(d) for d in cfg.data] if cfg.data else [str(p) for p in default_base_lm_sources()]


def load_split(sources: list[str], cfg: BaseLMConfig) -> dict[str, StorySplit]:
    """Each source's train / held-out split (every val_every-th story of each source is held out)."""
    splits = {}
    for source in sources:
        try:
            stories = load_stories(source, max_stories=cfg.max_stories)
            splits[source] = split_stories(stories, cfg.val_every)
        except (OSError, RuntimeError, ValueError) as err:
            raise BaseLMError(str(err)) from err
        if not splits[source].val:
            raise BaseLMError(f"{source}: need at least {cfg.val_every} stories to hold out validation ones")
    return splits


def describe_source(source: str) -> str:
    """The data source as recorded in the outputs: local files relative to the working directory."""
    if Path(source).exists():
        try:
            return os.path.relpath(source)
        except ValueError:
            return Path(source).name
    return source



class PackedData:
    """An endless stream of packed training blocks: epoch e packs the stories in an order fixed by (seed, e).

    The total token count is the same every epoch, so every epoch has `blocks_per_epoch` blocks and the
    data position is a function of the step alone: step s reads global blocks s*B ... s*B+B-1.
    """

    def __init__(self, encoded: list[list[int]], context: int, seed: int):
        self.encoded = encoded
        self.context = context
        self.seed = seed
        self.tokens_per_epoch = sum(len(ids) for ids in encoded)
        self.blocks_per_epoch = self.tokens_per_epoch // context
        if self.blocks_per_epoch < 1:
            raise BaseLMError(
                f"the training stories hold {self.tokens_per_epoch} tokens, fewer than one block of "
                f"context={context}: use more stories or a smaller --context"
            )
        self._epoch = -1
        self._blocks: torch.Tensor | None = None

    def epoch_blocks(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.encoded), generator=gen).tolist()
            stream = [t for i in order for t in self.encoded[i]]
            n = self.blocks_per_epoch * self.context
            self._blocks = torch.tensor(stream[:n], dtype=torch.long).view(-1, self.context)
            self._epoch = epoch
        assert self._blocks is not None
        return self._blocks

    def position(self, step: int, batch_size: int) -> tuple[int, int]:
        """(epoch, block index within the epoch) of the first block read at `step`."""
        g = step * batch_size
        return g // self.blocks_per_epoch, g % self.blocks_per_epoch

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rows = []
        for g in range(step * batch_size, (step + 1) * batch_size):
            epoch, j = divmod(g, self.blocks_per_epoch)
            rows.append(self.epoch_blocks(epoch)[j])
        return torch.stack(rows)


def val_blocks(encoded: list[list[int]], context: int) -> list[torch.Tensor]:
    """The validation stories in order, packed into blocks of `context` tokens (the last one shorter)."""
    stream = [t for ids in encoded for t in ids]
    return [torch.tensor(stream[i : i + context], dtype=torch.long) for i in range(0, len(stream), context)]

