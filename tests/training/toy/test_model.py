"""training/toy/model.py: the toy model, its sampling and training."""

from pathlib import Path

import torch

from tests.helpers import pentagon_model
from training.toy.model import ToyModel, ToyModelConfig, train_toy_model

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "checkpoints" / "toy"


def test_toy_model_trains():
    model = ToyModel(ToyModelConfig(n_inst=4, toy_steps=200, toy_batch_size=128, toy_lr=1e-2))
    curve = train_toy_model(model)
    assert curve.shape == (3, 4)
    assert (curve[-1] < 0.7 * curve[0]).all()


def test_feature_sampling_matches_probability():
    model = ToyModel(ToyModelConfig(n_inst=4, feature_probability=[0.02, 0.05, 0.3, 0.0]))
    gen = torch.Generator().manual_seed(0)
    x = model.sample_features(4, 2048, gen)
    assert x.shape == (4, 2048, 4, 5) and x.min() >= 0 and x.max() < 1
    present = (x > 0).float().mean((0, 1, 3))
    assert torch.allclose(present, torch.tensor([0.02, 0.05, 0.3, 0.0]), atol=0.01)
    assert abs(float(x[x > 0].mean()) - 0.5) < 0.02


def test_compact_batches_match_dense_distribution():
    model = pentagon_model(3, p=0.03)
    gen = torch.Generator().manual_seed(1)
    cb = model.sample_hidden_compact(64, 1024, gen)
    assert torch.allclose(cb.weight.sum(1), torch.full((64, 3), 1024.0), atol=1e-3)
    assert cb.h.shape[1] < 300  # the zero inputs are folded away
    dense = model.sample_hidden(64, 1024, gen)
    w = cb.weight[..., None]
    for f in (lambda h: h, lambda h: h.pow(2), lambda h: (h != 0).any(-1, keepdim=True).float()):
        compact_mean = (f(cb.h) * w).sum((0, 1)) / w.sum((0, 1))
        assert torch.allclose(compact_mean, f(dense).mean((0, 1)), atol=5e-3)
