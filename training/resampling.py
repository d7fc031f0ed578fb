"""Dead-latent resampling for every architecture, with or without a leading instance dimension.

Both trainers decide which latents are dead (the toy trainer by firing frequency over a window, the
language-model trainer by steps since a latent last fired) and call `resample_dead_latents`, which

1. picks a unit direction per dead latent: `simple` draws random directions; `advanced` (Bricken et
   al. 2023) draws inputs with probability proportional to their squared reconstruction error (raised
   to `loss_power`) and uses the drawn input minus b_dec;
2. points the latent at it through the architecture's own `reinit_latents_` (decoder row = direction,
   encoder column = direction x encoder norm, its per-latent biases reset; JumpReLU also resets its
   threshold, without which a resampled latent stays dead);
3. resets the latent's Adam state by the parameters' latent axes (`latent_axes()`), so no parameter
   name is written here.

Adam policy (`ADAM_POLICIES`): a dead latent received no gradient, so its second-moment estimate decayed
towards zero. `typical` (the default) zeroes the first moment and sets the second to the mean of the
parameter's other entries; `zero` zeroes both, the usual recipe, which makes the first updates of a
resampled latent far larger than a live latent's (bench/bench_resample_policy.py measures both).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sae.architectures import SparseAutoencoder

RESAMPLE_METHODS = ("simple", "advanced")
ADAM_POLICIES = ("typical", "zero")
AdamPolicy = Literal["typical", "zero"]


def _with_inst(t: Tensor | None, sae: SparseAutoencoder, dim: int) -> Tensor | None:
    """Insert a size-1 instance axis at `dim` for an SAE without instances (the batched code's shape)."""
    return t if t is None or sae.cfg.n_inst is not None else t.unsqueeze(dim)


def random_directions(dead: Tensor, d_in: int, gen: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """Unit directions `[*inst, d_sae, d_in]` for every latent of `dead [*inst, d_sae]`."""
    directions = torch.randn(*dead.shape, d_in, generator=gen, device=dead.device, dtype=dtype)
    return directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def high_loss_directions(
    sae: SparseAutoencoder, dead: Tensor, x: Tensor, weight: Tensor | None, gen: torch.Generator | None,
    loss_power: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Directions `[inst, d_sae, d_in]` drawn from inputs `x [batch, inst, d_in]` by squared error ** loss_power.

    `weight [batch, inst]`: row multiplicities (None: 1). Returns the directions and the instances that
    have something to offer `[inst]` (some input is badly reconstructed and not at b_dec).
    """
    sq_err = (sae(x).reconstruction - x).pow(2).sum(-1).T  # [inst, batch]
    centered = x - sae.b_dec
    weights = sq_err.pow(loss_power) if weight is None else sq_err.pow(loss_power) * weight.T
    weights = weights * (centered.norm(dim=-1).T > 1e-6)  # an input at b_dec has no direction to offer
    usable = (sq_err.amax(-1) > 1e-6) & (weights.sum(-1) > 0)
    weights = torch.where(usable[:, None], weights, torch.ones_like(weights))
    picks = torch.multinomial(weights, dead.shape[-1], replacement=True, generator=gen)  # [inst, d_sae]
    inst = torch.arange(dead.shape[0], device=dead.device)[:, None]
    directions = centered[picks, inst]  # [inst, d_sae, d_in]
    return directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8), usable


def mean_alive_encoder_norm(sae: SparseAutoencoder, dead: Tensor) -> Tensor:
    """Per instance, the mean encoder-column norm of the latents not in `dead [*inst, d_sae]` (1 if none) `[*inst]`."""
    enc_norms = sae.W_enc.norm(dim=-2)  # [*inst, d_sae]
    alive = ~dead
    n_alive = alive.sum(-1)
    mean_alive = (enc_norms * alive).sum(-1) / n_alive.clamp_min(1)
    return torch.where(n_alive > 0, mean_alive, torch.ones_like(mean_alive))


def _latent_mask(param: Tensor, axis: int, mask: Tensor) -> Tensor:
    """`mask [*inst, d_sae]` broadcast over `param`, whose latent axis is `axis` (negative)."""
    inner = param.ndim - mask.ndim  # 0 for [*inst, d_sae], 1 for matrices
    m = mask
    for _ in range(inner):
        m = m.unsqueeze(-1 if axis == -2 else -2)
    return m.expand_as(param)


@torch.no_grad()
def reset_adam_state(opt: torch.optim.Optimizer, sae: SparseAutoencoder, mask: Tensor,
                     policy: AdamPolicy = "typical") -> None:
    """Reset the Adam moments of the latents in `mask [*inst, d_sae]` (see the module docstring)."""
    if policy not in ADAM_POLICIES:
        raise ValueError(f"unknown Adam policy {policy!r}; expected one of {ADAM_POLICIES}")
    params = dict(sae.named_parameters())
    for name, axis in sae.latent_axes().items():
        param = params[name]
        state = opt.state.get(param)
        if not state or "exp_avg" not in state:
            continue
        m = _latent_mask(param, axis, mask)
        state["exp_avg"].masked_fill_(m, 0.0)
        v = state["exp_avg_sq"]
        if policy == "zero":
            v.masked_fill_(m, 0.0)
        else:
            keep = ~m
            typical = (v * keep).sum() / keep.sum().clamp_min(1)
            v.copy_(torch.where(m, typical, v))


@torch.no_grad()
def resample_dead_latents(
    sae: SparseAutoencoder,
    dead: Tensor,
    method: Literal["simple", "advanced"],
    *,
    x: Tensor | None = None,
    weight: Tensor | None = None,
    scale: float = 1.0,
    gen: torch.Generator | None = None,
    loss_power: float = 1.0,
    opt: torch.optim.Optimizer | None = None,
    adam_policy: AdamPolicy = "typical",
) -> Tensor:
    """Re-initialise the latents of `dead [*inst, d_sae]`; returns the mask of those resampled `[*inst, d_sae]`.

    `x [batch, *inst, d_in]` (advanced; `weight [batch, *inst]` row multiplicities). Encoder norm of a
    resampled latent: `scale` (simple), or `scale` x the instance's mean alive encoder norm (advanced).
    Advanced leaves instances alone that reconstruct every input. With `opt`, their Adam state is reset.
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"unknown resampling method {method!r}; expected one of {RESAMPLE_METHODS}")
    dead = dead.to(torch.bool)  # no early return when none is dead: each call draws the same random numbers
    dtype = sae.W_enc.dtype
    if method == "simple":
        directions = random_directions(dead, sae.cfg.d_in, gen, dtype)
        enc_norm: Tensor | float = scale
    else:
        if x is None:
            raise ValueError("advanced resampling needs inputs x")
        dead_b = _with_inst(dead, sae, 0)
        directions, usable = high_loss_directions(sae, dead_b, _with_inst(x, sae, 1), _with_inst(weight, sae, 1),
                                                  gen, loss_power)
        dead_b = dead_b & usable[:, None]
        if sae.cfg.n_inst is None:
            dead, directions = dead_b[0], directions[0]
        else:
            dead = dead_b
        enc_norm = scale * mean_alive_encoder_norm(sae, dead)
    sae.reinit_latents_(dead, directions.to(dtype), enc_norm)
    if opt is not None:
        reset_adam_state(opt, sae, dead, adam_policy)
    return dead
