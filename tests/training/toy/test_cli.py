"""training/toy/cli.py: `python -m training toy`."""

import json
from pathlib import Path

import pytest

from sae.checkpoint import load_sae
from sae.layout import TOY_LOG_FILE as LOG_FILE
from sae.layout import TOY_MODEL_FILE
from training.toy import cli as toy_cli
from training.toy.model import load_toy_model

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "checkpoints" / "toy"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        toy_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--architecture", "--resample", "--all", "--sparsity-coeff", "--resample-every", "--out"):
        assert flag in text


def test_cli_writes_run_folders(tmp_path):
    out = tmp_path / "toy"
    toy_cli.main(["--architecture", "standard", "topk", "--resample", "simple", "--n-inst", "2",
                  "--toy-steps", "50", "--steps", "120", "--resample-every", "50", "--resample-window", "20",
                  "--snapshot-every", "40", "--eval-batches", "1", "--out", str(out), "--no-progress"])
    for name in ("standard-simple", "topk-simple"):
        folder = out / name
        for f in (TOY_MODEL_FILE, "toy_model.json", "metrics.json", LOG_FILE, "features.png", "training.gif"):
            assert (folder / f).is_file(), f
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["summary"]["n_inst"] == 2 and len(metrics["instances"]) == 2
        assert set(metrics["instances"][0]) >= {"best_cos", "all_recovered", "frac_dead"}
        sae = load_sae(folder / "inst_01")
        assert sae.cfg.metadata["model_name"] == "toy-superposition" and sae.cfg.metadata["instance"] == 1
        assert load_toy_model(folder).cfg.n_inst == 2
        header = (folder / LOG_FILE).read_text().splitlines()[0].split(",")
        assert header[:3] == ["step", "inst", "lr"] and "frac_active" in header
    assert "standard | simple" in (out / "README.md").read_text()
    assert (out / "recovery.png").is_file()
