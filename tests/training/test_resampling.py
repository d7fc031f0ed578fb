"""training/resampling.py: dead latents revive for every architecture, with and without instances, in both trainers."""

import pytest
import torch

from sae.architectures import REGISTRY, build_sae
from sae.config import SAEConfig
from training.activations import ActivationBuffer
from training.optim import constrained_step, make_adam
from training.resampling import ADAM_POLICIES, resample_dead_latents, reset_adam_state
from training.toy.model import ToyModel, ToyModelConfig
from training.toy.sae_training import ToySAEConfig, train_toy_sae
from training.trainer import MultiSAETrainer
from training.trainer_config import TrainerConfig, activation_scale, build_specs

D_IN, D_SAE = 6, 6  # F = d_in: shapes alone cannot tell W_enc [d_in, F] from W_dec [F, d_in]
ARCHS = sorted(REGISTRY)


def _sae(arch: str, n_inst: int | None):
    extra = {"k": 2} if arch == "topk" else {}
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, n_inst=n_inst, sparsity_coeff=0.01, **extra)
    return build_sae(cfg, seed=0)


def _kill(sae, dead):
    """Make the latents in `dead` never fire (and, for topk, the others always win)."""
    with torch.no_grad():
        bias = sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc
        bias.copy_(torch.where(dead, torch.full_like(bias, -100.0), bias))
        if hasattr(sae, "log_threshold"):  # a stale, large threshold: what keeps a resampled JumpReLU latent dead
            sae.log_threshold.copy_(torch.where(dead, torch.full_like(bias, 3.0), sae.log_threshold))


def _adam_with_moments(sae, x):
    opt = make_adam(sae.parameters(), 1e-3, (0.9, 0.999))
    sae(x).loss.backward()
    constrained_step(sae, opt)
    return opt


@pytest.mark.parametrize("n_inst", [None, 3])
@pytest.mark.parametrize("method", ["simple", "advanced"])
@pytest.mark.parametrize("arch", ARCHS)
def test_resampling_revives_dead_latents(arch, method, n_inst):
    sae = _sae(arch, n_inst)
    inst = () if n_inst is None else (n_inst,)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, *inst, D_IN, generator=gen)  # every direction has inputs it fires on
    dead = torch.zeros(*inst, D_SAE, dtype=torch.bool)
    dead[..., :2] = True
    if n_inst is not None:
        dead[-1] = False  # the last instance is left alone
    opt = _adam_with_moments(sae, x)
    _kill(sae, dead)
    assert (sae.encode(x) > 0).any(0)[dead].sum() == 0
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    done = resample_dead_latents(sae, dead, method, x=x, scale=1.0, gen=gen, opt=opt)
    assert torch.equal(done, dead)
    if n_inst is not None:
        for name, p in sae.named_parameters():
            assert torch.equal(p[-1], before[name][-1]), name
            assert torch.equal(opt.state[p]["exp_avg_sq"][-1], moments[name]["exp_avg_sq"][-1]), name
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(*inst, D_SAE), atol=1e-5)
    if arch == "topk":
        with torch.no_grad():
            sae.b_enc.zero_()  # let the resampled latents compete for the top k on equal terms
    fired = (sae.encode(x) > 0).any(0)
    assert fired[dead].all(), fired
    if arch == "jumprelu":
        assert torch.allclose(sae.threshold[dead], torch.tensor(sae.cfg.init_threshold))
    # Adam state: first moment zeroed along each parameter's latent axis, nothing else touched.
    w_enc_m = opt.state[sae.W_enc]["exp_avg"]
    assert torch.all(w_enc_m.transpose(-1, -2)[dead] == 0)
    assert torch.equal(w_enc_m.transpose(-1, -2)[~dead], moments["W_enc"]["exp_avg"].transpose(-1, -2)[~dead])
    dec_v = opt.state[sae.decoder_param]["exp_avg_sq"]
    assert torch.all(dec_v[dead] > 0)  # "typical": the mean of the other entries, not zero


@pytest.mark.parametrize("policy", ADAM_POLICIES)
def test_adam_policies(policy):
    sae = _sae("standard", 2)
    x = torch.randn(64, 2, D_IN)
    opt = _adam_with_moments(sae, x)
    mask = torch.zeros(2, D_SAE, dtype=torch.bool)
    mask[0, 1] = True
    v = opt.state[sae.b_enc]["exp_avg_sq"]
    others = v[~mask].mean()
    reset_adam_state(opt, sae, mask, policy)
    assert opt.state[sae._W_dec]["exp_avg"][0, 1].abs().sum() == 0
    expected = others if policy == "typical" else torch.tensor(0.0)
    assert torch.allclose(v[0, 1], expected)
    with pytest.raises(ValueError, match="unknown Adam policy"):
        reset_adam_state(opt, sae, mask, "nope")


def test_advanced_resampling_uses_high_loss_inputs():
    sae = build_sae(ToySAEConfig().sae_config(1, 2), seed=0)
    h = torch.zeros(64, 1, 2)
    h[0, 0] = torch.tensor([0.0, 1.0])  # the only input with any reconstruction error worth picking
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # nothing fires: the error is |h|^2
    dead = torch.ones(1, 5, dtype=torch.bool)
    resample_dead_latents(sae, dead, "advanced", x=h, scale=0.5, gen=torch.Generator().manual_seed(0))
    assert torch.allclose(sae.W_dec[0], torch.tensor([0.0, 1.0]).expand(5, 2), atol=1e-6)


@pytest.mark.parametrize("method", ["simple", "advanced"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lm_trainer_resamples_every_architecture(tmp_path, arch, method):
    acts = torch.randn(600, 12, generator=torch.Generator().manual_seed(0)) * 3
    cfg = TrainerConfig(widths=["12"], architectures=[arch], steps=12, batch_size=64, checkpoint_every=0, log_every=2,
                        lr_warmup_steps=2, sparsity_warmup_steps=3, k=3, aux_k=4, dead_window=2, progress=False,
                        resample_every=3, resample_method=method)
    specs = build_specs(cfg, 12, lambda run, f: tmp_path / run / f"F{f}", {"model_name": "test"})
    t = MultiSAETrainer(cfg, specs, ActivationBuffer(acts, cfg.batch_size, seed=0), scale=activation_scale(acts))
    t.train(stop_at=2)  # Adam has moments now
    m = t.members[0]
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    _kill(m.sae, dead)
    m.steps_since_fired.copy_(torch.where(dead, 99, 0))
    before = m.sae.W_dec.detach().clone()
    assert t._resample(m, acts[:64] * t.scale) == 3
    w_dec = m.sae.W_dec.detach()
    assert not torch.equal(w_dec[dead], before[dead]) and torch.equal(w_dec[~dead], before[~dead])
    assert torch.all(m.steps_since_fired[dead] == 0)
    if arch != "topk":
        assert (m.sae.encode(acts * t.scale) > 0).any(0)[dead].all()
    assert torch.all(m.opt.state[m.sae.W_enc]["exp_avg"][:, dead] == 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_toy_trainer_resamples_every_architecture(arch):
    model = ToyModel(ToyModelConfig(n_inst=2, feature_probability=[0.05]))
    cfg = ToySAEConfig(architecture=arch, resample="advanced", steps=40, resample_every=10, resample_window=10,
                       dead_frequency=1.0, log_every=10, snapshot_every=40, chunk=4, batch_size=128)
    run = train_toy_sae(model, cfg)  # dead_frequency 1: every latent counts as dead, so all are resampled
    assert run.log.resample_steps == [10, 20, 30]
    assert run.log.n_resampled.shape == (3, 2) and int(run.log.n_resampled.sum()) > 0
