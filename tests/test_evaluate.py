import json

import pytest
import torch
from conftest import save_tiny_gpt_neo

from sae.architectures import build_sae
from sae.base_model import load_base_model, residual_at
from sae.checkpoint import load_sae, save_sae
from sae.config import SAEConfig
from sae.latent_stats import LatentStats
from sae.metrics import variance_explained
from sae.splice import downstream_losses
from training.evaluate import EvalConfig, eval_set, evaluate_folders, evaluate_saes
from training.tinystories_cli import TinyStoriesConfig, TinyStoriesError, main, run

LAYER = 1
NAMES = ["Tom", "Lily", "Max", "Sue", "Ben", "Mia"]
THINGS = ["ball", "cat", "tree", "cake", "boat", "bird"]
STORIES = [
    f"Once upon a time {n} had a {t}. {n} liked the {t} very much. One day the {t} was gone, and {n} was sad. "
    f"Then a friend found the {t} and {n} was happy again."
    for n in NAMES for t in THINGS
]  # 36 stories: every 10th (3 of them) is held out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gpt_neo(tmp_path_factory.mktemp("models") / "tiny-neo", initializer_range=0.1)


@pytest.fixture(scope="module")
def bm(model_dir):
    return load_base_model(str(model_dir))


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORIES) + "\n")
    return path


def _identity_sae(d):
    """f = (ReLU(x), ReLU(-x)), x_hat = f W_dec = x exactly: a perfect reconstruction."""
    sae = build_sae(SAEConfig("standard", d, 2 * d, metadata={"hook_name": f"blocks.{LAYER}.hook_resid_post"}))
    eye = torch.eye(d)
    sae.load_effective_weights({"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
                                "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)})
    return sae


def _random_sae(d, arch="standard", f=48, seed=0):
    cfg = SAEConfig(arch, d, f, k=4 if arch == "topk" else None)
    sae = build_sae(cfg, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.W_enc.mul_(2.0)
    return sae


def _eval_set(bm, cfg=None, stories=STORIES[:12]):
    return eval_set(bm, stories, 64, cfg or EvalConfig(), info={"dataset_path": "test"})


def test_perfect_reconstruction_scores_one(bm, tmp_path):
    folder = save_sae(_identity_sae(bm.d_model), tmp_path / "identity")
    (m,) = evaluate_folders(bm, LAYER, [folder], _eval_set(bm), EvalConfig(), progress=False)
    assert abs(m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]) > 1e-3
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["variance_explained"] == pytest.approx(1.0, abs=1e-6) and m["mse"] < 1e-10
    assert m["cossim"] == pytest.approx(1.0, abs=1e-5) and m["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["metrics_version"] >= 1 and saved["n_tokens"] == m["eval_set"]["n_tokens"] > 100
    assert saved["eval_set"]["n_stories"] == 12 and saved["eval_set"]["dataset_path"] == "test"
    assert LatentStats.load(folder).d_sae == 2 * bm.d_model


def test_metrics_match_direct_computation(bm):
    es = _eval_set(bm)
    sae = _random_sae(bm.d_model)
    (m,), _ = evaluate_saes(bm, LAYER, [sae], es, EvalConfig(eval_batch_size=5), progress=False)
    ids, mask = es.tokens
    resid = residual_at(bm, ids, mask, LAYER)
    x = resid[mask.bool()]
    with torch.no_grad():
        out = sae(x)
        recon = sae(resid.reshape(-1, bm.d_model)).reconstruction.view_as(resid)
    assert m["variance_explained"] == pytest.approx(float(variance_explained(x, out.reconstruction)), rel=1e-5)
    assert m["l0"] == pytest.approx(float((out.latents > 0).sum(-1).double().mean()), rel=1e-6)
    assert m["frac_dead"] == pytest.approx(float(((out.latents > 0).sum(0) == 0).double().mean()))
    # downstream losses: the same as base_model.downstream_losses on the whole set as one batch
    ref = downstream_losses(bm, ids, mask, LAYER, recon)
    assert m["ce_loss_without_sae"] == pytest.approx(ref.ce_clean, rel=1e-4)
    assert m["ce_loss_with_sae"] == pytest.approx(ref.ce_spliced, rel=1e-4)
    assert m["ce_loss_with_ablation"] == pytest.approx(ref.ce_ablation, rel=1e-4)
    assert m["kl_div_with_sae"] == pytest.approx(ref.kl_spliced, rel=1e-3, abs=1e-6)
    assert m["n_ce_tokens"] == ref.n_tokens


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_latent_stats_top_contexts(bm, arch):
    cfg = EvalConfig(n_top=5, window=8, tokens_after=2, n_bins=10)
    es = _eval_set(bm, cfg)
    sae = _random_sae(bm.d_model, arch)
    _, (stats,) = evaluate_saes(bm, LAYER, [sae], es, cfg, progress=False)
    ids, mask = es.tokens
    resid = residual_at(bm, ids, mask, LAYER)
    with torch.no_grad():
        z = sae.encode(resid.reshape(-1, bm.d_model)).view(*ids.shape, -1) * mask[..., None]  # [rows, seq, F]
    flat = z.reshape(-1, z.shape[-1])
    n_tok = int(mask.sum())
    assert stats.n_tokens == n_tok
    torch.testing.assert_close(stats.freq, (flat > 0).sum(0).float() / n_tok)
    torch.testing.assert_close(stats.max_act, flat.max(0).values, rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.hist_counts.sum(1).long(), (flat > 0).sum(0))
    # top_acts are the n_top largest activations of each latent, descending
    expected = flat.topk(5, dim=0).values.t()
    torch.testing.assert_close(stats.top_acts, expected.clamp_min(0), rtol=1e-4, atol=1e-5)
    assert torch.all(stats.top_acts[:, :-1] >= stats.top_acts[:, 1:])
    c = 8 - 1 - 2
    assert torch.all(stats.top_center == c)
    used = stats.top_acts > 0
    assert used.any()
    # the window's centre token carries the activation, and the window is the real token sequence around a
    # token where the latent takes that value (ties between identical story openings are fine)
    torch.testing.assert_close(stats.top_window_acts[..., c].float()[used], stats.top_acts[used], rtol=2e-3, atol=1e-3)
    lengths = mask.sum(1)
    for f, j in used.nonzero()[:60].tolist():
        window, act = stats.top_token_ids[f, j].tolist(), float(stats.top_acts[f, j])
        found = False
        for r, col in ((z[..., f] - act).abs() <= 1e-4 * max(1.0, act)).nonzero().tolist():
            expect = [int(ids[r, q]) if 0 <= q < lengths[r] else -1 for q in range(col - c, col - c + 8)]
            if expect == window:
                win_acts = [float(z[r, q, f]) if 0 <= q < lengths[r] else None for q in range(col - c, col - c + 8)]
                got = stats.top_window_acts[f, j].float().tolist()
                assert all(a is None or abs(a - g) <= 2e-3 * max(1.0, abs(a)) for a, g in zip(win_acts, got))
                found = True
                break
        assert found, (f, j)
    assert torch.all(stats.top_token_ids[~used] == -1)


def test_latent_stats_speed_f1000(bm):
    """LatentStats for F=1000 stays cheap: the model forward passes dominate, not the bookkeeping."""
    import time

    cfg = EvalConfig(max_tokens=2000, downstream=False)
    es = _eval_set(bm, cfg, STORIES * 2)
    sae = _random_sae(bm.d_model, f=1000)
    t0 = time.perf_counter()
    _, (stats,) = evaluate_saes(bm, LAYER, [sae], es, cfg, progress=False)
    assert stats.top_window_acts.shape == (1000, 12, 16) and stats.top_window_acts.dtype == torch.float16
    assert time.perf_counter() - t0 < 30


# ------------------------------------------------------------------------------------------- the CLI


def _cli_cfg(model_dir, stories_file, out, **kw):
    base = dict(model=str(model_dir), data=str(stories_file), widths=["8", "d"], architectures=["standard", "topk"],
                steps=6, batch_size=64, checkpoint_every=3, log_every=2, lr_warmup_steps=2, k=4, out=out,
                context_size=64, max_tokens=400, progress=False, n_top=4)
    base.update(kw)
    return TinyStoriesConfig(**base)


def test_cli_end_to_end(model_dir, stories_file, tmp_path):
    result = run(_cli_cfg(model_dir, stories_file, tmp_path))
    assert len(result.folders) == 4 and result.tokens_per_s > 0
    for folder, m in zip(result.folders, result.metrics):
        assert folder.parent.parent == tmp_path / "tiny-neo" / "blocks.1.hook_resid_post"
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == "tiny-neo" and meta["hook_name"] == "blocks.1.hook_resid_post"
        assert meta["hf_hidden_states_index"] == 2 and meta["prepend_bos"] is False and meta["context_size"] == 64
        assert meta["dataset_path"].endswith("stories.txt") and "/tmp" not in json.dumps(meta)
        tc = json.loads((folder / "training_config.json").read_text())
        assert tc["n_train_stories"] == 33 and tc["tokens_seen"] == 6 * 64 and tc["cli"]["steps"] == 6
        assert (folder / "latent_stats.safetensors").is_file() and "ce_loss_score" in m
        assert load_sae(folder / "steps" / "000000003").cfg.d_sae == load_sae(folder).cfg.d_sae
    # a finished run resumes to the same place; eval-only re-evaluates
    again = run(_cli_cfg(model_dir, stories_file, tmp_path, eval_only=True))
    assert [m["mse"] for m in again.metrics] == pytest.approx([m["mse"] for m in result.metrics])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--widths", "--architectures", "--steps", "--checkpoint-every", "--resume", "--out"):
        assert flag in out


def test_cli_errors(model_dir, stories_file, tmp_path, capsys):
    with pytest.raises(TinyStoriesError, match="cannot load the base model"):
        run(_cli_cfg(tmp_path / "no-such-model", stories_file, tmp_path))
    with pytest.raises(TinyStoriesError, match="does not exist"):
        run(_cli_cfg(model_dir, tmp_path / "missing.txt", tmp_path))
    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(TinyStoriesError, match="cannot read"):
        run(_cli_cfg(model_dir, bad, tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "nope"), "--data", str(stories_file), "--out", str(tmp_path)])
    assert exc.value.code == 1 and "cannot load the base model" in capsys.readouterr().err


def test_cli_hub_preset_fails_fast_offline(monkeypatch, model_dir, tmp_path):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: "offline"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(TinyStoriesError) as exc:
        run(TinyStoriesConfig(preset="tinystories-33m", out=tmp_path, progress=False))
    assert "--preset tinystories-mini" in str(exc.value) and "random:" in str(exc.value)
    with pytest.raises(TinyStoriesError, match="Hub is unreachable"):
        run(TinyStoriesConfig(preset="tinystories-33m", model=f"random:{model_dir / 'config.json'}", out=tmp_path,
                              progress=False))
    assert time.perf_counter() - t0 < 20
