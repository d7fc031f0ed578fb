"""Invariants every SAE architecture keeps (in the spirit of dictionary_learning's tests), with and without
an instance dimension, plus checkpoint round trips, loader errors and SAELens-written folders."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.architectures import ARCHITECTURES, build_sae
from sae.architectures.base import matmul_inst
from sae.checkpoint import CFG_FILE, WEIGHTS_FILE, CheckpointError, load_sae, save_sae
from sae.config import SAEConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "examples" / "saelens-format"
INSTS = [None, 3]
D_IN, D_SAE = 6, 10


def make(arch: str, n_inst: int | None = None, seed: int = 0, **kw):
    defaults = {"sparsity_coeff": 0.1, "k": 3 if arch == "topk" else None, "init_threshold": 0.05}
    cfg = SAEConfig(arch, d_in=D_IN, d_sae=D_SAE, n_inst=n_inst, **{**defaults, **kw})
    sae = build_sae(cfg, seed=seed)
    with torch.no_grad():  # move off the symmetric init so every parameter matters
        gen = torch.Generator().manual_seed(seed + 100)
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return sae


def batch(n_inst: int | None, n: int = 32, seed: int = 1) -> torch.Tensor:
    shape = (n, D_IN) if n_inst is None else (n, n_inst, D_IN)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_matmul_inst_matches_einsum():
    gen = torch.Generator().manual_seed(0)
    for n, a, b in [(16, 2, 5), (3, 4, 7), (100, 8, 16)]:  # block-diagonal path and einsum path
        x, w = torch.randn(9, n, a, generator=gen), torch.randn(n, a, b, generator=gen)
        assert torch.allclose(matmul_inst(x, w), torch.einsum("nia,iab->nib", x, w), atol=1e-5)


@pytest.mark.parametrize("n_inst", INSTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_is_encode_then_decode(arch, n_inst):
    sae = make(arch, n_inst)
    x = batch(n_inst)
    out = sae(x)
    lead = x.shape[:-1]
    assert out.latents.shape == (*lead, D_SAE) and out.reconstruction.shape == x.shape
    assert torch.allclose(out.latents, sae.encode(x))
    assert torch.allclose(out.reconstruction, sae.decode(sae.encode(x)), atol=1e-6)
    assert (out.latents >= 0).all()


@pytest.mark.parametrize("n_inst", INSTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_terms_match_direct_computation(arch, n_inst):
    aux = {"aux_k": 4} if arch == "topk" else {}
    sae = make(arch, n_inst, **aux)
    x = batch(n_inst)
    dead = torch.zeros(*sae.inst_shape, D_SAE, dtype=torch.bool)
    dead[..., :5] = True
    out = sae(x, dead_mask=dead)
    inst = () if n_inst is None else (n_inst,)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = f @ sae.W_dec if n_inst is None else torch.einsum("nif,ifd->nid", f, sae.W_dec)
        x_hat = x_hat + sae.b_dec
        expected = {"L_reconstruction": (x_hat - x).pow(2).mean(-1).mean(0)}
        coeff = sae.cfg.sparsity_coeff
        if arch == "standard":
            expected["L_sparsity"] = coeff * f.abs().sum(-1).mean(0)
        elif arch == "gated":
            gate = torch.relu(sae.pre_acts(x) + sae.b_gate)
            via_gate = (gate @ sae.W_dec if n_inst is None else torch.einsum("nif,ifd->nid", gate, sae.W_dec))
            expected["L_sparsity"] = coeff * gate.sum(-1).mean(0)
            expected["L_aux"] = (via_gate + sae.b_dec - x).pow(2).mean(-1).mean(0)
        elif arch == "jumprelu":
            expected["L_sparsity"] = coeff * (sae.pre_acts(x) > sae.threshold).float().sum(-1).mean(0)
        elif arch == "topk":
            pre = sae.pre_acts(x).masked_fill(~dead, float("-inf"))
            vals, idx = pre.topk(4, dim=-1)
            aux_f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            aux_recon = aux_f @ sae.W_dec if n_inst is None else torch.einsum("nif,ifd->nid", aux_f, sae.W_dec)
            expected["L_aux"] = sae.cfg.aux_coeff * (aux_recon - (x - x_hat)).pow(2).mean(-1).mean(0)
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        assert out.losses[name].shape == inst, name
        assert torch.allclose(out.losses[name], value, atol=1e-5), name
    assert torch.allclose(out.loss, sum(expected.values()).sum(), atol=1e-5)


@pytest.mark.parametrize("n_inst", INSTS)
def test_tied_weights(tmp_path, n_inst):
    sae = make("standard", n_inst, tied=True)
    assert sae.W_dec.data_ptr() == sae.W_enc.data_ptr()
    assert torch.equal(sae.W_dec, sae.W_enc.transpose(-1, -2))
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "b_dec"}
    x = batch(n_inst)
    sae(x).losses["L_reconstruction"].sum().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    folder = save_sae(sae, tmp_path / "tied", inst=None if n_inst is None else 1)
    saved = load_file(str(folder / WEIGHTS_FILE))
    expected = sae.W_enc.detach().transpose(-1, -2)
    assert torch.equal(saved["W_dec"], expected if n_inst is None else expected[1])
    loaded = load_sae(folder)
    xi = x if n_inst is None else x[:, 1]
    ref = sae.encode(x) if n_inst is None else sae.encode(x)[:, 1]
    assert torch.allclose(loaded.encode(xi), ref, atol=1e-6)


@pytest.mark.parametrize("n_inst", INSTS)
@pytest.mark.parametrize(("arch", "tied"), [(a, False) for a in ARCHITECTURES] + [("standard", True)])
def test_decoder_unit_norm_after_steps(arch, n_inst, tied):
    sae = make(arch, n_inst, tied=tied)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for step in range(5):
        sae(batch(n_inst, seed=step)).loss.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder_()
    norms = sae.W_dec.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_remove_parallel_decoder_grad_leaves_only_tangential_part():
    sae = make("standard", 3)
    sae(batch(3)).loss.backward()
    sae.remove_parallel_decoder_grad_()
    radial = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1) / sae.W_dec.detach().norm(dim=-1)
    assert radial.abs().max() < 1e-6


@pytest.mark.parametrize("n_inst", INSTS)
def test_jumprelu_threshold_gets_gradient(n_inst):
    sae = make("jumprelu", n_inst, ste_epsilon=0.5, init_threshold=0.3)
    out = sae(batch(n_inst) * 0.5)
    out.loss.backward()
    assert sae.log_threshold.grad is not None
    assert sae.log_threshold.grad.abs().sum() > 0
    # The L0 term alone pushes thresholds up (negative gradient on log_threshold).
    sae.zero_grad()
    sae(batch(n_inst) * 0.5).losses["L_sparsity"].sum().backward()
    assert (sae.log_threshold.grad <= 0).all() and (sae.log_threshold.grad < 0).any()


@pytest.mark.parametrize("n_inst", INSTS)
def test_topk_keeps_at_most_k(n_inst):
    sae = make("topk", n_inst, k=3)
    f = sae.encode(batch(n_inst, n=200))
    assert ((f > 0).sum(-1) <= 3).all()
    assert ((f > 0).sum(-1) == 3).any()


@pytest.mark.parametrize("n_inst", INSTS)
def test_auxk_gives_dead_latents_gradient(n_inst):
    sae = make("topk", n_inst, k=2, aux_k=3)
    x = batch(n_inst)
    dead = torch.zeros(*sae.inst_shape, D_SAE, dtype=torch.bool)
    dead[..., 7:] = True
    with torch.no_grad():  # make latents 7.. never reach the top k but have positive pre-activations
        sae.b_enc[..., 7:] = -0.5
        sae.b_enc[..., :7] = 3.0
    assert (sae.encode(x)[..., 7:] == 0).all()
    out = sae(x, dead_mask=dead)
    out.losses["L_aux"].sum().backward()
    grad = sae.W_enc.grad[..., 7:]
    assert grad.abs().sum() > 0
    sae.zero_grad()
    sae(x).loss.backward()  # without the dead mask, nothing reaches them
    assert sae.W_enc.grad[..., 7:].abs().sum() == 0


@pytest.mark.parametrize("n_inst", INSTS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_round_trip_is_exact(tmp_path, arch, n_inst):
    sae = make(arch, n_inst)
    x = batch(n_inst)
    for inst in [None] if n_inst is None else range(n_inst):
        folder = save_sae(sae, tmp_path / f"{arch}-{inst}", inst=inst, metadata={"hook_name": "h"})
        loaded = load_sae(folder)
        assert loaded.cfg.architecture == arch and loaded.cfg.n_inst is None
        assert loaded.cfg.metadata["hook_name"] == "h"
        for name, t in sae.effective_weights(inst).items():
            assert torch.equal(loaded.effective_weights()[name], t), name
        xi = x if inst is None else x[:, inst]
        ref = sae(x)
        ref_latents = ref.latents if inst is None else ref.latents[:, inst]
        ref_recon = ref.reconstruction if inst is None else ref.reconstruction[:, inst]
        out = loaded(xi)
        assert torch.allclose(out.latents, ref_latents, atol=1e-6)
        assert torch.allclose(out.reconstruction, ref_recon, atol=1e-6)


@pytest.fixture()
def saved(tmp_path):
    return save_sae(make("standard"), tmp_path / "sae")


def test_load_corrupt_weights(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"\x00\x01 not safetensors at all")
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_sae(saved)


def test_load_truncated_cfg(saved):
    text = (saved / CFG_FILE).read_text()
    (saved / CFG_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=CFG_FILE):
        load_sae(saved)


def test_load_invalid_cfg(saved):
    (saved / CFG_FILE).write_text(json.dumps({"architecture": "standard", "d_in": D_IN}))
    with pytest.raises(CheckpointError, match=CFG_FILE):
        load_sae(saved)
    (saved / CFG_FILE).write_text(json.dumps({"architecture": "nope", "d_in": D_IN, "d_sae": D_SAE}))
    with pytest.raises(CheckpointError, match=CFG_FILE):
        load_sae(saved)


def test_load_shape_mismatch(saved):
    cfg = json.loads((saved / CFG_FILE).read_text())
    cfg["d_sae"] = D_SAE + 1
    (saved / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_sae(saved)


def test_load_wrong_tensor_names(saved):
    weights = load_file(str(saved / WEIGHTS_FILE))
    weights["extra"] = torch.zeros(1)
    save_file(weights, str(saved / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_sae(saved)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CFG_FILE])
def test_load_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_sae(saved)


def test_load_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_sae(tmp_path / "nowhere")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_written_folders(arch):
    folder = SHARED / arch
    if not SHARED.parent.parent.is_dir():
        pytest.skip("../shared is not present in this clone")
    sae = load_sae(folder)
    expected = load_file(str(folder / "expected_outputs.safetensors"))
    with torch.no_grad():
        latents = sae.encode(expected["x"])
        assert torch.allclose(latents, expected["latents"], atol=1e-5)
        assert torch.allclose(sae.decode(latents), expected["reconstruction"], atol=1e-5)
