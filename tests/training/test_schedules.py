"""training/schedules.py: learning-rate shapes and the sparsity warm-up."""

import math

import pytest

from training.schedules import LRSchedule, sparsity_coeff_at


def test_warmup_then_constant():
    s = LRSchedule(peak=2.0, total_steps=100, warmup_steps=4)
    assert [s.lr(i) for i in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert s.lr(99) == 2.0 and LRSchedule(peak=1.0, total_steps=10).lr(0) == 1.0


def test_linear_and_cosine_decay():
    lin = LRSchedule(peak=1.0, total_steps=100, decay="linear", decay_start=80)
    assert lin.lr(50) == 1.0 and lin.lr(90) == pytest.approx(0.5) and lin.lr(99) == pytest.approx(0.05)
    assert lin.lr(100) == 0.0
    cos = LRSchedule(peak=1.0, total_steps=100, decay="cosine", decay_start=50, min_lr_frac=0.1)
    assert cos.lr(50) == 1.0 and cos.lr(75) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cos.lr(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown learning-rate decay"):
        LRSchedule(peak=1.0, total_steps=1, decay="step")  # type: ignore[arg-type]


def test_sparsity_warmup():
    assert [sparsity_coeff_at(1.0, i, 4) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert sparsity_coeff_at(0.3, 0, 0) == 0.3
