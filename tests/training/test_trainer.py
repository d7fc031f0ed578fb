import copy
import csv
import json

import pytest
import torch

import training.trainer as trainer_mod
from sae.architectures import build_sae
from sae.checkpoint import load_sae, step_folder
from sae.config import SAEConfig
from training.activations import ActivationBuffer
from training.fast_paths import autograd_loss_and_grads, standard_loss_and_grads, topk_loss_and_grads
from training.loss_curves import CURVES_FILE
from training.trainer import MultiSAETrainer
from training.trainer_config import TrainerConfig, activation_scale, build_specs, lr_at, parse_width
from training.trainer_state import resumable_steps

D = 12


def _acts(n=600, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + 0.5


def _cfg(**kw):
    base = dict(widths=["6", "d", "20"], architectures=["standard", "topk"], steps=12, batch_size=64,
                checkpoint_every=0, log_every=2, lr_warmup_steps=2, sparsity_warmup_steps=3, k=3, aux_k=4,
                dead_window=2, progress=False)
    base.update(kw)
    return TrainerConfig(**base)


def _trainer(tmp_path, cfg, acts, scale=None):
    specs = build_specs(cfg, acts.shape[1], lambda run, f: tmp_path / run / f"F{f}", {"model_name": "test"})
    buf = ActivationBuffer(acts, cfg.batch_size, seed=cfg.seed)
    return MultiSAETrainer(cfg, specs, buf, scale=activation_scale(acts) if scale is None else scale,
                           data_mean=acts.mean(0))


def _weights(folder):
    return {k: v.clone() for k, v in load_sae(folder).effective_weights().items()}


# ---------------------------------------------------------------------------------------------- config


def test_parse_width():
    assert [parse_width(w, 768) for w in ["100", "d-1", "d", "1000", "4d", "2d+1"]] == [100, 767, 768, 1000, 3072, 1537]
    for bad in ["", "x", "-5", "d-768", "5+1"]:
        with pytest.raises(ValueError):
            parse_width(bad, 768)


def test_lr_schedule():
    cfg = TrainerConfig(steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == 1.0 and lr_at(cfg, 50) == 1.0
    assert lr_at(cfg, 90) == pytest.approx(0.5) and lr_at(cfg, 99) == pytest.approx(0.05)


def test_specs_and_variants(tmp_path):
    cfg = _cfg(architectures=["standard", "standard-nosparsity", "topk"], widths=["5", "d-1", "d", "40"])
    specs = build_specs(cfg, D, lambda r, f: tmp_path / r / f"F{f}", {})
    assert [(s.run, s.cfg.d_sae) for s in specs][:4] == [("standard", 5), ("standard", 11), ("standard", 12),
                                                         ("standard", 40)]
    nosp = [s for s in specs if s.run == "standard-nosparsity"]
    assert nosp and all(s.cfg.sparsity_coeff == 0 and s.cfg.architecture == "standard" for s in nosp)
    assert all(s.cfg.sparsity_coeff == pytest.approx(2.0 / D) for s in specs if s.run == "standard")
    assert all(s.cfg.k == 3 for s in specs if s.run == "topk")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_specs(_cfg(architectures=["nope"]), D, lambda r, f: tmp_path, {})


# ---------------------------------------------------------------------------------------------- fast paths


def _perturbed(cfg, seed=1):
    sae = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return sae


def _assert_same(fast_sae, ref_sae, fast_out, ref_out):
    assert fast_out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-12, abs=1e-14)
    assert fast_out.mse.item() == pytest.approx(ref_out.mse.item(), rel=1e-12)
    assert fast_out.sparsity.item() == pytest.approx(ref_out.sparsity.item(), rel=1e-12, abs=1e-14)
    assert fast_out.aux.item() == pytest.approx(ref_out.aux.item(), rel=1e-12, abs=1e-14)
    assert torch.equal(fast_out.fire_counts, ref_out.fire_counts)
    for (name, p), (_, q) in zip(fast_sae.named_parameters(), ref_sae.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("coeff", [0.0, 0.07])
def test_fast_standard_matches_library(coeff):
    cfg = SAEConfig("standard", D, 40, sparsity_coeff=coeff, dtype="float64")
    sae = _perturbed(cfg)
    ref = copy.deepcopy(sae)
    x = _acts(96).double()
    _assert_same(sae, ref, standard_loss_and_grads(sae, x, coeff), autograd_loss_and_grads(ref, x))


@pytest.mark.parametrize("aux_k,n_dead", [(None, 10), (6, 0), (6, 3), (6, 20), (100, 25)])
@pytest.mark.parametrize("d_sae", [40, 400])  # (k + aux) * DENSE_TOPK_RATIO >= F: dense backward, else sparse
def test_fast_topk_matches_library(aux_k, n_dead, d_sae):
    cfg = SAEConfig("topk", D, d_sae, k=5, aux_k=aux_k, dtype="float64")
    sae = _perturbed(cfg)
    ref = copy.deepcopy(sae)
    x = _acts(96).double()
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    _assert_same(sae, ref, topk_loss_and_grads(sae, x, dead), autograd_loss_and_grads(ref, x, dead))


def test_fast_path_training_matches_autograd_training(tmp_path):
    acts = _acts()
    fast = _trainer(tmp_path / "fast", _cfg(), acts)
    slow = _trainer(tmp_path / "slow", _cfg(fast=False), acts)
    for a, b in zip(fast.train(), slow.train()):
        for name, w in _weights(a).items():
            torch.testing.assert_close(w, _weights(b)[name], rtol=1e-4, atol=1e-5, msg=f"{a} {name}")


# ---------------------------------------------------------------------------------------------- training


def test_each_sae_trains_independently(tmp_path):
    """An SAE trained in a group of widths and architectures ends bit-identical to it trained alone."""
    acts = _acts()
    cfg = _cfg(architectures=["standard", "topk", "gated"], resample_every=5)
    group = _trainer(tmp_path / "group", cfg, acts).train()
    alone_cfg = _cfg(architectures=["topk"], widths=["d"], resample_every=5)
    (alone,) = _trainer(tmp_path / "alone", alone_cfg, acts).train()
    (same,) = [f for f in group if f.parent.name == "topk" and f.name == f"F{D}"]
    for name, w in _weights(alone).items():
        assert torch.equal(w, _weights(same)[name]), name
    # ... and training changed every SAE away from its initialisation
    for folder in group:
        init = build_sae(load_sae(folder).cfg.replace(d_in=D), seed=0)
        assert not torch.equal(init.W_enc, load_sae(folder).W_enc)


def test_outputs_and_curves(tmp_path):
    acts = _acts()
    finals = _trainer(tmp_path, _cfg(), acts).train()
    assert len(finals) == 6
    for folder in finals:
        names = {p.name for p in folder.iterdir()}
        assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "training_config.json",
                CURVES_FILE} <= names
        tc = json.loads((folder / "training_config.json").read_text())
        assert tc["steps"] == 12 and tc["tokens_seen"] == 12 * 64 and tc["seed"] == 0 and tc["completed"]
        assert "torch" in tc["library_versions"] and tc["trainer"]["batch_size"] == 64
        rows = list(csv.DictReader((folder / CURVES_FILE).open()))
        assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
        assert all(float(r["mse"]) > 0 and 0 <= float(r["frac_dead"]) <= 1 for r in rows)
    for run in ("standard", "topk"):
        assert (tmp_path / run / "loss_curves.png").stat().st_size > 1000
        rows = list(csv.DictReader((tmp_path / run / "loss_curves.csv").open()))
        assert {r["d_sae"] for r in rows} == {"6", "12", "20"}


def test_activation_scale_is_folded(tmp_path):
    """The saved SAE reads raw activations: it equals the trained module on scaled inputs, scaled back
    (a free decoder's row norms folded into the latents)."""
    acts = _acts() * 10
    scale = activation_scale(acts)
    assert scale == pytest.approx((D / acts.pow(2).sum(-1).mean()).sqrt().item(), rel=1e-5)
    t = _trainer(tmp_path, _cfg(widths=["20"]), acts)
    finals = t.train()
    x = acts[:50]
    for member, folder in zip(t.members, finals):
        saved = load_sae(folder)
        with torch.no_grad():
            inner = member.sae(x * scale)
            outer = saved(x)
        norms = member.sae.W_dec.norm(dim=-1) if member.spec.cfg.l1_decoder_norm else torch.ones(20)
        torch.testing.assert_close(outer.latents, inner.latents * norms, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outer.reconstruction, inner.reconstruction / scale, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(saved.W_dec.norm(dim=-1), torch.full((20,), 1 / scale), rtol=1e-5, atol=1e-5)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    acts = _acts()
    cfg = _cfg(checkpoint_every=4, resample_every=5, architectures=["standard", "topk", "jumprelu"])
    full = _trainer(tmp_path / "a", cfg, acts).train()
    crashed = _trainer(tmp_path / "b", cfg, acts)
    assert crashed.train(stop_at=6) == []  # "killed" after step 6: the newest checkpoint is step 4
    assert resumable_steps(tmp_path / "b" / "topk" / "F20") == [4]
    resumed = _trainer(tmp_path / "b", cfg, acts)
    assert resumed.resume() == 4
    resumed = _trainer(tmp_path / "b", cfg, acts)
    finals = resumed.train(resume=True)
    for a, b in zip(full, finals):
        for name, w in _weights(a).items():
            assert torch.equal(w, _weights(b)[name]), (a, name)
        assert (a / CURVES_FILE).read_text() == (b / CURVES_FILE).read_text()
    # resuming a finished run changes nothing
    stamp = [(f / "sae_weights.safetensors").stat().st_mtime_ns for f in finals]
    assert _trainer(tmp_path / "b", cfg, acts).train(resume=True) == finals
    assert stamp == [(f / "sae_weights.safetensors").stat().st_mtime_ns for f in finals]
    # intermediate checkpoints: full SAE folders; only the newest keeps the resumable state
    steps_dir = full[0] / "steps"
    assert sorted(p.name for p in steps_dir.iterdir()) == ["000000004", "000000008"]
    assert resumable_steps(full[0]) == [8]
    assert load_sae(step_folder(full[0], 4)).cfg.d_sae == 6


def test_resume_refuses_changed_settings(tmp_path):
    acts = _acts()
    _trainer(tmp_path, _cfg(checkpoint_every=4), acts).train(stop_at=5)
    with pytest.raises(ValueError, match="settings differ"):
        _trainer(tmp_path, _cfg(checkpoint_every=4, lr=1e-2), acts).train(resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(tmp_path, _cfg(checkpoint_every=4), acts).train()
    assert len(_trainer(tmp_path, _cfg(checkpoint_every=4), acts).train(overwrite=True)) == 6


def test_resume_of_a_checkpoint_predating_recipe_fields_needs_their_old_values(tmp_path):
    """A checkpoint written before grad_clip_norm / adam_eps existed trained without clipping and with
    epsilon 1e-8 on the per-element loss: today's defaults would change its recipe mid-run, so they are
    refused with the flags that reproduce it, and those flags resume it."""
    acts = _acts()
    _trainer(tmp_path, _cfg(checkpoint_every=4), acts).train(stop_at=5)
    for state in tmp_path.glob("*/F*/steps/*/trainer_state.json"):
        meta = json.loads(state.read_text())
        for name in ("grad_clip_norm", "adam_eps", "init_norm"):
            del meta["trainer"][name]
        state.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"--grad-clip-norm 0\.0") as err:
        _trainer(tmp_path, _cfg(checkpoint_every=4), acts).train(resume=True)
    assert f"--adam-eps {1e-8 * D}" in str(err.value) and "--init-norm" in str(err.value)
    old = _cfg(checkpoint_every=4, grad_clip_norm=0.0, adam_eps=1e-8 * D, init_norm=1.0)
    assert len(_trainer(tmp_path, old, acts).train(resume=True)) == 6


def test_adam_epsilon_is_on_the_summed_loss_scale(tmp_path):
    """Our loss is SAELens's / d_in, so the optimizer's epsilon is adam_eps / d_in."""
    trainer = _trainer(tmp_path, _cfg(adam_eps=3e-7), _acts())
    for m in trainer.members:
        assert m.opt.param_groups[0]["eps"] == pytest.approx(3e-7 / D)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    acts = _acts()
    t = _trainer(tmp_path, _cfg(checkpoint_every=4, widths=["6"], architectures=["standard"]), acts)
    calls = []

    def failing_save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(trainer_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        t.train()
    assert calls  # it failed in the middle of writing the step-4 folder
    steps_dir = tmp_path / "standard" / "F6" / "steps"
    assert not steps_dir.exists() or list(steps_dir.iterdir()) == []
    assert not (tmp_path / "standard" / "F6" / "cfg.json").exists()


@pytest.mark.parametrize("fast", [True, False])
def test_checkpoint_during_sparsity_warmup_records_configured_coefficient(tmp_path, fast):
    """The warm-up coefficient is passed to each step; it never reaches the SAE's config or its cfg.json."""
    acts = _acts()
    cfg = _cfg(widths=["6"], architectures=["standard", "gated", "jumprelu"], sparsity_warmup_steps=10,
               checkpoint_every=4, fast=fast)
    t = _trainer(tmp_path, cfg, acts)
    t.train(stop_at=4)
    for m in t.members:
        assert m.spec.cfg.sparsity_coeff > 0
        assert m.sae.cfg.sparsity_coeff == m.spec.cfg.sparsity_coeff
        saved = load_sae(step_folder(m.spec.folder, 4)).cfg
        assert saved.sparsity_coeff == pytest.approx(m.spec.cfg.sparsity_coeff), m.label
        assert m.curve[-1]["sparsity_coeff"] == pytest.approx(m.spec.cfg.sparsity_coeff * 4 / 10)
