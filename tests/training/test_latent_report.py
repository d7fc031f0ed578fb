"""The `latents` report: which latents it picks and how it marks the max token."""

import torch

from sae.latent_stats import LatentStats
from training.latent_report import context_line, pick_latents


class _Tok:
    def decode(self, ids):
        return {0: "Once", 1: " upon", 2: " a", 3: " time"}[ids[0]]


def _stats(freq):
    f = len(freq)
    return LatentStats(
        freq=torch.tensor(freq), max_act=torch.ones(f), hist_edges=torch.linspace(0, 1, 3),
        hist_counts=torch.zeros(f, 2), top_acts=torch.ones(f, 1),
        top_token_ids=torch.tensor([[[0, 1, 2, 3]]] * f), top_window_acts=torch.zeros(f, 1, 4, dtype=torch.float16),
        top_center=torch.full((f, 1), 2), n_tokens=100,
    )


def test_pick_latents_spreads_over_frequency_and_skips_dead():
    stats = _stats([0.5, 0.0, 0.1, 0.3, 0.2, 0.05])
    assert pick_latents(stats, 3) == [0, 4, 5]  # most common, middle, rarest live one
    assert 1 not in pick_latents(stats, 10)


def test_context_line_bolds_the_max_token_without_its_space():
    assert context_line(_stats([1.0]), _Tok(), 0, 0) == "Once upon **a** time"
