import hashlib
import json
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import training.hub as hub
from sae.architectures import build_sae
from sae.checkpoint import sae_folder, save_sae, step_folder
from sae.config import SAEConfig

HOOK = "blocks.1.hook_resid_post"


def _tree(root):
    """Two runs x two widths of final SAEs, one intermediate checkpoint with trainer state, curves."""
    meta = {"model_name": "tinystories-mini", "hook_name": HOOK, "hf_hidden_states_index": 2}
    folders = []
    for run, arch in (("standard", "standard"), ("topk", "topk")):
        for f in (8, 16):
            cfg = SAEConfig(arch, 4, f, k=2 if arch == "topk" else None, metadata=meta)
            folder = sae_folder(root, "tinystories-mini", HOOK, run, f)
            save_sae(build_sae(cfg, seed=1), folder, metrics={"l0": 3.5, "variance_explained": 0.9, "mse": 0.01,
                                                              "ce_loss_score": 0.8, "n_tokens": 1000},
                     training_config={"steps": 10, "tokens_seen": 40960})
            step = save_sae(build_sae(cfg, seed=0), step_folder(folder, 5))
            (step / "trainer_state.json").write_text("{}")
            (step / "trainer_state.safetensors").write_bytes(b"x")
            (folder / "loss_curves.csv").write_text("step,mse\n10,0.01\n")
            folders.append(folder)
        (folders[-1].parent / "loss_curves.png").write_bytes(b"\x89PNG fake")
    (root / "tinystories-mini" / "config.json").write_text('{"model_type": "gpt_neo"}')  # a base model beside
    (root / ".hidden-tmp").mkdir()
    (root / ".hidden-tmp" / "junk").write_text("partial")
    return folders


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dry_run_writes_exact_upload(tmp_path):
    src = tmp_path / "checkpoints"
    folders = _tree(src)
    before = _digest(src)
    out = tmp_path / "upload"
    hub.main(["--repo-id", "someone/tiny-saes", str(src), "--dry-run", str(out)])
    assert _digest(src) == before  # nothing local changed
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {k for k in before if "trainer_state" not in k and not k.startswith(".")} | {"README.md"}
    assert files == expected
    assert "tinystories-mini/blocks.1.hook_resid_post/topk/F16/steps/000000005/sae_weights.safetensors" in files
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["library_name"] == "saelens" and front["datasets"] == ["roneneldan/TinyStories"]
    assert front["license"] == "cdla-sharing-1.0" and front["hook_names"] == [HOOK]
    assert front["model_names"] == ["tinystories-mini"]
    assert "CDLA-Sharing-1.0" in readme and "Eldan" in readme
    for folder in folders:
        assert f"`{folder.relative_to(src).as_posix()}`" in readme
    assert readme.count("| tinystories-mini |") == 4
    assert "![loss curves](tinystories-mini/blocks.1.hook_resid_post/topk/loss_curves.png)" in readme
    # a second dry run into the now non-empty folder refuses
    with pytest.raises(SystemExit):
        hub.main(["--repo-id", "someone/tiny-saes", str(src), "--dry-run", str(out)])


def test_card_names_hub_base_model(tmp_path):
    cfg = SAEConfig("standard", 4, 8, metadata={"model_name": "TinyStories-33M", "hook_name": HOOK,
                                                 "model_hub_id": "roneneldan/TinyStories-33M"})
    save_sae(build_sae(cfg), sae_folder(tmp_path, "TinyStories-33M", HOOK, "standard", 8))
    readme, finals = hub.model_card(tmp_path, "me/x")
    assert len(finals) == 1
    assert yaml.safe_load(readme.split("---\n")[1])["base_model"] == ["roneneldan/TinyStories-33M"]


def test_push_offline_fails_fast_and_clearly(tmp_path, monkeypatch, capsys):
    src = tmp_path / "checkpoints"
    _tree(src)
    before = _digest(src)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like being offline
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        hub.main(["--repo-id", "someone/tiny-saes", str(src)])
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "cannot be reached" in err and "untouched" in err
    assert "hf_secret_token_value" not in err
    assert _digest(src) == before


def test_push_without_token(tmp_path, monkeypatch, capsys):
    src = tmp_path / "checkpoints"
    _tree(src)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(hub, "_token", lambda: None)
    with pytest.raises(SystemExit):
        hub.main(["--repo-id", "someone/tiny-saes", str(src)])
    assert "no Hugging Face token" in capsys.readouterr().err


def test_push_sends_every_file_in_one_commit(tmp_path, monkeypatch):
    src = tmp_path / "checkpoints"
    _tree(src)
    calls = {}

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, repo_id, operations, commit_message):
            calls["paths"] = sorted(op.path_in_repo for op in operations)

    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    plan = hub.plan_upload(src, "someone/tiny-saes")
    assert hub.push(plan, "someone/tiny-saes") == "https://huggingface.co/someone/tiny-saes"
    assert calls["repo"] == ("someone/tiny-saes", False, True) and calls["token"] == "hf_x"
    assert "README.md" in calls["paths"] and len(calls["paths"]) == len(plan.files) + 1
    assert not any("trainer_state" in p or p.startswith(".") for p in calls["paths"])


def test_push_rejects_bad_repo_and_empty_tree(tmp_path, capsys):
    with pytest.raises(SystemExit):
        hub.main(["--repo-id", "no-slash", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        hub.main(["--repo-id", "a/b", str(tmp_path / "empty"), "--dry-run", str(tmp_path / "out")])
    assert "no SAE checkpoint" in capsys.readouterr().err


def test_json_files_copied_verbatim(tmp_path):
    src = tmp_path / "checkpoints"
    folders = _tree(src)
    out = tmp_path / "upload"
    hub.write_dry_run(hub.plan_upload(src, "a/b"), out, src)
    rel = folders[0].relative_to(src)
    assert json.loads((out / rel / "metrics.json").read_text())["l0"] == 3.5
    w_src, w_out = (load_file(str(root / rel / "sae_weights.safetensors")) for root in (src, out))
    assert w_src.keys() == w_out.keys() and all(torch.equal(w_src[k], w_out[k]) for k in w_src)
