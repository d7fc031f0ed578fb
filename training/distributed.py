"""Data-parallel training through torch.distributed: the process group, devices, and the per-step reduction.

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) the same command
trains on every rank: each rank harvests its own share of the stories into its own buffer; after each
SAE's backward pass `StepReducer` all-reduces, in ONE collective per SAE and step, its gradients, its
losses and its per-latent firing counts, so every rank applies the same update and keeps the same
dead-latent counters (hence the same AuxK and resampling decisions): all ranks hold identical weights.
Rank 0 alone writes. gloo on the CPU, NCCL on CUDA. Every collective has a timeout, and a failed one
(a rank died, or stopped answering) raises RankFailure, so a run never hangs on a lost peer.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 300.0
"""Collectives wait at most this long for the other ranks (harvesting a buffer fill must fit in it)."""


class RankFailure(RuntimeError):
    """A collective with the other ranks failed or timed out: one of them died or hangs."""


@dataclass
class DistContext:
    """This process's place in the run; world_size 1 (no process group) when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as err:  # gloo/NCCL report a lost peer or a timeout as RuntimeError subclasses
            raise RankFailure(
                f"rank {self.rank} of {self.world_size}: {what} with the other ranks failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Another process "
                f"has probably died or stalled (see its output); restart the same command with --resume to "
                f"continue from the last checkpoint"
            ) from err

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of `t` over ranks (in place; returned)."""
        if self.enabled:
            self._guard("an all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        return t

    def barrier(self) -> None:
        if self.enabled:
            self._guard("a barrier", lambda: dist.barrier())

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite `tensors` on every rank with rank 0's."""
        if self.enabled:
            for t in tensors:
                self._guard("a broadcast", lambda t=t: dist.broadcast(t, src=0))

    def gather_objects(self, obj: object) -> list[object] | None:
        """Every rank's `obj` on rank 0 (None elsewhere): small, pickled by torch.distributed in memory."""
        if not self.enabled:
            return [obj]
        out: list[object] | None = [None] * self.world_size if self.is_main else None
        self._guard("a gather", lambda: dist.gather_object(obj, out, dst=0))
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """The process group of a torchrun launch (gloo, or NCCL for CUDA devices); a 1-rank context otherwise."""
    world = launched_world_size()
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world, local_rank, backend)


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` (this rank's GPU under torchrun), `cuda:N`, `mps`."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is visible to torch (torch {torch.__version__}); use "
                             f"--device cpu")
        device = torch.device(spec if ":" in spec else f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        return device
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps: this torch build or machine has no Metal (MPS) backend; use --device cpu")
        return torch.device("mps")
    if spec != "cpu":
        raise ValueError(f"unknown --device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device("cpu")


class StepReducer:
    """One all-reduce per SAE and step: gradients and losses averaged, firing counts summed over ranks."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def reduce(self, params: Sequence[torch.nn.Parameter], scalars: Sequence[Tensor], fire_counts: Tensor
               ) -> tuple[list[Tensor], Tensor]:
        """Averages every `params[i].grad` in place; returns the averaged `scalars` and the summed counts."""
        if not self.ctx.enabled:
            return list(scalars), fire_counts
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([*(g.reshape(-1).float() for g in grads),
                          torch.stack([s.detach().float().reshape(()) for s in scalars]),
                          fire_counts.float()])
        self.ctx.all_reduce_sum(flat)
        world, offset = self.ctx.world_size, 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g).div_(world))
            offset += g.numel()
        sums = flat[offset: offset + len(scalars)] / world
        counts = flat[offset + len(scalars):].round().to(fire_counts.dtype)
        return [sums[i] for i in range(len(scalars))], counts
