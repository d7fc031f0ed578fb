"""training/toy/sae_training.py: one batched SAE over every instance."""

from pathlib import Path

import pytest
import torch

from sae.architectures import ARCHITECTURES, build_sae
from tests.helpers import pentagon_model
from training.toy.run_folder import evaluate_toy_sae
from training.toy.sae_training import ToySAEConfig, train_toy_sae

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "checkpoints" / "toy"


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
