"""explorer: analyze, latents, catalog and cache on a tiny random GPT-Neo and random SAEs built here (fast)."""

import math

import pytest
import torch
from conftest import save_tiny_gpt_neo

from explorer.analyze import MAX_CHARS, analyze_text, check_compatible, clean_text, compare_saes
from explorer.cache import ModelCache
from explorer.catalog import CheckpointCatalog, Source
from explorer.errors import AnalysisError
from explorer.latents import (
    decoder_logit_effects,
    latent_values,
    latents_at_token,
    second_view_values,
    token_info,
    token_infos,
    top_latents,
)
from explorer.render import tokens_html
from sae.architectures import build_sae
from sae.base_model import load_base_model, logits_with_replacement, residual_at
from sae.checkpoint import sae_folder, save_sae
from sae.config import SAEConfig
from sae.metrics import kl_div, next_token_ce

D = 32
CONTEXT = 48
LAYER = 1
HOOK = "blocks.1.hook_resid_post"
STORY = "Once upon a time, there was a little dog named Max. Max liked to run in the park."


def _sae(d_sae: int, d_in: int = D, seed: int = 0, **meta) -> torch.nn.Module:
    metadata = {"model_name": "tiny-neo", "hook_name": HOOK, **meta}
    sae = build_sae(SAEConfig("standard", d_in, d_sae, metadata=metadata), seed=seed)
    with torch.no_grad():  # a positive encoder bias so plenty of latents fire on random activations
        sae.b_enc.fill_(0.05)
    return sae.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gpt_neo(tmp_path_factory.mktemp("models") / "tiny-neo", hidden=D, layers=2, positions=CONTEXT)


@pytest.fixture(scope="module")
def bm(model_dir):
    return load_base_model(str(model_dir))


@pytest.fixture(scope="module")
def sae():
    return _sae(64)


@pytest.fixture(scope="module")
def analysis(bm, sae):
    return analyze_text(bm, sae, LAYER, STORY)


def test_activations_are_the_sae_of_the_hook_activations(bm, sae, analysis):
    ids = torch.tensor([analysis.token_ids])
    x = residual_at(bm, ids, None, LAYER)[0]
    with torch.no_grad():
        expected = sae.encode(x)
        x_hat = sae.decode(expected)
    assert analysis.latents.shape == (len(analysis.token_ids), 64)
    torch.testing.assert_close(analysis.latents, expected)
    # per-token error is ||x - x_hat||^2 per token
    torch.testing.assert_close(analysis.sq_error, ((x - x_hat) ** 2).sum(-1))
    assert analysis.metrics["l0"] == pytest.approx(float((expected > 0).sum(-1).float().mean()))
    assert analysis.metrics["mse"] == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-5)


def test_tokens_cover_the_text(bm, analysis):
    assert analysis.token_ids == bm.tokenizer(STORY).input_ids
    assert "".join(analysis.token_texts) == STORY
    assert analysis.tokens[1] == "␣upon" and not analysis.truncated and analysis.notices == []
    for key in ("tokenize", "model_forward", "sae", "downstream"):
        assert analysis.timings[key] >= 0


def test_downstream_losses(bm, sae, analysis):
    ids = torch.tensor([analysis.token_ids])
    x = residual_at(bm, ids, None, LAYER)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    clean = next_token_ce(logits_with_replacement(bm, ids, None, LAYER, None), ids)[0]
    spliced = next_token_ce(logits_with_replacement(bm, ids, None, LAYER, x_hat), ids)[0]
    zeros = next_token_ce(logits_with_replacement(bm, ids, None, LAYER, torch.zeros_like(x)), ids)[0]
    m = analysis.metrics
    assert m["ce_loss_without_sae"] == pytest.approx(float(clean.mean()), rel=1e-4)
    assert m["ce_loss_with_sae"] == pytest.approx(float(spliced.mean()), rel=1e-4)
    assert m["ce_loss_with_ablation"] == pytest.approx(float(zeros.mean()), rel=1e-4)
    zero, with_sae, clean_ce = m["ce_loss_with_ablation"], m["ce_loss_with_sae"], m["ce_loss_without_sae"]
    score = (zero - with_sae) / (zero - clean_ce)
    assert m["ce_loss_score"] == pytest.approx(score, rel=1e-4)
    clean_logits = logits_with_replacement(bm, ids, None, LAYER, None)
    sae_logits = logits_with_replacement(bm, ids, None, LAYER, x_hat)
    kl = kl_div(clean_logits[:, :-1], sae_logits[:, :-1]).mean()
    assert m["kl_div_with_sae"] == pytest.approx(float(kl), rel=1e-3, abs=1e-6) and m["kl_div_with_sae"] >= 0
    assert math.isnan(float(analysis.ce_clean_per_token[0]))
    torch.testing.assert_close(analysis.ce_clean_per_token[1:], clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(analysis.ce_sae_per_token[1:], spliced, rtol=1e-4, atol=1e-4)
    increase, _ = second_view_values(analysis, "ce")
    assert increase[0] == 0 and increase[1:] == pytest.approx((spliced - clean).clamp_min(0).tolist(), abs=1e-3)
    assert second_view_values(analysis, "error")[0] == pytest.approx(analysis.sq_error.tolist())


def _fake_analysis(analysis, latents):
    import dataclasses

    return dataclasses.replace(analysis, latents=latents)


def test_top_latent_ranking(analysis):
    T = 4
    lat = torch.zeros(T, 6)
    lat[0, 1] = 5.0  # latent 1: max 5, total 5, 1 token
    lat[:, 2] = 2.0  # latent 2: max 2, total 8, 4 tokens
    lat[1, 3], lat[2, 3] = 4.0, 3.0  # latent 3: max 4, total 7, 2 tokens
    lat[3, 4] = -1.0  # never positive: not listed
    a = _fake_analysis(analysis, lat)
    by_max = top_latents(a, by="max", n=10)
    assert [r.latent for r in by_max] == [1, 3, 2]
    assert by_max[0] == (1, 5.0, 5.0, 1)
    by_total = top_latents(a, by="total", n=10)
    assert [r.latent for r in by_total] == [2, 3, 1]
    assert by_total[0].n_fired == 4 and by_total[0].total_act == pytest.approx(8.0)
    assert [r.latent for r in top_latents(a, by="total", n=2)] == [2, 3]
    assert latents_at_token(a, 1) == [(3, 4.0), (2, 2.0)]
    assert token_info(a, 1).n_fired == 2
    assert tuple(token_infos(a)[1]) == pytest.approx(tuple(token_info(a, 1)), nan_ok=True)
    assert latent_values(a, 3) == [0.0, 4.0, 3.0, 0.0] and latent_values(a, None) == [0.0] * 4
    with pytest.raises(AnalysisError):
        top_latents(a, by="mean")
    with pytest.raises(AnalysisError, match="outside"):
        latents_at_token(a, 99)


def test_ranking_on_real_analysis(analysis):
    rows = top_latents(analysis, by="max", n=5)
    maxes = analysis.latents.max(0).values
    assert rows[0].latent == int(maxes.argmax())
    assert [r.max_act for r in rows] == sorted((r.max_act for r in rows), reverse=True)


def test_empty_text(bm, sae):
    for text in ("", "   \n\t ", "\x00\x01\x7f", None):
        with pytest.raises(AnalysisError, match="empty"):
            analyze_text(bm, sae, LAYER, text)


def test_over_character_limit(bm, sae):
    with pytest.raises(AnalysisError, match="limit"):
        analyze_text(bm, sae, LAYER, "a" * (MAX_CHARS + 1))
    with pytest.raises(AnalysisError, match="limit is 100"):
        analyze_text(bm, sae, LAYER, "word " * 30, max_chars=100)


def test_longer_than_context_is_truncated_with_notice(bm, sae):
    text = " ".join(["The cat sat on the mat."] * 20)  # ~140 tokens > CONTEXT
    a = analyze_text(bm, sae, LAYER, text)
    assert a.truncated and a.n_tokens == CONTEXT and a.latents.shape[0] == CONTEXT
    assert f"at most {CONTEXT}" in a.notice and "first" in a.notice
    assert math.isfinite(a.metrics["ce_loss_score"]) or math.isnan(a.metrics["ce_loss_score"])


@pytest.mark.parametrize("text", [
    "The dragon 🐉 smiled 😀👍🏽 and waved 👨‍👩‍👧.",
    "小猫很开心。日本語のテキスト。Привет, мир! مرحبا",
    "Line one\r\nline two\x07 with a bell\x1b[31m and\ttab\x00.",
    "🦄",
    "\u200bzero width\ufeff and combining é",
    "<b>bold</b> & <script>alert(1)</script>\n\n New paragraph.",
])
def test_unusual_text_never_crashes(bm, sae, text):
    a = analyze_text(bm, sae, LAYER, text)
    assert a.n_tokens == len(a.tokens) == len(a.token_texts) == a.latents.shape[0]
    assert all(c not in a.text for c in "\x00\x07\x1b\r")
    assert "".join(a.token_texts) == a.text
    html = tokens_html(a, a.latents[:, 0])
    assert html.count("data-pos=") == a.n_tokens
    assert "<script>" not in html and "<b>" not in html  # user text is escaped


def test_control_characters_removed_with_notice(bm, sae):
    a = analyze_text(bm, sae, LAYER, "A cat\x00 sat.\x07")
    assert a.text == "A cat sat." and "control" in a.notice
    assert clean_text("a\r\nb\tc")[0] == "a\nb\tc"


def test_one_token_text(bm, sae):
    a = analyze_text(bm, sae, LAYER, "Hi")
    assert a.n_tokens == 1 and math.isnan(a.metrics["ce_loss_without_sae"])
    assert math.isnan(a.metrics["variance_explained"])


def test_mismatched_checkpoint_refused(bm):
    with pytest.raises(AnalysisError, match=r"d_in=24.*d_model=32"):
        analyze_text(bm, _sae(16, d_in=24), LAYER, STORY)
    with pytest.raises(AnalysisError, match="trained on 'TinyStories-33M'"):
        analyze_text(bm, _sae(16, model_name="TinyStories-33M"), LAYER, STORY)
    with pytest.raises(AnalysisError, match=r"blocks\.0\.hook_resid_post"):
        analyze_text(bm, _sae(16, hook_name="blocks.0.hook_resid_post"), LAYER, STORY)
    with pytest.raises(AnalysisError, match="no layer 7"):
        check_compatible(bm, _sae(16), 7)


def test_compare_matches_single(bm, sae, analysis):
    other = _sae(128, seed=1)
    rows = compare_saes(bm, [sae, other], HOOK, STORY)
    assert [r.d_sae for r in rows] == [64, 128]
    for key in ("mse", "l0", "ce_loss_with_sae", "ce_loss_without_sae"):
        assert rows[0].metrics[key] == pytest.approx(analysis.metrics[key], rel=1e-4)
    assert rows[1].metrics["l0"] != rows[0].metrics["l0"]


def test_concurrent_requests_on_one_model(bm, sae, analysis):
    """Forward passes hook shared modules: concurrent requests must not break each other."""
    from concurrent.futures import ThreadPoolExecutor

    other = _sae(128, seed=1)

    def work(i: int):
        if i % 2:
            return compare_saes(bm, [sae, other], LAYER, STORY)[0]
        return analyze_text(bm, sae, LAYER, STORY)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    for r in results:
        assert r.metrics["ce_loss_with_sae"] == pytest.approx(analysis.metrics["ce_loss_with_sae"], rel=1e-4)


def test_decoder_logit_effects(bm, sae):
    eff = decoder_logit_effects(bm, sae, 3, n=5, through_ln=False)
    W_U = bm.model.get_output_embeddings().weight.detach()
    direct = W_U @ sae.W_dec[3].detach()
    assert [v for _, v in eff.promoted] == pytest.approx(direct.topk(5).values.tolist(), rel=1e-4)
    assert [v for _, v in eff.suppressed] == pytest.approx(direct.topk(5, largest=False).values.tolist(), rel=1e-4)
    eff_ln = decoder_logit_effects(bm, sae, 3, n=5)
    assert "LayerNorm" in eff_ln.method and len(eff_ln.promoted) == 5
    with pytest.raises(AnalysisError, match="does not exist"):
        decoder_logit_effects(bm, sae, 64)


def test_cache_loads_once(tmp_path, model_dir):
    folder = sae_folder(tmp_path, "tiny-neo", HOOK, "standard", 64)
    save_sae(_sae(64), folder)
    cache = ModelCache()
    m1, s1 = cache.base_model(str(model_dir)), cache.sae(folder)
    assert cache.base_model(str(model_dir)) is m1
    assert cache.sae(str(folder)) is s1
    missing = cache.latent_stats(folder)
    assert missing.stats is None and "no latent_stats.safetensors" in missing.problem
    with pytest.raises(AnalysisError, match="Could not load the SAE"):
        cache.sae(tmp_path / "nope")
    with pytest.raises(AnalysisError, match="base model"):
        cache.base_model(str(tmp_path / "no-model"))


def test_cache_lru_eviction(tmp_path):
    cache = ModelCache(max_saes=2)
    folders = []
    for d in (8, 16, 32):
        f = sae_folder(tmp_path, "tiny-neo", HOOK, "standard", d)
        save_sae(_sae(d), f)
        folders.append(f)
    a = cache.sae(folders[0])
    cache.sae(folders[1])
    assert cache.sae(folders[0]) is a  # refreshes folders[0]
    cache.sae(folders[2])  # evicts folders[1]
    assert cache.sae(folders[0]) is a


def test_catalog_excludes_toy_and_finds_model(tmp_path, model_dir):
    import shutil

    root = tmp_path / "ckpts"
    shutil.copytree(model_dir, root / "tiny-neo")
    for d in (64, 128):
        save_sae(_sae(d), sae_folder(root, "tiny-neo", HOOK, "standard", d))
    save_sae(_sae(64), sae_folder(root, "tiny-neo", HOOK, "standard", 64) / "steps" / "000000100")
    toy = build_sae(SAEConfig("standard", 2, 5, metadata={"model_name": "toy-superposition"}))
    save_sae(toy, root / "toy" / "standard-none" / "inst_00")
    (root / "toy" / "standard-none" / "toy_model.json").write_text("{}")
    cat = CheckpointCatalog([Source(root, "local")])
    assert cat.models() == ["tiny-neo"] and cat.hooks("tiny-neo") == [HOOK]
    assert cat.widths("tiny-neo", HOOK, "standard") == [64, 128]
    assert cat.steps("tiny-neo", HOOK, "standard", 64) == [100, None]
    assert [e.info.d_sae for e in cat.finals("tiny-neo", HOOK)] == [64, 128]
    assert cat.toy_folders == [root / "toy" / "standard-none"]
    entry = cat.default()
    assert entry.info.d_sae == 128 and entry.info.step is None
    assert cat.base_model_source(entry) == str(root / "tiny-neo")
    with pytest.raises(AnalysisError):
        cat.find("tiny-neo", HOOK, "topk", 64, None)


def test_hub_failure_is_a_fast_notice(monkeypatch):
    import time

    from explorer.catalog import fetch_hub_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    sources, notices = fetch_hub_sources(["nobody/no-such-sae-repo"], timeout=10)
    assert time.monotonic() - t0 < 12
    assert sources == [] and len(notices) == 1 and "nobody/no-such-sae-repo" in notices[0]


def test_app_starts_without_checkpoints_and_with_a_bad_hub_repo(tmp_path, monkeypatch, model_dir):
    """The app's startup path (no server): CLI/env parsing, Hub notice, local checkpoints still listed, UI builds."""
    import shutil

    from explorer import serve as app
    from explorer.ui import build_ui

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PORT", "7999")
    monkeypatch.setenv("SAE_HUB_REPOS", "nobody/no-such-sae-repo")
    args = app.parse_args(["--checkpoints", str(tmp_path / "empty"), "--hub-timeout", "10"])
    assert args.port == 7999 and args.host == "0.0.0.0"
    ex = app.make_explorer(args)
    assert any("nobody/no-such-sae-repo" in n for n in ex.notices)
    assert "No language-model SAE checkpoints found" in ex.banner()
    build_ui(ex)

    root = tmp_path / "ckpts"
    shutil.copytree(model_dir, root / "tiny-neo")
    save_sae(_sae(64), sae_folder(root, "tiny-neo", HOOK, "standard", 64))
    ex = app.make_explorer(app.parse_args(["--checkpoints", str(root), "--hub-timeout", "10"]))
    assert [e.info.d_sae for e in ex.catalog.entries] == [64] and ex.notices
    build_ui(ex)
