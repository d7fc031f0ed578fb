"""`python -m explorer deploy`: the Space's folder is complete, small, runs on its own, and fails cleanly offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest

from explorer.deploy import PROJECT_ROOT, DeployConfig, plan_space
from explorer.serve import free_port
from explorer.space_card import TORCH_CPU_INDEX, ZEROGPU_PYTHON_VERSIONS, read_front_matter
from explorer.space_files import DeployError, import_graph, served_checkpoint_files
from sae.checkpoint import list_checkpoints
from tests.explorer.hub_standin import HubStandIn

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside with her dog."
SPACE_LIMIT_BYTES = 80_000_000
"""The Space must stay small: the shipped checkpoints are ~40 MB; anything near this limit means junk came along."""
PLAIN_GIT_LIMIT_BYTES = 10 * 1024 * 1024
"""Spaces reject files above 10 MB that are not stored through LFS / Xet."""


SPACE_ARGS = ("--repo-id", "someone/sae-explorer", "--hardware", "cpu-basic", "--hub-sae-repo", "someone/saes")
"""The Space the dry-run and upload tests build: a CPU Space that also serves a Hub repo's SAEs."""


def deploy_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explorer", "deploy", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    """The dry-run folder of SPACE_ARGS, written by the command itself."""
    out = tmp_path_factory.mktemp("space") / "sae-explorer"
    proc = deploy_cli(*SPACE_ARGS, "--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "dry run:" in proc.stdout
    return out


def test_dry_run_holds_exactly_the_planned_files(space):
    plan = plan_space(DeployConfig(repo_id="someone/sae-explorer", hardware="cpu-basic", hub_sae_repo="someone/saes"))
    files = tree(space)
    assert files == set(plan.paths())
    assert {"app.py", "README.md", "requirements.txt", ".gitattributes", "sae/__init__.py"} <= files
    tops = {f.split("/")[0] for f in files}
    assert tops <= {"app.py", "README.md", "requirements.txt", ".gitattributes", "sae", "explorer", "checkpoints"}
    assert not [f for f in files if "__pycache__" in f or "trainer_state" in f or f.endswith((".pyc", "_log.csv"))]
    assert "explorer/deploy.py" not in files  # the deploy command is not part of the app
    total = sum((space / f).stat().st_size for f in files)
    assert 17_000_000 < total < SPACE_LIMIT_BYTES, f"{len(files)} files, {total / 1e6:.1f} MB"


def test_every_served_checkpoint_is_complete(space):
    ckpt = PROJECT_ROOT / "checkpoints"
    lm_saes = [i for i in list_checkpoints(ckpt) if i.path.relative_to(ckpt).parts[0] != "toy"]
    assert lm_saes
    for info in lm_saes:
        rel = info.path.relative_to(PROJECT_ROOT).as_posix()
        for name in ("cfg.json", "sae_weights.safetensors", "metrics.json"):
            if (info.path / name).is_file():
                assert (space / rel / name).is_file(), f"{rel}/{name} missing"
    model = space / "checkpoints" / "tinystories-mini"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model.iterdir()}
    assert not (model / "README.md").exists() and not (model / "train_log.csv").exists()


def test_run_state_and_logs_stay_behind(tmp_path):
    """An SAE folder's resumable trainer state, a model's card and logs, a toy's instances are not shipped."""
    sae_dir = tmp_path / "m" / "blocks.0.hook_resid_post" / "standard" / "F8"
    src = next(i.path for i in list_checkpoints(PROJECT_ROOT / "checkpoints") if i.step is None)
    sae_dir.mkdir(parents=True)
    for name in ("cfg.json", "sae_weights.safetensors", "metrics.json"):
        (sae_dir / name).write_bytes((src / name).read_bytes())
    (sae_dir / "trainer_state.json").write_text("{}")
    (sae_dir / "trainer_state.safetensors").write_bytes(b"x")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt_neo"}))
    (tmp_path / "m" / "README.md").write_text("card")
    (tmp_path / "m" / "train_log.csv").write_text("step\n")
    toy = tmp_path / "toy" / "run"
    (toy / "inst_00").mkdir(parents=True)
    (toy / "features.png").write_bytes(b"png")
    (toy / "training_log.csv").write_text("step\n")
    files, n_saes = served_checkpoint_files(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert n_saes == 1
    assert names == {"m/config.json", "toy/run/features.png",
                     *(f"{sae_dir.relative_to(tmp_path).as_posix()}/{n}"
                       for n in ("cfg.json", "sae_weights.safetensors", "metrics.json"))}


def test_import_graph_follows_the_app_and_refuses_training(tmp_path):
    graph = import_graph(PROJECT_ROOT)
    shipped = {p.relative_to(PROJECT_ROOT).parts[0] for p in graph.modules}
    assert shipped <= {"app.py", "sae", "explorer"}
    assert {"gradio", "torch", "transformers"} <= set(graph.third_party)
    (tmp_path / "app.py").write_text("from pkg import helper\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "helper.py").write_text("def f():\n    from . import lazy\n")
    (tmp_path / "pkg" / "lazy.py").write_text("import numpy\n")
    (tmp_path / "pkg" / "style.css").write_text("body {}\n")
    (tmp_path / "pkg" / "unused.py").write_text("")
    graph = import_graph(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in graph.modules] == [
        "app.py", "pkg/__init__.py", "pkg/helper.py", "pkg/lazy.py"]
    assert graph.data_files == [tmp_path / "pkg" / "style.css"] and graph.third_party == ["numpy"]
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "lazy.py").write_text("import training\n")
    with pytest.raises(DeployError, match="must not depend on training"):
        import_graph(tmp_path)


def test_front_matter_and_requirements_agree_on_gradio(space):
    gradio = version("gradio")
    repo_meta = read_front_matter(PROJECT_ROOT / "README.md")
    assert repo_meta["sdk_version"] == gradio
    assert repo_meta["python_version"] in ZEROGPU_PYTHON_VERSIONS
    assert repo_meta["app_file"] == "app.py" and repo_meta["models"] and repo_meta["datasets"] and repo_meta["tags"]
    meta = read_front_matter(space / "README.md")
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio and meta["app_file"] == "app.py"
    assert meta["python_version"] in ZEROGPU_PYTHON_VERSIONS
    assert {"title", "emoji", "license", "short_description", "models", "datasets", "tags"} <= set(meta)
    reqs = (space / "requirements.txt").read_text().splitlines()
    assert f"gradio=={gradio}" in reqs
    torch_version = version("torch").split("+")[0]
    assert f"--extra-index-url {TORCH_CPU_INDEX}" in reqs and f"torch=={torch_version}+cpu" in reqs


def test_zerogpu_space_gets_cuda_torch_spaces_and_preloads_the_hub_repo():
    plan = plan_space(DeployConfig(repo_id="someone/sae-explorer", hardware="zero-a10g", hub_sae_repo="someone/saes"))
    reqs = plan.generated["requirements.txt"].splitlines()
    assert f"torch=={version('torch').split('+')[0]}" in reqs and "spaces" in reqs
    assert not any("extra-index-url" in r for r in reqs)
    readme = plan.generated["README.md"]
    assert "preload_from_hub:\n- someone/saes" in readme and "- someone/saes" in readme.split("preload_from_hub")[0]
    with pytest.raises(DeployError, match="unknown --hardware"):
        plan_space(DeployConfig(repo_id="someone/sae-explorer", hardware="a-big-gpu"))


def test_binaries_over_10mb_and_every_image_or_weight_go_through_lfs():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    paths = [p for p in files.decode().split("\0") if p]
    big_binaries = [p for p in paths if (PROJECT_ROOT / p).is_file()
                    and (PROJECT_ROOT / p).stat().st_size > PLAIN_GIT_LIMIT_BYTES
                    and b"\0" in (PROJECT_ROOT / p).read_bytes()[:8192]]
    typed = [p for p in paths if p.endswith((".safetensors", ".png", ".gif"))]
    assert typed  # the shipped weights, plots and animations
    attrs = subprocess.run(["git", "check-attr", "filter", "--stdin", "-z"], cwd=PROJECT_ROOT, capture_output=True,
                           check=True, input="\0".join(big_binaries + typed).encode()).stdout.decode().split("\0")
    uncovered = [attrs[i] for i in range(0, len(attrs) - 2, 3) if attrs[i + 2] != "lfs"]
    assert not uncovered, f"not routed through LFS by .gitattributes: {uncovered[:5]}"


def test_the_space_folder_runs_on_its_own(space):
    """A separate process in the Space folder alone (no repository on its path) serves the app; analyse a story."""
    from gradio_client import Client

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", SAE_HUB_REPOS="", HF_HUB_OFFLINE="1",
               no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    probe = "import importlib.util as u, sys; sys.exit(bool(u.find_spec('training')))"
    assert subprocess.run([sys.executable, "-s", "-c", probe], cwd=space, env=env).returncode == 0, \
        "the repository's training package is importable from the Space folder"
    port = free_port()
    log_path = space.parent / "app.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-s", "app.py", "--port", str(port), "--host", "127.0.0.1",
                                 "--threads", "1"], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"the Space's app exited:\n{log_path.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=2).read(100)
                break
            except OSError:
                assert time.time() < deadline, f"the Space's app did not start:\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
        client = Client(url, verbose=False)
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/analyze"]["parameters"]
        story_param = next(p["parameter_name"] for p in params if p["component"] == "Textbox")
        out = client.predict(api_name="/analyze", **{story_param: STORY})  # the other inputs keep their defaults
    finally:
        proc.terminate()
        proc.wait(20)
    status = next(o for o in out if isinstance(o, str) and o.startswith("Analysed"))
    assert "tinystories-mini" in status, status
    timings = next(o for o in out if isinstance(o, dict) and "model_forward" in o)
    assert timings["total"] > 0
    top = next(o for o in out if isinstance(o, dict) and o.get("headers", [])[:2] == ["latent", "max act"])
    assert len(top["data"]) > 0, "no latent fired on the story"


def test_offline_upload_fails_fast_and_clearly(space):
    """A Hub that does not answer: a clear error within seconds, exit code 1, nothing written locally."""
    before = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = deploy_cli("--repo-id", "someone/sae-explorer", "--hub-timeout", "2", timeout=60,  # a hang fails
                      env={"HF_ENDPOINT": dead, "HF_TOKEN": "hf_secret_value_for_the_test"})
    assert proc.returncode == 1
    assert "cannot be reached" in proc.stderr and "Local files are untouched" in proc.stderr
    assert "hf_secret_value_for_the_test" not in proc.stdout + proc.stderr
    after = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout
    assert after == before


def test_upload_sends_exactly_the_dry_run_through_the_real_client(space):
    """The real `huggingface_hub` client and a stand-in Hub on 127.0.0.1: the dry run's bytes go up, stale files go."""
    token = "hf_secret_value_for_the_test"
    with HubStandIn() as hub:
        hub.state.files["old_module.py"] = b"left by an earlier deploy"
        proc = deploy_cli(*SPACE_ARGS, timeout=300,
                          env={"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert token not in proc.stdout + proc.stderr
    state = hub.state
    assert state.repos["someone/sae-explorer"]["type"] == "space"
    assert state.repos["someone/sae-explorer"]["sdk"] == "gradio"
    assert len(state.commits) == 1 and state.hardware == "cpu-basic"
    assert state.variables == {"SAE_HUB_REPOS": "someone/saes"}
    assert set(state.files) == tree(space)
    different = [p for p, data in state.files.items() if data != (space / p).read_bytes()]
    assert not different, different[:5]
    assert state.lfs, "no file went through LFS"
    assert state.auth == {f"Bearer {token}"}
    assert state.validated and state.validated[-1]["sdk_version"] == version("gradio")
