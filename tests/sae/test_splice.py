"""sae/splice.py: spliced CE / KL, and its two shortcuts checked against full forward passes."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM

from sae.base_model import gpt2_tokenizer, load_base_model, logits_with_replacement, residual_at
from sae.splice import (
    clean_pass,
    downstream_losses,
    next_token_losses,
    splice_losses,
    spliced_logits,
    zero_ablation_logits,
)


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt_neo":
        return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50257, hidden_size=32, num_layers=4, num_heads=4,
                                              max_position_embeddings=64, attention_types=[[["global", "local"], 2]],
                                              window_size=8, intermediate_size=64))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module", params=["gpt_neo", "gpt2", "llama"])
def bm(request, tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    _tiny(request.param).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_base_model(str(folder))


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(["Once upon a time there was a little dog.", "Lily liked to play."], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("layer", [0, 1])
def test_skipping_the_blocks_before_the_hook_is_exact(bm, batch, layer):
    ids, mask = batch
    clean, resid, template = clean_pass(bm, ids, mask, layer)
    torch.testing.assert_close(clean, logits_with_replacement(bm, ids, mask, layer, None))
    torch.testing.assert_close(resid, residual_at(bm, ids, mask, layer))
    noisy = resid + 0.3 * torch.randn_like(resid)
    full = logits_with_replacement(bm, ids, mask, layer, noisy)
    torch.testing.assert_close(spliced_logits(bm, ids, mask, layer, noisy, template), full, rtol=1e-4, atol=1e-4)
    # the early blocks really did not run
    calls = []
    h = bm.blocks[0].register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    forward = type(bm.blocks[0]).forward
    try:
        spliced_logits(bm, ids, mask, layer, noisy, template)
    finally:
        h.remove()
    assert type(bm.blocks[0]).forward is forward and "forward" not in vars(bm.blocks[0])  # restored
    assert calls == [1]  # __call__ ran (hooks fire), the block's own forward did not: output is the replacement


@pytest.mark.parametrize("layer", [0, 1])
def test_zero_ablation_on_one_position_is_exact(bm, batch, layer):
    ids, mask = batch
    resid = residual_at(bm, ids, mask, layer)
    full = logits_with_replacement(bm, ids, mask, layer, torch.zeros_like(resid))
    one = zero_ablation_logits(bm, ids, layer)
    real = mask.bool()
    torch.testing.assert_close(one[real], full[real], rtol=1e-4, atol=1e-4)


def test_splice_losses_per_position(bm, batch):
    ids, mask = batch
    resid = residual_at(bm, ids, mask, 1)
    reps = [resid, resid + 0.1 * torch.randn_like(resid)]
    out = splice_losses(bm, ids, mask, 1, reps, budget=1)  # budget 1: one replacement per pass
    clean = logits_with_replacement(bm, ids, mask, 1, None)
    torch.testing.assert_close(out.ce_clean, next_token_losses(clean, ids, mask))
    torch.testing.assert_close(out.ce_spliced[0], out.ce_clean, rtol=1e-4, atol=1e-4)
    noisy = logits_with_replacement(bm, ids, mask, 1, reps[1])
    torch.testing.assert_close(out.ce_spliced[1], next_token_losses(noisy, ids, mask), rtol=1e-4, atol=1e-4)
    assert (out.kl_spliced[1][out.mask] > 0).all() and (out.kl_spliced[1][~out.mask] == 0).all()


def test_next_token_losses_and_downstream(bm, batch):
    ids, mask = batch
    logits = logits_with_replacement(bm, ids, mask, 1, None)
    ce = next_token_losses(logits, ids, mask)
    assert ce.shape == (2, ids.shape[1] - 1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    assert (ce[~valid] == 0).all()
    direct = F.cross_entropy(logits[0, :-1], ids[0, 1:])  # row 0 is unpadded
    torch.testing.assert_close(ce[0].mean(), direct)

    same = downstream_losses(bm, ids, mask, 1, lambda x: x)
    assert same.n_tokens == int(valid.sum())
    assert same.ce_spliced == pytest.approx(same.ce_clean, abs=1e-5) and same.kl_spliced == pytest.approx(0, abs=1e-5)
    assert same.ce_clean == pytest.approx(float(ce[valid].mean()), rel=1e-5)
    zeros = downstream_losses(bm, ids, mask, 1, torch.zeros(*ids.shape, bm.d_model))
    assert zeros.ce_spliced == pytest.approx(zeros.ce_ablation) and zeros.kl_spliced > 0
    noisy = downstream_losses(bm, ids, mask, 1, lambda x: x + 0.1 * torch.randn_like(x))
    score = (noisy.ce_ablation - noisy.ce_spliced) / (noisy.ce_ablation - noisy.ce_clean)
    assert noisy.kl_spliced > 0 and score == score  # finite
