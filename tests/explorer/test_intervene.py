"""explorer/intervene.py on tiny random causal LMs (GPT-Neo and GPT-2) built here, checked against full passes."""

import pytest
import torch
from conftest import save_tiny_gpt_neo
from transformers import GPT2Config, GPT2LMHeadModel

from explorer.errors import AnalysisError
from explorer.intervene import MAX_NEW_TOKENS, Intervention, edit_residual, intervene
from sae.architectures import build_sae
from sae.base_model import gpt2_tokenizer, load_base_model, logits_with_replacement, residual_at
from sae.config import SAEConfig
from sae.metrics import next_token_ce

D = 32
HOOK = "blocks.1.hook_resid_post"
STORY = "Once upon a time, there was a little dog named Max. Max liked to run in the park."


def _gpt2(folder):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_embd=D, n_layer=3, n_head=4, n_positions=128)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt_neo", "gpt2"])
def bm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / f"tiny-{request.param}"
    if request.param == "gpt_neo":
        save_tiny_gpt_neo(folder, hidden=D, layers=4, positions=128, initializer_range=0.2)
    else:
        _gpt2(folder)
    return load_base_model(str(folder))


@pytest.fixture(scope="module")
def sae(bm):
    s = build_sae(SAEConfig("standard", D, 64, metadata={"model_name": bm.name, "hook_name": HOOK}), seed=0)
    with torch.no_grad():
        s.b_enc.fill_(0.05)
    return s.eval()


def _ids(bm):
    return torch.tensor([bm.tokenizer(STORY).input_ids])


def _firing_latent(bm, sae):
    z = sae.encode(residual_at(bm, _ids(bm), None, 1)[0]).detach()
    return int(z.sum(0).argmax()), z


def test_ablation_matches_a_full_pass(bm, sae):
    latent, z = _firing_latent(bm, sae)
    iv = Intervention(latent, "ablate")
    res = intervene(bm, sae, HOOK, STORY, iv, n_new=0)
    x = residual_at(bm, _ids(bm), None, 1)[0]
    edited = x - z[:, latent, None] * sae.W_dec[latent].detach()
    torch.testing.assert_close(edit_residual(sae, x, iv), edited)
    ref = next_token_ce(logits_with_replacement(bm, _ids(bm), None, 1, edited[None]), _ids(bm))[0]
    torch.testing.assert_close(res.ce_after[1:], ref, rtol=1e-4, atol=1e-4)
    clean = next_token_ce(logits_with_replacement(bm, _ids(bm), None, 1, None), _ids(bm))[0]
    torch.testing.assert_close(res.ce_before[1:], clean, rtol=1e-4, atol=1e-4)
    assert res.ce_change[1:].abs().max() > 0 and res.ce_change[0].isnan()
    torch.testing.assert_close(res.latent_acts, z[:, latent])


def test_clamp_and_chosen_positions(bm, sae):
    latent, _ = _firing_latent(bm, sae)
    x = residual_at(bm, _ids(bm), None, 1)[0]
    out = edit_residual(sae, x, Intervention(latent, "clamp", 5.0, (2, 4)))
    assert torch.equal(out[[0, 1, 3]], x[[0, 1, 3]])
    torch.testing.assert_close(sae.encode(out)[[2, 4], latent].detach(), torch.tensor([5.0, 5.0]), rtol=1e-3,
                               atol=1e-3)  # other latents may react, this one reads back its clamp
    res = intervene(bm, sae, HOOK, STORY, Intervention(latent, "clamp", 5.0, (2, 4)), n_new=0)
    assert res.edited == [2, 4]
    assert torch.allclose(res.ce_change[1:3], torch.zeros(2), atol=1e-5)  # tokens 1, 2 come before any effect


def test_steering_changes_predictions_and_continuation(bm, sae):
    res = intervene(bm, sae, HOOK, STORY, Intervention(3, "steer", 40.0), position=5, n_new=12)
    assert res.position == 5 and len(res.top_before) == 8 and res.top_before != res.top_after
    assert res.continuation_before != res.continuation_after
    assert abs(sum(p.prob for p in res.top_before)) <= 1.0 + 1e-6


def test_a_silent_latent_changes_nothing(bm, sae):
    _, z = _firing_latent(bm, sae)
    silent = [i for i in range(64) if float(z[:, i].max()) <= 0]
    if not silent:  # make one silent: a very negative encoder bias
        with torch.no_grad():
            sae.b_enc[0] = -1e3
        silent = [0]
    res = intervene(bm, sae, HOOK, STORY, Intervention(silent[0], "ablate"), n_new=8)
    assert torch.allclose(res.ce_change[1:], torch.zeros(res.ce_change.shape[0] - 1), atol=1e-6)
    assert res.continuation_before == res.continuation_after


def test_seeded_sampling_is_reproducible(bm, sae):
    iv = Intervention(3, "steer", 2.0)
    a = intervene(bm, sae, HOOK, STORY, iv, n_new=10, seed=7)
    b = intervene(bm, sae, HOOK, STORY, iv, n_new=10, seed=7)
    assert a.continuation_after == b.continuation_after and a.continuation_before == b.continuation_before
    n = len(bm.tokenizer(a.continuation_before).input_ids)
    assert 1 <= n <= 12  # 10 tokens (re-tokenizing may merge or split a few)


def test_bad_requests(bm, sae):
    with pytest.raises(AnalysisError, match=r"latents 0\.\.63"):
        intervene(bm, sae, HOOK, STORY, Intervention(64))
    with pytest.raises(AnalysisError, match="Unknown operation"):
        intervene(bm, sae, HOOK, STORY, Intervention(1, "delete"))
    with pytest.raises(AnalysisError, match="outside the text"):
        intervene(bm, sae, HOOK, STORY, Intervention(1, positions=(500,)))
    with pytest.raises(AnalysisError, match="outside the text"):
        intervene(bm, sae, HOOK, STORY, Intervention(1), position=500)
    res = intervene(bm, sae, HOOK, "Hi", Intervention(1), n_new=10_000)
    assert len(bm.tokenizer(res.continuation_after).input_ids) <= MAX_NEW_TOKENS + 2
