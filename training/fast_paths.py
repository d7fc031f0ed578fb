"""Hand-written loss + gradient for the standard and TopK SAEs: the library modules' exact math, fewer FLOPs.

Autograd through `StandardSAE.forward` spends 12 B d F FLOPs per step: 2 matmuls forward, and 4 backward
because `x - b_dec` needs a gradient (through b_dec), so autograd forms the full input gradient
`dpre @ W_enc^T` only to sum it over the batch. Here that sum is taken first (`W_enc @ dpre.sum(0)`,
2 d F FLOPs), leaving 10 B d F, and the elementwise work runs in place.

TopK latents are k-sparse, so everything after the encoder's dense matmul is sparse: the decoder is an
`embedding_bag` (a gather-and-sum of k decoder rows per token), the gradient of the k activations is a
sampled dense-dense product (`torch.sparse.sampled_addmm`: only the k entries of `g @ W_dec^T` that are
needed), and each weight gradient is one `embedding_bag` over the entries sorted by latent (a sparse^T x
dense product). AuxK entries join the same sparse products. Cost: 2 B d F (encoder) + O(B (k + aux_k) d)
instead of 8-10 B d F. When k is not small next to F (DENSE_TOPK_RATIO) dense matmuls are faster, and the
same math runs on dense latents instead (still without the input gradient).

Both functions fill `.grad` of the module's parameters (overwriting it) and return the loss terms as the
module's `forward` defines them; `tests/training/test_trainer.py` checks loss and gradients against autograd.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.architectures import SparseAutoencoder, StandardSAE, TopKSAE
from sae.config import SAEConfig


class StepLosses(NamedTuple):
    """One training step of one SAE (every tensor 0-d except fire_counts)."""

    loss: Tensor
    """The scalar the module's forward would return."""
    mse: Tensor
    """Reconstruction loss per element: mean over batch and d_in of (x_hat - x)^2."""
    sparsity: Tensor
    """Weighted sparsity term (0 for topk)."""
    aux: Tensor
    """Weighted auxiliary loss (AuxK for topk, the gate reconstruction for gated; else 0)."""
    fire_counts: Tensor
    """[d_sae] number of batch tokens on which each latent fired (> 0)."""


DENSE_TOPK_RATIO = 8
"""TopK backward goes dense when (k + aux_k) * this >= F: sparse bookkeeping only pays off for small k / F."""


def has_fast_path(sae: SparseAutoencoder) -> bool:
    """Standard (untied) and TopK SAEs without an instance dimension."""
    plain = sae.cfg.n_inst is None and not sae.cfg.tied
    return plain and isinstance(sae, (StandardSAE, TopKSAE))


def _set_grad(p: Tensor, value: Tensor) -> None:
    """Use `value` as the gradient (copied when its memory layout differs from the parameter's)."""
    if value.stride() == p.stride() and value.dtype == p.dtype:
        p.grad = value
        return
    if p.grad is None or p.grad.stride() != p.stride():
        p.grad = torch.empty_like(p)
    p.grad.copy_(value)


def _grad_buffer(p: Tensor) -> Tensor:
    """p.grad, allocated once in p's layout and reused: large fresh CPU buffers cost page faults every step."""
    if p.grad is None or p.grad.stride() != p.stride():
        p.grad = torch.empty_like(p)
    return p.grad


def _sq_sum(t: Tensor) -> Tensor:
    flat = t.reshape(-1)
    return flat.dot(flat)


def standard_loss_and_grads(
    sae: StandardSAE, x: Tensor, sparsity_coeff: float, decoder_only: bool = False
) -> StepLosses:
    """`x [batch, d_in]`: loss of `StandardSAE.forward` with this sparsity coefficient, gradients in `.grad`.

    `decoder_only`: the reconstruction loss and W_dec's gradient alone (the decoder fine-tuning phase; the
    other `.grad` are left as they are), which skips the backward pass through the encoder.

    With `cfg.l1_decoder_norm` the L1 term is sum_i f_i ||W_dec_i||: latent i's penalty is lambda n_i, and
    the decoder row gets lambda (sum_b f_bi) W_dec_i / n_i on top of its reconstruction gradient.
    """
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.decoder_param, sae.b_dec
    batch, d_in = x.shape
    scale = 2.0 / (batch * d_in)  # dL/dx_hat = scale * (x_hat - x)
    with torch.no_grad():
        xc = x - b_dec  # [batch, d_in]
        f = torch.addmm(b_enc, xc, W_enc).clamp_min_(0)  # [batch, F]: pre-activations, ReLU'd in place
        e = torch.addmm(xc, f, W_dec, beta=-1)  # x_hat - x = f W_dec + b_dec - x = f W_dec - xc
        mse = _sq_sum(e) / e.numel()
        grad_dec = torch.mm(f.t(), e, out=_grad_buffer(W_dec)).mul_(scale)
        if decoder_only:
            return StepLosses(mse, mse, mse.new_zeros(()), mse.new_zeros(()), (f > 0).sum(0))
        if sae.cfg.l1_decoder_norm:
            norms = W_dec.norm(dim=1)  # [F]
            f_sum = f.sum(0)
            l1 = f_sum.dot(norms) / batch
            penalty = norms * (sparsity_coeff / batch)  # dL/df_bi of the L1 term
            grad_dec.addcmul_(W_dec, (f_sum * (sparsity_coeff / batch) / norms.clamp_min(1e-12))[:, None])
        else:
            l1 = f.sum() / batch
            penalty = b_enc.new_full(b_enc.shape, sparsity_coeff / batch)
        # dL/df = scale * e W_dec^T + the L1 term's, then the ReLU backward in place.
        df = torch.addmm(penalty, e, W_dec.t(), alpha=scale)
        dpre = torch.ops.aten.threshold_backward.grad_input(df, f, 0.0, grad_input=df)
        torch.mm(xc.t(), dpre, out=_grad_buffer(W_enc))
        db_enc = dpre.sum(0)
        _set_grad(b_enc, db_enc)
        # b_dec enters the decoder (+) and the encoder input (-): the latter's batch sum is one mat-vec.
        _set_grad(b_dec, e.sum(0).mul_(scale) - W_enc @ db_enc)
        sparsity = sparsity_coeff * l1
        return StepLosses(mse + sparsity, mse, sparsity, mse.new_zeros(()), (f > 0).sum(0))


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta" and the invariant-check notice
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _Group(NamedTuple):
    """Latents of one output (the reconstruction, or AuxK's): per token, `idx [batch, n]` with values `vals`
    (pre-activation) and `acts` (ReLU'd); `rows [batch, d_in]` is (up to `scale`) the gradient w.r.t. it."""

    vals: Tensor
    idx: Tensor
    acts: Tensor
    rows: Tensor
    scale: float
    lat: Tensor | None = None
    """[batch, F] dense latents (dense mode only)."""
    relu: bool = True
    """False: acts are the raw pre-activations (SAELens's AuxK), so every picked entry gets a gradient."""


def topk_loss_and_grads(sae: TopKSAE, x: Tensor, dead_mask: Tensor | None = None) -> StepLosses:
    """`x [batch, d_in]`, `dead_mask [F]`: loss of `TopKSAE.forward(x, dead_mask)`, gradients in `.grad`."""
    cfg = sae.cfg
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.decoder_param, sae.b_dec
    batch, d_in = x.shape
    n_lat, k = cfg.d_sae, int(cfg.k)  # type: ignore[arg-type]
    scale = 2.0 / (batch * d_in)
    # The module picks min(aux_k, F) AuxK latents, but picks beyond the dead ones are -inf: they add exactly
    # nothing to loss or gradients, so only min(aux_k, n_dead) are taken.
    n_dead = 0 if dead_mask is None or not cfg.aux_k else int(dead_mask.sum())
    k_aux = min(int(cfg.aux_k or 0), n_dead)
    dense = (k + k_aux) * DENSE_TOPK_RATIO >= n_lat  # sparse bookkeeping only pays off for small k / F

    def decode(idx: Tensor, acts: Tensor, plus: Tensor, beta: float) -> tuple[Tensor, Tensor | None]:
        """beta * plus + acts W_dec (no b_dec), and the dense latents when in dense mode."""
        if dense:
            lat = torch.zeros(batch, n_lat, dtype=x.dtype).scatter_(1, idx, acts)
            return torch.addmm(plus, lat, W_dec, beta=beta), lat
        out = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")
        return out.add_(plus, alpha=beta), None

    with torch.no_grad():
        xc = x - b_dec
        pre = torch.addmm(b_enc, xc, W_enc)  # [batch, F]
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # [batch, k]
        acts = vals.clamp_min(0)
        e, lat = decode(idx, acts, xc, -1.0)  # x_hat - x = acts W_dec + b_dec - x = acts W_dec - xc
        mse = _sq_sum(e) / e.numel()
        aux_loss = mse.new_zeros(())
        groups = [_Group(vals, idx, acts, e, scale, lat)]
        if k_aux:
            v2, i2 = pre.masked_fill_(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            a2 = v2.clamp_min(0) if cfg.aux_relu else v2
            r, lat2 = decode(i2, a2, e, 1.0)  # aux_recon - (x - x_hat)
            weight = cfg.aux_coeff * (min(n_dead / int(cfg.aux_k), 1.0) if cfg.aux_scale_dead else 1.0)
            aux_loss = weight * _sq_sum(r) / r.numel()
            groups.append(_Group(v2, i2, a2, r, weight * scale, lat2, cfg.aux_relu))
        del pre
        db_enc = _topk_dense_backward(sae, xc, groups) if dense else _topk_sparse_backward(sae, xc, groups)
        _set_grad(b_enc, db_enc)
        _set_grad(b_dec, e.sum(0).mul_(scale) - W_enc @ db_enc)
        fire_counts = torch.bincount(idx.reshape(-1), weights=(acts > 0).reshape(-1).to(x.dtype), minlength=n_lat)
        return StepLosses(mse + aux_loss, mse, aux_loss.new_zeros(()), aux_loss, fire_counts.long())


def _topk_dense_backward(sae: TopKSAE, xc: Tensor, groups: list[_Group]) -> Tensor:
    """Weight gradients with the dense [batch, F] latents of each group. Returns db_enc."""
    W_dec = sae.decoder_param
    grad_dec = _grad_buffer(W_dec)
    d_pre = None
    for gi, g in enumerate(groups):
        assert g.lat is not None
        torch.addmm(grad_dec, g.lat.t(), g.rows, beta=float(gi > 0), alpha=g.scale, out=grad_dec)
        d_lat = torch.mm(g.rows, W_dec.t())
        if g.relu:  # ReLU backward (also zero off the picked entries, where lat = 0)
            d_lat = torch.ops.aten.threshold_backward.grad_input(d_lat, g.lat, 0.0, grad_input=d_lat)
        else:
            d_lat.mul_(torch.zeros_like(g.lat).scatter_(1, g.idx, 1.0))
        d_pre = d_lat.mul_(g.scale) if d_pre is None else d_pre.add_(d_lat, alpha=g.scale)
    assert d_pre is not None
    torch.mm(xc.t(), d_pre, out=_grad_buffer(sae.W_enc))
    return d_pre.sum(0)


def _topk_sparse_backward(sae: TopKSAE, xc: Tensor, groups: list[_Group]) -> Tensor:
    """Weight gradients from the k (+ aux_k) entries per token only. Returns db_enc."""
    batch, n_lat = xc.shape[0], sae.cfg.d_sae
    W_dec = sae.decoder_param
    # Entries: group i's entries of token b pair with row i * batch + b of `dense`.
    dense = torch.cat([g.rows for g in groups]) if len(groups) > 1 else groups[0].rows
    n_rows = dense.shape[0]
    per_row = [g.idx.shape[1] for g in groups]
    val = torch.cat([g.vals.reshape(-1) for g in groups])
    col = torch.cat([g.idx.reshape(-1) for g in groups]).to(torch.int32)  # latent of each entry
    entry_scale = torch.cat([torch.full((batch * n,), g.scale, dtype=xc.dtype) for g, n in zip(groups, per_row)])
    act = torch.cat([g.acts.reshape(-1) for g in groups]) * entry_scale
    row = torch.cat([torch.arange(batch, dtype=torch.int32).repeat_interleave(n) + gi * batch
                     for gi, n in enumerate(per_row)])
    crow = torch.cat([torch.arange(0, batch * n, n, dtype=torch.int32) + batch * sum(per_row[:gi])
                      for gi, n in enumerate(per_row)] + [torch.tensor([col.numel()], dtype=torch.int32)])
    # d act = row . W_dec[latent], at the entries only (a sampled dense-dense product).
    pattern = _csr(crow, col, torch.zeros_like(val), (n_rows, n_lat))  # beta * NaN garbage would be NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d_act = torch.sparse.sampled_addmm(pattern, dense, W_dec.t(), beta=0.0).values()
    passes = torch.cat([(g.vals > 0 if g.relu else torch.ones_like(g.vals, dtype=torch.bool)).reshape(-1)
                        for g in groups])
    d_pre = d_act.mul_(entry_scale).mul_(passes)  # ReLU backward (groups with relu only)
    # Weight gradients: entries sorted by latent, each latent's gradient row a weighted sum of
    # dense rows, i.e. an embedding_bag with one bag per latent (faster than CSR spmm on CPU).
    lat_sorted, order = torch.sort(col, stable=True)
    offsets = torch.zeros(n_lat, dtype=torch.int32)
    offsets[1:] = torch.bincount(lat_sorted, minlength=n_lat)[:-1].cumsum(0)
    row = row[order]
    _set_grad(W_dec, F.embedding_bag(row, dense, offsets, mode="sum", per_sample_weights=act[order]))
    tok = row % batch if len(groups) > 1 else row
    d_enc_t = F.embedding_bag(tok, xc, offsets, mode="sum", per_sample_weights=d_pre[order])  # [F, d_in]
    _set_grad(sae.W_enc, d_enc_t.t())
    return torch.zeros(n_lat, dtype=xc.dtype).index_add_(0, col.long(), d_pre)


class _Effective(NamedTuple):
    """TopK weights with the decoder norms n factored out: W_enc n, b_enc n, W_dec / n (what the module uses
    with rescale_acts_by_decoder_norm), as leaf tensors that receive `.grad`."""

    cfg: SAEConfig
    W_enc: Tensor
    b_enc: Tensor
    decoder_param: Tensor
    b_dec: Tensor


def rescaled_topk_loss_and_grads(sae: TopKSAE, x: Tensor, dead_mask: Tensor | None = None) -> StepLosses:
    """TopK with rescale_acts_by_decoder_norm: the unit-row fast path on the effective weights, its
    gradients taken back through W_enc n, b_enc n and W_dec = n u (u unit) by the chain rule."""
    W_enc, b_enc, W_dec = sae.W_enc, sae.b_enc, sae.decoder_param
    with torch.no_grad():
        n = W_dec.norm(dim=1).clamp_min(1e-12)  # [F]
        u = W_dec / n[:, None]
        eff = _Effective(sae.cfg, W_enc * n, b_enc * n, u, sae.b_dec)
        out = topk_loss_and_grads(eff, x, dead_mask)  # type: ignore[arg-type]
        g_enc, g_benc, g_u = eff.W_enc.grad, eff.b_enc.grad, eff.decoder_param.grad
        g_n = (g_enc * W_enc).sum(0) + g_benc * b_enc  # [F]: d loss / d n through the encoder side
        _set_grad(W_enc, g_enc * n)
        _set_grad(b_enc, g_benc * n)
        radial = (g_u * u).sum(1, keepdim=True)
        _set_grad(W_dec, (g_u - radial * u) / n[:, None] + g_n[:, None] * u)  # b_dec's grad is set directly
    return out


def autograd_loss_and_grads(
    sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None = None, sparsity_coeff: float | None = None
) -> StepLosses:
    """Any architecture through its module's forward and autograd (the reference the fast paths match).

    `sparsity_coeff`: this step's coefficient (None: the config's); the SAE's config is left as it is."""
    for p in sae.parameters():
        p.grad = None
    out = sae(x, dead_mask=dead_mask, sparsity_coeff=sparsity_coeff)
    out.loss.backward()
    terms = {name: t.detach().sum() for name, t in out.losses.items()}
    zero = out.loss.detach().new_zeros(())
    fire_counts = (out.latents.detach() > 0).sum(0)
    return StepLosses(
        out.loss.detach(), terms["L_reconstruction"], terms.get("L_sparsity", zero), terms.get("L_aux", zero),
        fire_counts,
    )


def decoder_finetune_loss_and_grads(sae: SparseAutoencoder, x: Tensor, fast: bool = True) -> StepLosses:
    """The decoder fine-tuning phase: the reconstruction loss alone, with a gradient for the decoder weights only.

    Every other parameter's `.grad` is None, so Adam leaves it (and with it the latents) as it is; what is left to
    learn is the best decoder for the latents the encoder gives, free of the sparsity term's shrinkage."""
    if fast and has_fast_path(sae) and isinstance(sae, StandardSAE):
        out = standard_loss_and_grads(sae, x, 0.0, decoder_only=True)
    else:
        for p in sae.parameters():
            p.grad = None
        res = sae(x)
        recon = res.losses["L_reconstruction"].sum()
        recon.backward()
        zero = recon.detach().new_zeros(())
        out = StepLosses(recon.detach(), recon.detach(), zero, zero, (res.latents.detach() > 0).sum(0))
    for p in sae.parameters():
        if p is not sae.decoder_param:
            p.grad = None
    return out


def loss_and_grads(
    sae: SparseAutoencoder, x: Tensor, sparsity_coeff: float, dead_mask: Tensor | None, fast: bool = True
) -> StepLosses:
    """Dispatch: the fast path when there is one (and `fast`), autograd otherwise."""
    if fast and has_fast_path(sae):
        if isinstance(sae, TopKSAE):
            if sae.cfg.rescale_acts_by_decoder_norm:
                return rescaled_topk_loss_and_grads(sae, x, dead_mask)
            return topk_loss_and_grads(sae, x, dead_mask)
        return standard_loss_and_grads(sae, x, sparsity_coeff)  # type: ignore[arg-type]
    return autograd_loss_and_grads(sae, x, dead_mask, sparsity_coeff)
