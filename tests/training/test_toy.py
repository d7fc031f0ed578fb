"""Toy models of superposition and the batched SAE training on them (training/toy.py, toy_cli.py)."""

import json
import math
from pathlib import Path

import pytest
import torch

from sae.architectures import build_sae
from sae.checkpoint import list_checkpoints, load_sae
from sae.config import ARCHITECTURES
from training import toy_cli
from training.toy import (
    LOG_FILE,
    RESAMPLE_METHODS,
    TOY_MODEL_FILE,
    ToyModel,
    ToyModelConfig,
    ToySAEConfig,
    evaluate_toy_sae,
    load_toy_model,
    train_toy_model,
    train_toy_sae,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints" / "toy"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pentagon_model(n_inst: int = 4, p: float = 0.025) -> ToyModel:
    """A toy model whose features already form regular pentagons (what training converges to)."""
    model = ToyModel(ToyModelConfig(n_inst=n_inst, feature_probability=[p]))
    angles = torch.arange(5) * 2 * math.pi / 5 + torch.rand(n_inst, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.W.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 1.15)
    return model


def test_toy_model_trains():
    model = ToyModel(ToyModelConfig(n_inst=4, toy_steps=200, toy_batch_size=128, toy_lr=1e-2))
    curve = train_toy_model(model)
    assert curve.shape == (3, 4)
    assert (curve[-1] < 0.7 * curve[0]).all()


def test_feature_sampling_matches_probability():
    model = ToyModel(ToyModelConfig(n_inst=4, feature_probability=[0.02, 0.05, 0.3, 0.0]))
    gen = torch.Generator().manual_seed(0)
    x = model.sample_features(4, 2048, gen)
    assert x.shape == (4, 2048, 4, 5) and x.min() >= 0 and x.max() < 1
    present = (x > 0).float().mean((0, 1, 3))
    assert torch.allclose(present, torch.tensor([0.02, 0.05, 0.3, 0.0]), atol=0.01)
    assert abs(float(x[x > 0].mean()) - 0.5) < 0.02


def test_compact_batches_match_dense_distribution():
    model = pentagon_model(3, p=0.03)
    gen = torch.Generator().manual_seed(1)
    cb = model.sample_hidden_compact(64, 1024, gen)
    assert torch.allclose(cb.weight.sum(1), torch.full((64, 3), 1024.0), atol=1e-3)
    assert cb.h.shape[1] < 300  # the zero inputs are folded away
    dense = model.sample_hidden(64, 1024, gen)
    w = cb.weight[..., None]
    for f in (lambda h: h, lambda h: h.pow(2), lambda h: (h != 0).any(-1, keepdim=True).float()):
        compact_mean = (f(cb.h) * w).sum((0, 1)) / w.sum((0, 1))
        assert torch.allclose(compact_mean, f(dense).mean((0, 1)), atol=5e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weighted_forward_equals_repeated_rows(arch):
    cfg = ToySAEConfig(architecture=arch, aux_k=2 if arch == "topk" else None)
    sae = build_sae(cfg.sae_config(n_inst=2, d_in=2), seed=0)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 2, 2, generator=gen)
    rows[2] = 0.0
    weight = torch.tensor([[1.0, 2.0], [2.0, 1.0], [5.0, 5.0]])
    # the same inputs written out: row k of instance i repeated weight[k, i] times
    dense = torch.stack([torch.cat([rows[k, i].expand(int(weight[k, i]), 2) for k in range(3)]) for i in range(2)], 1)
    assert dense.shape == (8, 2, 2)
    dead = torch.tensor([[True, False, False, False, True]] * 2)
    ref = sae(dense, dead)
    out = sae(rows, dead, weight=weight, batch_size=8)
    for name in ref.losses:
        assert torch.allclose(out.losses[name], ref.losses[name], atol=1e-6), name
    grads = torch.autograd.grad(ref.loss, list(sae.parameters()))
    for g, g2 in zip(grads, torch.autograd.grad(out.loss, list(sae.parameters()))):
        assert torch.allclose(g, g2, atol=1e-6)


def test_instances_train_independently():
    """Adam, the decoder renormalisation and the loss are per instance: changing one instance's
    weights leaves every other instance's training trajectory bit-for-bit unchanged."""
    model = pentagon_model(3)
    cfg = ToySAEConfig()
    saes = [build_sae(cfg.sae_config(3, 2), seed=0) for _ in range(2)]
    with torch.no_grad():
        saes[1].W_enc[1] += 0.3
        saes[1].b_dec[1] += 0.1
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2, betas=(0.0, 0.999)) for s in saes]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        cb = model.sample_hidden_compact(1, 256, gen)
        for sae, opt in zip(saes, opts):
            sae(cb.h[0], weight=cb.weight[0], batch_size=256).loss.backward()
            sae.remove_parallel_decoder_grad_()
            opt.step()
            opt.zero_grad()
            sae.normalize_decoder_()
    for (name, a), b in zip(saes[0].named_parameters(), saes[1].parameters()):
        for i in (0, 2):
            assert torch.allclose(a[i], b[i], atol=1e-6), (name, i)
        assert not torch.allclose(a[1], b[1]), name


def test_lr_schedules():
    cfg = ToySAEConfig(steps=100, warmup_steps=10, lr_schedule="cosine", decay_start=0.5, min_lr_frac=0.1)
    f = cfg.schedule().factor
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == pytest.approx(1.0) and f(75) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1)
    lin = ToySAEConfig(steps=100, lr_schedule="linear")
    assert lin.schedule().factor(50) == pytest.approx(0.5)
    assert ToySAEConfig().schedule().factor(12345) == 1.0


def test_short_canonical_run_recovers_features():
    model = pentagon_model(8)
    cfg = ToySAEConfig(architecture="standard", resample="advanced", steps=1000, lr=1e-2, resample_every=250,
                       resample_window=100, snapshot_every=500, log_every=100, seed=1)
    run = train_toy_sae(model, cfg)
    ev = evaluate_toy_sae(model, run.sae, n_batches=2)
    assert int(ev.all_recovered.sum()) >= 2, ev.best_cos
    log = run.log
    assert log.steps.tolist()[:2] == [0, 100] and log.steps[-1] == 999
    assert set(log.losses) == {"L_reconstruction", "L_sparsity"}
    assert log.losses["L_reconstruction"].shape == (len(log.steps), 8)
    assert log.frac_active.shape == (len(log.steps), 8, 5) and 0 < float(log.frac_active[-1].mean()) < 0.5
    assert log.W_dec.shape == (3, 8, 5, 2) and log.snapshot_steps.tolist() == [0, 500, 1000]
    assert log.resample_steps == [250, 500, 750]


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


def test_saved_instance_reproduces_batched_sae(tmp_path):
    model = pentagon_model(3)
    cfg = ToySAEConfig(architecture="jumprelu", steps=50, snapshot_every=25)
    run = train_toy_sae(model, cfg)
    ev = evaluate_toy_sae(model, run.sae, n_batches=1)
    from training.toy import save_run

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
