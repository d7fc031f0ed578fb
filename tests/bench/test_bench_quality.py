"""bench_quality trains both libraries on the vectors our trainer sees, laid out as the evaluation reads them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from sae.base_model import load_base_model, residual_at
from tests.helpers import save_tiny_gpt_neo

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_quality.py"
STORIES = ["Once upon a time there was a little dog named Max.", "A bird sang.",
           "Lily liked to play in the park with her red ball. She was happy.", "Tom ran home."] * 3


def _bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality_under_test", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_vectors_are_each_story_from_position_zero(tmp_path):
    """Packed windows (stories starting mid-context) shifted the training distribution away from the held-out
    one-story-per-row evaluation and cost TopK ~0.05 variance explained: each story must be read on its own."""
    bm = load_base_model(str(save_tiny_gpt_neo(tmp_path / "neo", positions=64)))
    acts = _bench_quality().training_vectors(bm, STORIES, layer=1, chunk=5)
    expected = [residual_at(bm, torch.tensor([bm.tokenizer(s).input_ids]), None, 1)[0] for s in STORIES]
    torch.testing.assert_close(acts, torch.cat(expected), atol=1e-5, rtol=1e-5)
