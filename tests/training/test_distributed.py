"""Data-parallel training on 2 gloo ranks (real processes, CPU): same weights on every rank, equal to one process."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.checkpoint import load_sae
from tests.training import dist_workers

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, world: int = 2, die_at: int | None = None, timeout_s: float = 60) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "tests.training.dist_workers", str(r), str(world), str(port),
                              str(out), "-" if die_at is None else str(die_at), str(timeout_s)],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True) for r in range(world)]


def test_two_ranks_hold_identical_weights_equal_to_one_process(tmp_path):
    procs = _launch(tmp_path / "two")
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    single = dist_workers.train(str(tmp_path / "one"))
    for folder in single:
        run, f = Path(folder).parts[-2:]
        ranks = [torch.load(tmp_path / "two" / f"{run}_{f}.rank{r}.pt") for r in range(2)]
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), (folder, key)
        one, two = load_sae(folder).effective_weights(), load_sae(tmp_path / "two" / run / f).effective_weights()
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-4, rtol=1e-4), (folder, key)
        assert not (tmp_path / "two" / run / f / "steps").exists()


def test_a_killed_rank_ends_the_run_with_a_clear_error(tmp_path):
    t0 = time.perf_counter()
    procs = _launch(tmp_path / "run", die_at=5, timeout_s=20)
    outputs = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[1].returncode == 17
    assert procs[0].returncode == 3, outputs[0]
    assert "RANKFAILURE rank 0 of 2" in outputs[0] and "--resume" in outputs[0]
    assert time.perf_counter() - t0 < 90


@pytest.mark.slow
def test_torchrun_trains_and_resumes(tmp_path, tiny_cli_inputs):
    model, stories = tiny_cli_inputs
    args = ["--model", str(model), "--data", str(stories), "--out", str(tmp_path), "--device", "cpu", "--threads", "1",
            "--widths", "8", "d", "--architectures", "standard", "topk", "--steps", "6", "--checkpoint-every", "3",
            "--batch-size", "32", "--buffer-size", "128", "--context-size", "32", "--harvest-batch-size", "2",
            "--evaluate", "false", "--progress", "false", "--dist-timeout", "60", "--lr-warmup-steps", "2", "--k", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "training", "tinystories"]
    done = subprocess.run([*torchrun, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    finals = sorted(p.parent for p in tmp_path.glob("*/*/*/F*/sae_weights.safetensors"))
    assert len(finals) == 4
    first = {f: load_sae(f).effective_weights() for f in finals}
    import json

    tc = json.loads((finals[0] / "training_config.json").read_text())
    assert tc["world_size"] == 2 and tc["global_batch_size"] == 32 and tc["per_rank_batch_size"] == 16
    for f in finals:  # as if killed after the step-3 checkpoint: only steps/ is left
        for p in f.iterdir():
            if p.is_file():
                p.unlink()
    torchrun[6] = str(_free_port())
    again = subprocess.run([*torchrun, *args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming all 4 SAEs from step 3" in again.stdout
    for f in finals:
        resumed = load_sae(f).effective_weights()
        assert all(torch.equal(first[f][k], resumed[k]) for k in resumed), f
