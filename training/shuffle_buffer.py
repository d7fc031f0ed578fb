"""A fixed-capacity shuffling buffer of activation vectors, refilled from a stream when half drained.

The SAELens / dictionary_learning design: the buffer holds up to `capacity` vectors (on the training
device) from many stories; when at most half remain it is topped up from the source and its contents
are shuffled; batches are then served from the shuffled order, each vector exactly once. A vector
never waits for one of a later epoch: the buffer drains an epoch completely before taking the next one
(a batch may straddle two epochs), so within each epoch every vector of the stream is served once.

Resume: `state_dict()` (JSON-able: counters, the source's position) and `state_tensors()` (the held
vectors in serving order, the rest of the last chunk, the RNG state) restore the exact same batches,
without re-reading the stream before the source's position.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor


class ActivationChunk(NamedTuple):
    epoch: int
    vectors: Tensor
    """Float[Tensor, "n d_model"]: consecutive activation vectors of the stream."""


class ChunkSource(Protocol):
    """Endless activation chunks with a resumable position (a harvesting stream or a cache reader)."""

    def __iter__(self) -> Iterator[ActivationChunk]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataStats(NamedTuple):
    """Statistics of the first buffer fill (over all ranks): the trainer's scale, b_dec init and variance."""

    count: int
    mean: Tensor
    """Float[Tensor, "d_model"] (fp32, CPU)."""
    mean_sq_norm: float
    """E ||x||^2."""

    @property
    def variance(self) -> float:
        """E ||x - mean||^2."""
        return max(self.mean_sq_norm - float(self.mean.double().pow(2).sum()), 0.0)

    @property
    def scale(self) -> float:
        """sqrt(d / E||x||^2): the constant that makes E||x||^2 = d."""
        return float((len(self.mean) / max(self.mean_sq_norm, 1e-12)) ** 0.5)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "mean_sq_norm": self.mean_sq_norm}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataStats:
        return cls(int(data["count"]), torch.tensor(data["mean"], dtype=torch.float32), float(data["mean_sq_norm"]))


class ShufflingBuffer:
    """Batches [batch_size, d] from a ChunkSource through a shuffling buffer; see the module docstring."""

    def __init__(self, source: ChunkSource, capacity: int, batch_size: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if batch_size < 1 or capacity < 2 * batch_size:
            raise ValueError(f"the buffer must hold at least two batches: --buffer-size {capacity} < 2 x "
                             f"--batch-size {batch_size}")
        self.source, self.capacity, self.batch_size, self.device = source, capacity, batch_size, torch.device(device)
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        self.store: Tensor | None = None
        """Float[Tensor, "capacity d"]; slots named by `order`."""
        self.order = torch.arange(capacity)
        """order[:held] are the held vectors' slots in serving order (served from the end)."""
        self.held = 0
        self.epoch = 0
        """Epoch of the held vectors."""
        self.pending: ActivationChunk | None = None
        """The part of the last chunk taken from the source that did not fit."""
        self.served = 0
        self._chunks: Iterator[ActivationChunk] | None = None

    # -- filling ---------------------------------------------------------------------------------
    def _next_chunk(self) -> ActivationChunk:
        if self.pending is not None:
            chunk, self.pending = self.pending, None
            return chunk
        if self._chunks is None:
            self._chunks = iter(self.source)
        chunk = next(self._chunks)
        return ActivationChunk(chunk.epoch, chunk.vectors.to(self.device, torch.float32))

    def _refill(self) -> None:
        """Top up with vectors of the held epoch (of the next one when empty), then reshuffle."""
        added = 0
        while self.held + added < self.capacity:
            chunk = self._next_chunk()
            if self.store is None:
                self.store = torch.empty(self.capacity, chunk.vectors.shape[1], device=self.device)
            if self.held + added == 0:
                self.epoch = chunk.epoch
            if chunk.epoch != self.epoch:  # drain this epoch first
                self.pending = chunk
                break
            take = min(len(chunk.vectors), self.capacity - self.held - added)
            slots = self.order[self.held + added: self.held + added + take]
            self.store[slots.to(self.device)] = chunk.vectors[:take]
            added += take
            if take < len(chunk.vectors):
                self.pending = ActivationChunk(chunk.epoch, chunk.vectors[take:])
        self.held += added
        perm = torch.randperm(self.held, generator=self.gen)
        self.order[: self.held] = self.order[: self.held][perm]

    def prime(self) -> None:
        """Fill the buffer (before the first batch: the data statistics come from this fill)."""
        if self.held <= self.capacity // 2:
            self._refill()

    def held_vectors(self) -> Tensor:
        """Float[Tensor, "held d"]: the held vectors in serving order (last served first)."""
        assert self.store is not None
        return self.store[self.order[: self.held].to(self.device)]

    # -- serving ---------------------------------------------------------------------------------
    def next_batch(self) -> Tensor:
        """Float[Tensor, "batch_size d"] (fp32, on the buffer's device)."""
        parts, need = [], self.batch_size
        while need:
            if self.held <= self.capacity // 2:
                self._refill()
            take = min(need, self.held)
            assert take > 0 and self.store is not None
            slots = self.order[self.held - take: self.held]
            parts.append(self.store[slots.to(self.device)])
            self.held -= take
            need -= take
        self.served += self.batch_size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next_batch()

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"kind": "shuffling", "capacity": self.capacity, "batch_size": self.batch_size, "seed": self.seed,
                "held": self.held, "epoch": self.epoch, "served": self.served,
                "pending_epoch": None if self.pending is None else self.pending.epoch,
                "source": self.source.state_dict()}

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"rng": self.gen.get_state()}
        if self.store is not None:
            out["held"] = self.held_vectors().cpu().contiguous()
        if self.pending is not None:
            out["pending"] = self.pending.vectors.cpu().contiguous()
        return out

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        mine = (self.capacity, self.batch_size, self.seed)
        saved = (state["capacity"], state["batch_size"], state["seed"])
        if saved != mine:
            raise ValueError(f"buffer state (capacity, batch, seed) {saved} does not match this run's {mine}: "
                             f"resume with the same --buffer-size, --batch-size, "
                             f"--seed and number of processes")
        self.source.load_state_dict(state["source"])
        self._chunks = None
        self.gen.set_state(tensors["rng"])
        self.held, self.epoch, self.served = int(state["held"]), int(state["epoch"]), int(state["served"])
        self.order = torch.arange(self.capacity)
        if "held" in tensors:
            held = tensors["held"].to(self.device, torch.float32)
            self.store = torch.empty(self.capacity, held.shape[1], device=self.device)
            self.store[: self.held] = held
        self.pending = None
        if state["pending_epoch"] is not None:
            self.pending = ActivationChunk(int(state["pending_epoch"]), tensors["pending"].to(self.device))


def first_fill_stats(buffer: ShufflingBuffer, all_reduce=None, block: int = 1 << 15) -> DataStats:
    """DataStats of the primed buffer; `all_reduce(Tensor) -> Tensor` (a sum over ranks) when distributed.

    Sums run over blocks of rows in float64, so no copy of the whole buffer is made."""
    buffer.prime()
    assert buffer.store is not None
    store, d = buffer.store, buffer.store.shape[1]
    packed = torch.zeros(d + 2, dtype=torch.float64, device=store.device)
    for start in range(0, buffer.held, block):
        slots = buffer.order[start: min(start + block, buffer.held)].to(store.device)
        x = store[slots].double()
        packed[1:-1] += x.sum(0)
        packed[-1] += x.pow(2).sum()
    packed[0] = buffer.held
    if all_reduce is not None:
        packed = all_reduce(packed)
    packed = packed.cpu()
    count = int(packed[0])
    return DataStats(count, (packed[1:-1] / count).float(), float(packed[-1] / count))
