"""Learning-rate and sparsity-coefficient schedules, shared by the toy and the language-model trainers.

Both are plain functions of the (0-based) step, so a resumed run recomputes exactly the values the
uninterrupted run used, and nothing about a schedule is stored in an SAE's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DECAY_SHAPES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from 0, constant, then (optionally) a decay from `decay_start` to `min_lr_frac * peak`."""

    peak: float
    """Learning rate after warm-up."""
    total_steps: int
    """Steps of the run (the decay ends there)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps (step s gets (s + 1) / warmup_steps of the peak)."""
    decay: Literal["constant", "linear", "cosine"] = "constant"
    """Shape after warm-up."""
    decay_start: int = 0
    """Step at which the decay begins (linear/cosine)."""
    min_lr_frac: float = 0.0
    """Final learning rate as a fraction of the peak (linear/cosine)."""

    def __post_init__(self) -> None:
        if self.decay not in DECAY_SHAPES:
            raise ValueError(f"unknown learning-rate decay {self.decay!r}; expected one of {DECAY_SHAPES}")

    def _warm_and_decay(self, step: int) -> tuple[float, float]:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.decay == "constant":
            return warm, 1.0
        span = max(self.total_steps - self.decay_start, 1)
        if self.decay == "linear":
            shape = max(min(1.0, (self.total_steps - step) / span), 0.0)
        else:
            t = min(max(step - self.decay_start, 0) / span, 1.0)
            shape = 0.5 * (1 + math.cos(math.pi * t))
        return warm, self.min_lr_frac + (1 - self.min_lr_frac) * shape

    def factor(self, step: int) -> float:
        """Multiplier of the peak at `step`."""
        warm, decay = self._warm_and_decay(step)
        return warm * decay

    def lr(self, step: int) -> float:
        """Learning rate at `step` (peak x warm-up x decay, in that order: resumed runs recompute it exactly)."""
        warm, decay = self._warm_and_decay(step)
        return self.peak * warm * decay


def sparsity_coeff_at(base: float, step: int, warmup_steps: int) -> float:
    """Sparsity coefficient at `step`: linear warm-up from 0 to `base` over `warmup_steps` (0: none)."""
    if warmup_steps <= 0:
        return base
    return base * min(1.0, (step + 1) / warmup_steps)
