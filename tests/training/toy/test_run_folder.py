"""training/toy/run_folder.py: evaluation, run folders, the shipped toy checkpoints."""

import json
from pathlib import Path

import torch

from sae.architectures import ARCHITECTURES
from sae.checkpoint import list_checkpoints, load_sae
from tests.helpers import pentagon_model
from training.toy.model import load_toy_model
from training.toy.run_folder import evaluate_toy_sae, save_run
from training.toy.sae_training import RESAMPLE_METHODS, ToySAEConfig, train_toy_sae

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "checkpoints" / "toy"


def test_saved_instance_reproduces_batched_sae(tmp_path):
    model = pentagon_model(3)
    cfg = ToySAEConfig(architecture="jumprelu", steps=50, snapshot_every=25)
    run = train_toy_sae(model, cfg)
    ev = evaluate_toy_sae(model, run.sae, n_batches=1)
    save_run(tmp_path / "run", model, cfg, run, ev, pictures=False)
    h = model.sample_hidden(1, 64, torch.Generator().manual_seed(3))[0]
    with torch.no_grad():
        ref = run.sae(h)
        for i in range(3):
            out = load_sae(tmp_path / "run" / f"inst_{i:02d}")(h[:, i])
            assert torch.allclose(out.latents, ref.latents[:, i], atol=1e-6)
            assert torch.allclose(out.reconstruction, ref.reconstruction[:, i], atol=1e-6)


def test_shipped_checkpoints_load():
    runs = sorted(p for p in SHIPPED.glob("*-*") if p.is_dir())
    expected = {f"{a}-{m}" for a in ARCHITECTURES for m in RESAMPLE_METHODS}
    assert {p.name for p in runs} == expected
    total = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert total < 8 * 2**20, f"checkpoints/toy is {total / 2**20:.1f} MiB"
    infos = [i for i in list_checkpoints(SHIPPED) if i.model_name == "toy-superposition"]
    assert len(infos) == 16 * len(expected)
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["summary"]["n_inst"] == 16 and len(metrics["instances"]) == 16
        assert (run / "training.gif").stat().st_size < 2 * 2**20
        model = load_toy_model(run)
        h = model.sample_hidden(1, 32, torch.Generator().manual_seed(0))[0]
        for inst in (0, 15):
            sae = load_sae(run / f"inst_{inst:02d}")
            assert sae.cfg.architecture == metrics["architecture"] and sae.cfg.d_in == 2 and sae.cfg.d_sae == 5
            assert sae(h[:, inst]).reconstruction.shape == (32, 2)


def test_reevaluate_run_rewrites_metrics(tmp_path):
    from training.toy.run_folder import reevaluate_run

    model = pentagon_model(3)
    cfg = ToySAEConfig(architecture="gated", steps=60, snapshot_every=30, eval_batches=1, batch_size=256)
    run = train_toy_sae(model, cfg)
    ev = evaluate_toy_sae(model, run.sae, cfg.eval_batches, cfg.batch_size)
    folder = save_run(tmp_path / "run", model, cfg, run, ev, pictures=False)
    written = json.loads((folder / "metrics.json").read_text())
    stale = {**written, "metrics_version": 1, "instances": [{**i, "cossim": 0.01} for i in written["instances"]]}
    (folder / "metrics.json").write_text(json.dumps(stale))
    (folder / "inst_01" / "metrics.json").write_text("{}")
    new = reevaluate_run(folder)
    assert new == written == json.loads((folder / "metrics.json").read_text())
    assert json.loads((folder / "inst_01" / "metrics.json").read_text()) == written["instances"][1]
    assert written["instances"][0]["n_zero_norm_inputs"] > 0
