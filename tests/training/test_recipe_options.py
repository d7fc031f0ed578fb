"""The training-recipe options: gradient clipping, free decoder with decoder-norm-weighted L1, initial
norms, b_dec init, AuxK details; each in the fast paths and in the autograd path."""

import copy
import json

import pytest
import torch

from sae.architectures import build_sae
from sae.checkpoint import load_sae, read_json
from sae.config import SAEConfig
from training.activations import ActivationBuffer
from training.fast_paths import (
    autograd_loss_and_grads,
    decoder_finetune_loss_and_grads,
    loss_and_grads,
    standard_loss_and_grads,
    topk_loss_and_grads,
)
from training.trainer import MultiSAETrainer
from training.trainer_config import (
    RECIPE_DEFAULTS,
    SMALL_F_TOPK_RATIO,
    TrainerConfig,
    activation_scale,
    build_specs,
)

D = 12


def _acts(n=600, d=D, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


def _perturbed(cfg, seed=1, row_scale=True):
    """A module off its symmetric init; decoder rows of assorted norms (a free decoder's)."""
    sae = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        if row_scale:
            sae.W_dec.mul_(torch.rand(cfg.d_sae, 1, generator=g, dtype=sae.W_dec.dtype) * 2 + 0.2)
    return sae


def _assert_same(fast_sae, ref_sae, fast_out, ref_out):
    for a, b in zip(fast_out[:4], ref_out[:4]):
        assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-14)
    assert torch.equal(fast_out.fire_counts, ref_out.fire_counts)
    for (name, p), (_, q) in zip(fast_sae.named_parameters(), ref_sae.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)


def _trainer(tmp_path, acts, **kw):
    base = dict(widths=["20"], architectures=["standard", "topk"], steps=6, batch_size=64, checkpoint_every=0,
                log_every=2, lr_warmup_steps=2, sparsity_warmup_steps=0, k=3, aux_k=4, dead_window=2, progress=False)
    cfg = TrainerConfig(**{**base, **kw})
    specs = build_specs(cfg, D, lambda run, f: tmp_path / run / f"F{f}", {"model_name": "test"})
    return MultiSAETrainer(cfg, specs, ActivationBuffer(acts, cfg.batch_size), scale=activation_scale(acts),
                           data_mean=acts.mean(0))


# ---------------------------------------------------------------------------------------------- L1 x decoder norm


def test_decoder_norm_l1_equals_its_definition():
    cfg = SAEConfig("standard", D, 40, sparsity_coeff=0.07, dtype="float64", l1_decoder_norm=True)
    sae = _perturbed(cfg)
    x = _acts(96).double()
    out = sae(x)
    f = sae.encode(x)
    expected = 0.07 * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    assert out.losses["L_sparsity"].item() == pytest.approx(expected.item(), rel=1e-12)
    plain = 0.07 * f.sum(-1).mean()
    assert abs(expected.item() - plain.item()) > 1e-3  # the rows are not unit, so the weighting matters
    fast = standard_loss_and_grads(copy.deepcopy(sae), x, 0.07)
    assert fast.sparsity.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("coeff", [0.0, 0.07])
def test_fast_decoder_norm_l1_matches_autograd(coeff):
    cfg = SAEConfig("standard", D, 40, sparsity_coeff=coeff, dtype="float64", l1_decoder_norm=True)
    sae = _perturbed(cfg)
    ref = copy.deepcopy(sae)
    x = _acts(96).double()
    _assert_same(sae, ref, standard_loss_and_grads(sae, x, coeff), autograd_loss_and_grads(ref, x))


# ---------------------------------------------------------------------------------------------- AuxK details


@pytest.mark.parametrize("aux_relu,scale_dead", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("d_sae,n_dead", [(40, 3), (40, 20), (400, 3), (400, 25)])  # dense / sparse backward
def test_fast_topk_auxk_options_match_autograd(aux_relu, scale_dead, d_sae, n_dead):
    cfg = SAEConfig("topk", D, d_sae, k=5, aux_k=6, dtype="float64", aux_relu=aux_relu, aux_scale_dead=scale_dead)
    sae = _perturbed(cfg, row_scale=False)
    ref = copy.deepcopy(sae)
    x = _acts(96).double()
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    fast, slow = topk_loss_and_grads(sae, x, dead), autograd_loss_and_grads(ref, x, dead)
    _assert_same(sae, ref, fast, slow)
    if scale_dead:  # min(n_dead / aux_k, 1) of the unscaled AuxK loss
        plain = topk_loss_and_grads(copy.deepcopy(ref).train(), x, dead)  # a copy: cfg is per module
        unscaled = copy.deepcopy(ref)
        unscaled.cfg = unscaled.cfg.replace(aux_scale_dead=False)
        base = topk_loss_and_grads(unscaled, x, dead).aux.item()
        assert plain.aux.item() == pytest.approx(base * min(n_dead / 6, 1.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------- trainer options


@pytest.mark.parametrize("fast", [True, False])
def test_gradient_clipping_is_applied(tmp_path, fast):
    """The gradient Adam sees has global norm grad_clip_norm / d_in (SAELens's scale) when it was larger."""
    acts = _acts()
    seen: dict[float, list[float]] = {}
    for clip in (0.0, 1e-3):
        t = _trainer(tmp_path / str(clip), acts, fast=fast, grad_clip_norm=clip)
        norms = seen.setdefault(clip, [])
        for m in t.members:
            step = m.opt.step

            def record(*a, _m=m, _step=step, _norms=norms, **kw):
                _norms.append(float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in _m.sae.parameters() if p.grad is not None]))))
                return _step(*a, **kw)

            m.opt.step = record
        t._train_step(t.buffer.next_batch() * t.scale)
    assert all(n * D > 1e-3 * 10 for n in seen[0.0])  # unclipped: far above the bound
    assert seen[1e-3] == pytest.approx([1e-3 / D] * len(seen[1e-3]), rel=1e-4)  # clip_grad_norm_ adds 1e-6


@pytest.mark.parametrize("fast", [True, False])
def test_initial_norms_and_free_decoder(tmp_path, fast):
    acts = _acts()
    t = _trainer(tmp_path, acts, fast=fast, decoder_norm="unit", init_norm=0.25, b_dec_init="zeros",
                 architectures=["standard", "topk", "gated"])
    std, topk, _gated = t.members
    assert not std.spec.cfg.l1_decoder_norm and not topk.spec.cfg.rescale_acts_by_decoder_norm
    for m in t.members:  # unit rows, encoder columns at the initial norm
        torch.testing.assert_close(m.sae.W_dec.norm(dim=-1), torch.ones(20))
        torch.testing.assert_close(m.sae.W_enc.norm(dim=0), torch.full((20,), 0.25))
    assert all(float(m.sae.b_dec.detach().abs().max()) == 0 for m in t.members)
    t.train()
    for m in t.members:  # unit rows stay unit
        torch.testing.assert_close(m.sae.W_dec.norm(dim=-1), torch.ones(20))
    free = _trainer(tmp_path / "free", acts, fast=fast, decoder_norm="free", init_norm=0.25)
    for m in free.members:
        torch.testing.assert_close(m.sae.W_dec.norm(dim=-1), torch.full((20,), 0.25))
    free.train()
    for m in free.members:  # free rows moved off their init norm
        assert float((m.sae.W_dec.detach().norm(dim=-1) - 0.25).abs().max()) > 1e-4


def test_default_recipe_per_architecture(tmp_path):
    """auto / None resolve through RECIPE_DEFAULTS: standard free at 0.1 from the mean, topk free at 0.03 from
    zeros; other architectures unit rows at norm 1 from the mean."""
    acts = _acts()
    t = _trainer(tmp_path, acts, architectures=["standard", "topk", "gated"], k=2)  # k / F below SMALL_F_TOPK_RATIO
    std, topk, gated = t.members
    assert std.spec.cfg.l1_decoder_norm and topk.spec.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(std.sae.W_dec.norm(dim=-1), torch.full((20,), 0.1))
    torch.testing.assert_close(topk.sae.W_dec.norm(dim=-1), torch.full((20,), 0.03))
    torch.testing.assert_close(topk.sae.W_enc.norm(dim=0), torch.full((20,), 0.03))
    torch.testing.assert_close(gated.sae.W_dec.norm(dim=-1), torch.ones(20))
    torch.testing.assert_close(std.sae.b_dec, acts.mean(0) * t.scale)
    torch.testing.assert_close(gated.sae.b_dec, acts.mean(0) * t.scale)
    assert float(topk.sae.b_dec.detach().abs().max()) == 0
    cfg = TrainerConfig()  # SAELens's AuxK (128 = d_in / 2 for tinystories-mini, coeff 1, no ReLU), full weight
    assert (cfg.aux_k, cfg.aux_coeff, cfg.aux_relu, cfg.aux_scale_dead) == (128, 1.0, False, False)


def test_free_decoder_refused_where_not_implemented(tmp_path):
    with pytest.raises(ValueError, match="free"):
        _trainer(tmp_path, _acts(), decoder_norm="free", architectures=["standard", "gated"])
    with pytest.raises(ValueError, match="positive"):
        _trainer(tmp_path, _acts(), init_norm=0.0)


@pytest.mark.parametrize("d_sae,n_dead", [(40, 3), (400, 0), (400, 25)])  # dense / sparse backward
def test_fast_rescaled_topk_matches_autograd(d_sae, n_dead):
    """rescale_acts_by_decoder_norm (TopK with a free decoder): fast path = autograd through the module."""
    cfg = SAEConfig("topk", D, d_sae, k=5, aux_k=6, dtype="float64", rescale_acts_by_decoder_norm=True)
    sae = _perturbed(cfg)
    ref = copy.deepcopy(sae)
    x = _acts(96).double()
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    _assert_same(sae, ref, loss_and_grads(sae, x, 0.0, dead), autograd_loss_and_grads(ref, x, dead))
    # Same function as the unit-row SAE with the norms folded into the encoder.
    folded = build_sae(cfg.replace(rescale_acts_by_decoder_norm=False))
    n = sae.W_dec.norm(dim=-1)
    folded.load_effective_weights({"W_enc": sae.W_enc * n, "b_enc": sae.b_enc * n, "W_dec": sae.W_dec / n[:, None],
                                   "b_dec": sae.b_dec})
    with torch.no_grad():
        torch.testing.assert_close(folded(x).reconstruction, sae(x).reconstruction)


def test_free_topk_saves_folded_unit_rows(tmp_path):
    acts = _acts()
    t = _trainer(tmp_path, acts, architectures=["topk"], decoder_norm="free", init_norm=0.3)
    (m,) = t.members
    assert m.spec.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(m.sae.W_dec.norm(dim=-1), torch.full((20,), 0.3))
    (folder,) = t.train()
    saved = load_sae(folder)
    assert not saved.cfg.rescale_acts_by_decoder_norm
    x = acts[:50]
    with torch.no_grad():
        torch.testing.assert_close(saved(x).reconstruction, m.sae(x * t.scale).reconstruction / t.scale,
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved.W_dec.norm(dim=-1), torch.full((20,), 1 / t.scale), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- decoder fine-tuning


@pytest.mark.parametrize("l1_decoder_norm", [True, False])
def test_fast_decoder_finetune_matches_autograd(l1_decoder_norm):
    """The decoder-only step: reconstruction loss alone, W_dec's gradient alone, fast path = autograd."""
    cfg = SAEConfig("standard", D, 30, sparsity_coeff=0.3, dtype="float64", l1_decoder_norm=l1_decoder_norm)
    sae = _perturbed(cfg)
    ref = copy.deepcopy(sae)
    x = _acts(80).double()
    fast = decoder_finetune_loss_and_grads(sae, x, fast=True)
    slow = decoder_finetune_loss_and_grads(ref, x, fast=False)
    assert fast.loss.item() == pytest.approx(slow.loss.item(), rel=1e-12)
    assert fast.loss.item() == pytest.approx(fast.mse.item()) and fast.sparsity.item() == 0 == slow.sparsity.item()
    assert torch.equal(fast.fire_counts, slow.fire_counts)
    torch.testing.assert_close(sae.W_dec.grad, ref.W_dec.grad, rtol=1e-10, atol=1e-13)
    full = copy.deepcopy(ref)
    autograd_loss_and_grads(full, x, sparsity_coeff=0.0)  # the same decoder gradient as the full step at coeff 0
    torch.testing.assert_close(sae.W_dec.grad, full.W_dec.grad, rtol=1e-10, atol=1e-13)
    for s in (sae, ref):
        assert all(p.grad is None for name, p in s.named_parameters() if p is not s.decoder_param)


@pytest.mark.parametrize("fast", [True, False])
def test_decoder_finetune_phase_freezes_the_latents(tmp_path, fast):
    """In the last fraction of the steps only W_dec moves: the encoder, b_dec and so every latent stay as they
    were, the logged sparsity coefficient is 0, and the reconstruction of the training data improves."""
    acts = _acts()
    t = _trainer(tmp_path, acts, fast=fast, steps=12, decoder_finetune_fraction=0.5, decoder_norm="unit",
                 architectures=["standard", "topk", "gated"], resample_every=2)  # no resampling in the phase
    assert t.finetune_start == [6, 6, 6]
    resampled_at: list[int] = []
    resample = t._resample
    t._resample = lambda m, x: resampled_at.append(t.step) or resample(m, x)
    for _ in range(6):
        t._train_step(t.buffer.next_batch() * t.scale)
    x = acts * t.scale
    start = [{n: p.detach().clone() for n, p in m.sae.named_parameters()} for m in t.members]
    with torch.no_grad():
        before = [m.sae(x) for m in t.members]
    t.train()
    with torch.no_grad():
        after = [m.sae(x) for m in t.members]
    for m, params, b, a in zip(t.members, start, before, after):
        for name, p in m.sae.named_parameters():
            assert torch.equal(p, params[name]) != (p is m.sae.decoder_param), name
        assert torch.equal(a.latents, b.latents)
        assert float(a.losses["L_reconstruction"].sum()) < float(b.losses["L_reconstruction"].sum())
        assert [r["sparsity_coeff"] for r in m.curve][-3:] == [0.0, 0.0, 0.0]
    assert resampled_at == [2] * 3 + [4] * 3  # every 2 steps, but never once the phase has begun


def test_decoder_finetune_resumes_bit_identical(tmp_path):
    acts = _acts()
    kw = dict(steps=12, checkpoint_every=4, decoder_finetune_fraction=0.5, architectures=["standard", "gated"])
    full = _trainer(tmp_path / "a", acts, **kw).train()
    assert _trainer(tmp_path / "b", acts, **kw).train(stop_at=9) == []  # killed in the phase, after step 8
    finals = _trainer(tmp_path / "b", acts, **kw).train(resume=True)
    for a, b in zip(full, finals):
        assert load_sae(a).state_dict().keys() == load_sae(b).state_dict().keys()
        for (name, w), v in zip(load_sae(a).state_dict().items(), load_sae(b).state_dict().values()):
            assert torch.equal(w, v), (a, name)


def test_decoder_finetune_default_and_refusals(tmp_path):
    """auto: standard fine-tunes its decoder over RECIPE_DEFAULTS' fraction, others (and standard without a
    sparsity term) not; asked of a free-decoder
    TopK or a tied SAE (whose latents move with the decoder), it is refused."""
    t = _trainer(tmp_path, _acts(), steps=100, k=2,
                 architectures=["standard", "topk", "gated", "standard-tied", "standard-nosparsity"])
    frac = RECIPE_DEFAULTS["standard"]["decoder_finetune_fraction"]
    assert frac > 0 and t.finetune_start == [100 - int(100 * frac), 100, 100, 100, 100]
    for arch, extra in (("topk", {}), ("standard-tied", {})):
        with pytest.raises(ValueError, match="depend on the decoder"):
            _trainer(tmp_path, _acts(), architectures=[arch], decoder_finetune_fraction=0.1, k=2, **extra)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        _trainer(tmp_path, _acts(), decoder_finetune_fraction=1.0)


# ---------------------------------------------------------------------------------------------- width-dependent recipe


def test_small_f_topk_takes_unit_rows_from_the_mean(tmp_path):
    """TopK with k / F >= SMALL_F_TOPK_RATIO: unit rows, norm 1, b_dec = mean; wider: the free small-norm recipe.
    The resolved recipe is recorded in training_config.json."""
    acts = _acts()
    t = _trainer(tmp_path, acts, architectures=["topk"], widths=["10", "30"], k=3)  # k / F = 0.3, 0.1
    small, wide = t.members
    assert 3 / 10 >= SMALL_F_TOPK_RATIO > 3 / 30
    assert not small.spec.cfg.rescale_acts_by_decoder_norm and wide.spec.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(small.sae.W_dec.norm(dim=-1), torch.ones(10))
    torch.testing.assert_close(small.sae.W_enc.norm(dim=0), torch.ones(10))
    torch.testing.assert_close(small.sae.b_dec, acts.mean(0) * t.scale)
    torch.testing.assert_close(wide.sae.W_dec.norm(dim=-1), torch.full((30,), 0.03))
    assert float(wide.sae.b_dec.detach().abs().max()) == 0
    small_folder, wide_folder = t.train()
    assert read_json(small_folder / "training_config.json")["recipe"] == {
        "decoder_norm": "unit", "init_norm": 1.0, "b_dec_init": "mean", "decoder_finetune_fraction": 0.0}
    assert read_json(wide_folder / "training_config.json")["recipe"]["decoder_norm"] == "free"


def test_resume_refuses_a_recipe_that_today_s_defaults_changed(tmp_path, monkeypatch):
    """A checkpoint trained with a free decoder is not resumed with a unit one because a default moved (new
    checkpoints record the resolved recipe, older ones are read off their SAE config); the flag that keeps the
    checkpoint's recipe resumes it."""
    acts = _acts()
    kw = dict(steps=12, checkpoint_every=4, architectures=["standard"])
    _trainer(tmp_path, acts, **kw).train(stop_at=5)
    monkeypatch.setitem(RECIPE_DEFAULTS, "standard", {**RECIPE_DEFAULTS["standard"], "decoder_norm": "unit"})
    with pytest.raises(ValueError, match="--decoder-norm free"):
        _trainer(tmp_path, acts, **kw).train(resume=True)
    for tc in tmp_path.glob("*/F*/steps/*/training_config.json"):  # as written before the recipe was recorded
        raw = read_json(tc)
        del raw["recipe"]
        tc.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="--decoder-norm free"):
        _trainer(tmp_path, acts, **kw).train(resume=True)
    assert len(_trainer(tmp_path, acts, decoder_norm="free", **kw).train(resume=True)) == 1
