"""Held-out perplexity in tokenizer-independent units, against a direct computation."""

import math

import pytest
import torch

from sae.base_model import load_base_model
from tests.helpers import save_tiny_gpt_neo
from training.lm_eval import held_out_perplexity


def test_perplexity_units_match_a_direct_computation(tmp_path):
    base = load_base_model(str(save_tiny_gpt_neo(tmp_path / "m")))
    stories = ["Once upon a time, Lily saw a cat.", "Tom ran to the big park. He was happy!"]
    result = held_out_perplexity(base.model, base.tokenizer, stories)
    eot = base.tokenizer.eos_token_id
    nats, tokens = 0.0, 0
    for story in stories:
        ids = torch.tensor([[eot, *base.tokenizer(story)["input_ids"], eot]])
        with torch.no_grad():
            logits = base.model(ids).logits[0, :-1]
        nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    assert result.tokens == tokens and result.stories == 2
    assert result.mean_loss == pytest.approx(nats / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    n_bytes = sum(len(s.encode()) for s in stories)
    assert result.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    n_words = sum(len(s.split()) for s in stories)
    assert n_words == 17 and result.word_perplexity == pytest.approx(math.exp(nats / n_words), rel=1e-5)
