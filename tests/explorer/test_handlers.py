"""The UI's handlers as plain functions (no browser, no Gradio) on a checkpoints tree built here: a tiny
random GPT-Neo, standard SAEs of widths 16 and 32 (one with corrupt latent stats), and one corrupt SAE."""

import shutil

import pytest
import torch
from conftest import save_tiny_gpt_neo

from explorer import handlers as H
from explorer import tool_handlers as T
from explorer.cache import ModelCache
from explorer.catalog import CheckpointCatalog, Source
from explorer.state import Explorer, Sequencer, parse_deep_link
from sae.architectures import build_sae
from sae.checkpoint import WEIGHTS_FILE, sae_folder, save_sae
from sae.config import SAEConfig
from sae.latent_stats import LATENT_STATS_FILE

D = 32
MODEL = "tiny-neo"
HOOK = "blocks.1.hook_resid_post"
STORY = "Once upon a time, there was a little dog named Max. Max liked to run in the park."


def _sae(d_sae: int, seed: int):
    sae = build_sae(SAEConfig("standard", D, d_sae, metadata={"model_name": MODEL, "hook_name": HOOK}), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae.eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    save_tiny_gpt_neo(root / MODEL, hidden=D, layers=2, positions=64)
    for i, f in enumerate((16, 32, 48)):
        save_sae(_sae(f, i), sae_folder(root, MODEL, HOOK, "standard", f))
    (sae_folder(root, MODEL, HOOK, "standard", 32) / LATENT_STATS_FILE).write_bytes(b"not a safetensors file")
    weights = sae_folder(root, MODEL, HOOK, "standard", 48) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:200])  # truncated: a corrupt SAE among good ones
    return root


@pytest.fixture(scope="module")
def ex(root):
    return Explorer(CheckpointCatalog([Source(root, "local")]), [], ModelCache(device="cpu"))


def _analyze(ex, f="32", **kw):
    return H.analyze(ex, kw.pop("text", STORY), MODEL, HOOK, "standard", f, "final", "max", "error", **kw)


def test_one_corrupt_sae_is_listed_with_its_reason(ex, root):
    assert ex.catalog.widths(MODEL, HOOK, "standard") == [16, 32]
    (failure,) = ex.catalog.failures
    assert failure.path == sae_folder(root, MODEL, HOOK, "standard", 48) and "corrupt" in failure.reason
    assert any("F48" in n and "skipped" in n for n in ex.notices) and "F48" in ex.banner()


def test_analyze_outputs(ex):
    out = _analyze(ex)
    assert "Analysed" in out["status"] and H.WARNING not in out
    a, entry = out["state"]
    assert entry.info.d_sae == 32 and out["latent_num"] == int(out["top_df"].iloc[0, 0])
    assert out["tokens_view"].count('class="tok') == a.n_tokens
    assert "variance explained" in out["metrics_view"] and out["timings_json"]["total"] > 0


def test_corrupt_and_missing_latent_stats_say_so(ex):
    corrupt = _analyze(ex, "32")["latent_header"]
    assert "No top contexts" in corrupt and "unreadable" in corrupt
    missing = _analyze(ex, "16")["latent_header"]
    assert "No top contexts" in missing and "no latent_stats.safetensors" in missing


def test_bad_api_input_is_a_message(ex):
    out = _analyze(ex, "999")
    assert "No checkpoint" in out["status"] and "F=999" in out[H.WARNING]
    assert "Whole number" in _analyze(ex, "abc")["status"].replace("whole", "Whole")
    st = _analyze(ex)["state"]
    assert "does not exist" in H.select_latent(ex, 32, st, None, "error")["status"]
    assert "Analyze a text first" in H.select_latent(ex, 1, None, None, "error")["status"]
    assert "empty" in _analyze(ex, text="  ")["status"]
    links = T.links(ex, STORY, MODEL, HOOK, "standard", "32", "final", 40)
    assert "does not exist" in links["links_status"] and "error" in links["links_json"]
    iv = T.run_intervention(ex, STORY, MODEL, HOOK, "standard", "32", "final", -1, "ablate", 0, "all", None, 8,
                            "greedy", 0)
    assert "whole number" in iv["iv_status"]
    iv = T.run_intervention(ex, STORY, MODEL, "blocks.9.hook_resid_post", "standard", "32", "final", 1, "ablate",
                            0, "all", None, 8, "greedy", 0)
    assert "No checkpoint" in iv["iv_status"]
    iv = T.run_intervention(ex, STORY, MODEL, HOOK, "standard", "32", "final", 1, "ablate", 0, "1, x", None, 8,
                            "greedy", 0)
    assert "positions must look like" in iv["iv_status"]


def test_links_handler(ex):
    out = T.links(ex, STORY, MODEL, HOOK, "standard", "32", "final", 3)
    assert H.WARNING not in out, out.get(H.WARNING)
    (width,) = out["links_json"]["widths"]
    assert width["d_sae"] == 16 and len(width["matches"]) == 5 and width["verdict"] in H_VERDICTS
    assert len(width["matches"][0]["acts"]) == len(out["links_json"]["tokens"])
    assert 'data-width="16"' in out["links_view"] and "latent 3" in out["links_view"]


H_VERDICTS = ("close match", "split", "spread", "nothing alike")


def test_intervene_handler(ex):
    out = T.run_intervention(ex, STORY, MODEL, HOOK, "standard", "32", "final", 3, "steer", 30.0, "2-4", 6, 6,
                             "seeded sampling", 1)
    assert H.WARNING not in out, out.get(H.WARNING)
    j = out["iv_json"]
    assert j["edited"] == [2, 3, 4] and j["position"] == 6 and len(j["top_before"]) == 8
    assert j["ce_change"][0] is None and all(abs(v) < 1e-5 for v in j["ce_change"][1:3])  # before the edit
    assert list(out["iv_top_df"].columns) == ["before", "p before", "after", "p after"]
    assert "steered by +30" in out["iv_status"]


def test_parse_positions():
    assert T.parse_positions("all") is None and T.parse_positions("") is None
    assert T.parse_positions("3, 5-7, 3") == (3, 5, 6, 7)


def test_sequencer_drops_the_older_result():
    seq = Sequencer()
    user = seq.begin("s", "analyze", 2)  # the user's analysis reaches the server first ...
    load = seq.begin("s", "analyze", 1)  # ... the page-load one, numbered earlier in the browser, arrives late
    assert seq.is_latest("s", "analyze", user) and not seq.is_latest("s", "analyze", load)
    assert seq.is_latest("other-session", "analyze", 1)
    assert seq.is_latest("s", "analyze", seq.begin("s", "analyze", None))  # API calls without a number: newest


def test_deep_link_restores_text_checkpoint_and_latent(ex):
    params = {"text": "Tom had a big red ball.", "model": MODEL, "hook": HOOK, "run": "standard", "F": "16",
              "latent": "5"}
    out = H.page_load(ex, params, STORY, MODEL, HOOK, "standard", "32", "final", "max", "error")
    assert out["text"] == params["text"] and out["f_radio"].value == "16" and out["latent_num"] == 5
    assert out["state"][0].text == params["text"] and H.WARNING not in out
    bad = H.page_load(ex, {"F": "999", "latent": "x"}, STORY, MODEL, HOOK, "standard", "32", "final", "max", "error")
    assert "F='999'" in bad[H.WARNING] and "latent='x'" in bad[H.WARNING] and bad["f_radio"].value == "32"
    assert parse_deep_link({})[0].text is None


def test_compare_and_selectors(ex):
    out = H.compare(ex, STORY, MODEL, HOOK)
    assert list(out["compare_df"]["F"]) == [16, 32] and "2 checkpoints" in out["compare_status"]
    *_, f, step = H.selectors(ex, MODEL, HOOK, "standard", "48", "final")
    assert f.value == "32" and f.choices == ["16", "32"] and step.value == "final"


def test_app_starts_with_a_corrupt_checkpoint(root, tmp_path):
    from explorer import serve
    from explorer.ui import build_ui

    copy = tmp_path / "ckpts"
    shutil.copytree(root, copy)
    ex = serve.make_explorer(serve.parse_args(["--checkpoints", str(copy), "--device", "cpu"]))
    assert len(ex.catalog.entries) == 2 and len(ex.catalog.failures) == 1
    build_ui(ex)
