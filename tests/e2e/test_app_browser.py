"""The explorer app in a real browser: start `app.py` on a fixture checkpoints tree, drive Chromium.

Needs Debian's `chromium` (`apt-get install -y chromium`); the test fails (not skips) without it.
Screenshots of every state go to `test-output/screenshots/`.

`python tests/e2e/test_app_browser.py DIR` only builds the fixture checkpoints tree in DIR (for manual runs).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from explorer.serve import AppStartError, serve_in_subprocess  # noqa: E402
from sae.architectures import build_sae  # noqa: E402
from sae.base_model import gpt2_tokenizer, load_base_model, residual_at  # noqa: E402
from sae.checkpoint import sae_folder, save_sae, step_folder  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.latent_stats import LatentStats, empty_histogram_edges  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SHOTS = ROOT / "test-output" / "screenshots"
MODEL = "tiny-neo"
HOOK = "blocks.1.hook_resid_post"
WIDTHS = (64, 128)
STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside with her red ball.",
    "Tom had a big dog named Max. Max liked to run in the park and jump in the water.",
    "One day, a small bird could not find its mom. A kind rabbit helped the bird look under the tree.",
    "Sara and Ben built a tall tower of blocks. When it fell down, they laughed and built it again.",
    "The sun was hot, so the cat slept in the shade. A little mouse came to say hello.",
]


# ---------------------------------------------------------------------------------------- fixture


def _latent_stats(bm, sae, layer: int, texts: list[str], window: int = 9, n_top: int = 5) -> LatentStats:
    acts, ids_all = [], []
    for t in texts:
        ids = torch.tensor([bm.tokenizer(t).input_ids])
        with torch.no_grad():
            acts.append(sae.encode(residual_at(bm, ids, None, layer)[0]))
        ids_all.append(ids[0])
    F = sae.cfg.d_sae
    cat = torch.cat(acts)
    edges = empty_histogram_edges(float(cat.max()), n_bins=20)
    counts = torch.stack([torch.histc(cat[:, j][cat[:, j] > 0].clamp_min(edges[0]), bins=20,
                                      min=float(edges[0]), max=float(edges[-1])) for j in range(F)])
    top_acts = torch.zeros(F, n_top)
    top_ids = torch.full((F, n_top, window), -1, dtype=torch.long)
    top_win = torch.zeros(F, n_top, window, dtype=torch.float16)
    top_center = torch.zeros(F, n_top, dtype=torch.long)
    half = window // 2
    for j in range(F):
        cands = [(float(a[p, j]), s, p) for s, a in enumerate(acts) for p in range(a.shape[0]) if a[p, j] > 0]
        for r, (v, s, p) in enumerate(sorted(cands, reverse=True)[:n_top]):
            lo, hi = max(0, p - half), min(acts[s].shape[0], p + half + 1)
            top_acts[j, r] = v
            top_ids[j, r, : hi - lo] = ids_all[s][lo:hi]
            top_win[j, r, : hi - lo] = acts[s][lo:hi, j].half()
            top_center[j, r] = p - lo
    return LatentStats(freq=(cat > 0).float().mean(0), max_act=cat.max(0).values, hist_edges=edges,
                       hist_counts=counts, top_acts=top_acts, top_token_ids=top_ids, top_window_acts=top_win,
                       top_center=top_center, n_tokens=cat.shape[0])


def _toy_folder(folder: Path) -> None:
    from matplotlib.figure import Figure
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        toy = build_sae(SAEConfig("standard", 2, 5, metadata={"model_name": "toy-superposition"}), seed=i)
        save_sae(toy, folder / f"inst_{i:02d}")
    (folder / "toy_model.json").write_text(json.dumps({"n_features": 5, "d_hidden": 2, "n_inst": 2}))
    (folder / "metrics.json").write_text(json.dumps({  # the shape training/toy.py writes
        "run": folder.name, "architecture": "standard", "resample": "simple",
        "summary": {"n_all_recovered": 1, "n_inst": 2, "features_recovered": 8, "features_total": 10},
        "recovery_threshold": 0.99,
        "instances": [{"inst": 0, "best_cos": [0.999, 0.998, 0.995, 0.992, 0.999], "n_recovered": 5,
                       "all_recovered": True, "frac_dead": 0.0, "mse": 0.001},
                      {"inst": 1, "best_cos": [0.999, 0.97, 0.995, 0.5, 0.999], "n_recovered": 3,
                       "all_recovered": False, "frac_dead": 0.2, "mse": 0.01}],
    }))
    fig = Figure(figsize=(4, 2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("fixture features")
    fig.savefig(folder / "features.png")
    frames = [Image.new("RGB", (64, 64), (40 * k, 80, 160)) for k in range(3)]
    frames[0].save(folder / "training.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)


def build_fixture(root: Path) -> Path:
    """A checkpoints tree: a tiny random GPT-Neo, standard SAEs of 2 widths (+1 intermediate step), a toy folder."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    root = Path(root)
    model_dir = root / MODEL
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50257, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=128,
                       attention_types=[[["global", "local"], 1]], window_size=32, intermediate_size=64)
    GPTNeoForCausalLM(cfg).save_pretrained(model_dir)
    gpt2_tokenizer().save_pretrained(model_dir)
    bm = load_base_model(str(model_dir))
    meta = {"model_name": MODEL, "hook_name": HOOK, "hf_hidden_states_index": 2, "prepend_bos": False,
            "context_size": 128}
    for i, F in enumerate(WIDTHS):
        sae = build_sae(SAEConfig("standard", 32, F, metadata=meta), seed=i)
        with torch.no_grad():  # each latent fires on ~10% of the stories' tokens, like a trained SAE
            x = torch.cat([residual_at(bm, torch.tensor([bm.tokenizer(t).input_ids]), None, 1)[0] for t in STORIES])
            sae.b_enc.sub_(sae.pre_acts(x).quantile(0.9, dim=0))
        stats = _latent_stats(bm, sae, 1, STORIES)
        folder = sae_folder(root, MODEL, HOOK, "standard", F)
        metrics = {"mse": 0.01 * (i + 1), "variance_explained": 0.8 + 0.05 * i, "l0": 10.0 * (i + 1),
                   "ce_loss_score": 0.9, "metrics_version": 1}

        def extra(tmp: Path, stats=stats, i=i, F=F) -> None:
            stats.save(tmp)
            with (tmp / "loss_curves.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["step", "tokens", "loss", "mse", "sparsity_loss", "aux_loss", "l0", "frac_dead"])
                for s in range(0, 200, 20):
                    w.writerow([s, s * 64, 1 / (s + 1 + i * 5) + 0.1, 0.8 / (s + 1) + 0.05, 0.1, "",
                                F / (s / 20 + 1) + 5, 0.5 / (s + 1)])

        save_sae(sae, folder, metrics=metrics, extra=extra)
        if F == WIDTHS[0]:
            save_sae(sae, step_folder(folder, 100), metrics=metrics, extra=lambda tmp, stats=stats: stats.save(tmp))
    _toy_folder(root / "toy" / "standard-simple")
    return root


# ---------------------------------------------------------------------------------------- app process


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    root = build_fixture(tmp_path_factory.mktemp("ckpts"))
    try:
        log_path = tmp_path_factory.mktemp("log") / "app.log"
        with serve_in_subprocess(["--checkpoints", str(root)], env={"HF_HUB_OFFLINE": "1"}, timeout=60,
                                 log_path=log_path) as url:
            yield url
    except AppStartError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def page(app_url):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(or set CHROMIUM_PATH) to run the browser tests.")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"],
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(20_000)
        pg.goto(app_url)
        yield pg
        browser.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _analyze(page, text: str) -> None:
    box = page.locator("#story textarea")
    box.fill(text)
    page.locator("#analyze-btn").click()


@pytest.mark.e2e
def test_explorer_in_browser(page):
    from playwright.sync_api import expect

    # the first example is analysed on load
    expect(page.locator("#tokens-view .tok").first).to_be_visible(timeout=30_000)
    _shot(page, "01-loaded")

    story = "The little fox found a blue stone. She showed it to her friend the owl."
    _analyze(page, story)
    expect(page.locator("#status-box")).to_contain_text("Analysed", timeout=20_000)
    expect(page.locator("#tokens-view")).to_contain_text("fox")
    n_tokens = page.locator("#tokens-view .tok").count()
    assert n_tokens == len(gpt2_tokenizer()(story).input_ids)
    expect(page.locator("#error-view .tok")).to_have_count(n_tokens)
    metrics = page.locator("#metrics-view")
    expect(metrics).to_contain_text("variance explained")
    expect(metrics).to_contain_text("CE loss score")
    expect(page.locator("#top-latents")).to_contain_text("max act")
    _shot(page, "02-analyzed")

    # switch F: the checkpoint, the metrics and the top-latent table change
    before_metrics = metrics.inner_text()
    before_top = page.locator("#top-latents").inner_text()
    page.locator("#f-radio").get_by_text(str(WIDTHS[0]), exact=True).click()
    expect(page.locator("#status-box")).to_contain_text(f"F={WIDTHS[0]}", timeout=20_000)
    expect(metrics).not_to_have_text(before_metrics)
    assert page.locator("#top-latents").inner_text() != before_top
    expect(page.locator("#tokens-view")).to_contain_text("fox")
    _shot(page, "03-switched-F")

    # an intermediate training step of the same width
    page.locator("#step-dd input").click()
    page.get_by_role("option", name="step 100").click()
    expect(page.locator("#status-box")).to_contain_text("step 100", timeout=20_000)
    page.locator("#step-dd input").click()
    page.get_by_role("option", name="final").click()
    expect(page.locator("#status-box")).to_contain_text("final", timeout=20_000)

    # click a token: the latents firing there are listed
    token = page.locator("#tokens-view .tok", has_text="fox").first
    token.click()
    expect(page.locator("#token-md")).to_contain_text("fox", timeout=20_000)
    expect(page.locator("#token-md")).to_contain_text("latents fire")
    expect(page.locator("#tokens-view .tok.sel")).to_have_count(1)
    expect(page.locator("#token-latents")).to_contain_text("activation")
    _shot(page, "04-token-clicked")

    # click a latent in the top-latents table: its panel (top contexts) shows
    cell = page.locator('#top-latents [data-testid="cell-1-0"]')
    latent = cell.inner_text().strip()
    assert re.fullmatch(r"\d+", latent), latent
    cell.click()
    expect(page.locator("#latent-header")).to_contain_text(f"Latent {latent}", timeout=20_000)
    expect(page.locator("#latent-header")).to_contain_text("held-out tokens")
    expect(page.locator("#latent-contexts .ctx").first).to_be_visible()
    expect(page.locator("#latent-effects")).to_contain_text("promotes")
    page.locator("#latent-header").scroll_into_view_if_needed()
    _shot(page, "05-latent-panel")

    # empty text: a clear error, no stack trace
    _analyze(page, "   ")
    expect(page.locator("#status-box")).to_contain_text("The text is empty", timeout=20_000)
    assert "Traceback" not in page.content()
    _shot(page, "06-empty-error")

    # the compare and toy tabs render
    page.locator("#story textarea").fill(story)
    page.get_by_role("tab", name="Compare widths").click()
    page.locator("#compare-btn").click()
    expect(page.locator("#compare-table")).to_contain_text(str(WIDTHS[1]), timeout=20_000)
    _shot(page, "07-compare")
    page.get_by_role("tab", name="Toy models").click()
    expect(page.get_by_text("Per-instance feature recovery")).to_be_visible()
    _shot(page, "08-toy")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "test-output/fixture-checkpoints")
    if out.exists():
        shutil.rmtree(out)
    print(build_fixture(out))
