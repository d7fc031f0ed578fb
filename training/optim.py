"""Adam and the decoder-constrained step that both trainers take.

Decoder rows are kept at unit norm. The gradient's component along each row (the radial part) would
only change the row's norm, which the renormalisation undoes; left in, Adam's per-coordinate scaling
turns it into a sideways drift (toy decoder rows settle ~5 degrees off their features). So every step
is: drop the radial gradient, Adam, renormalise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sae.architectures import SparseAutoencoder


def make_adam(
    params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.Adam:
    """Adam with the fused kernel, or the foreach one where fused is unavailable (device/dtype)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def constrained_step(
    sae: SparseAutoencoder, opt: torch.optim.Optimizer, remove_radial_grad: bool = True, unit_decoder: bool = True,
    clip_norm: float = 0.0,
) -> None:
    """One optimizer step on gradients already in `.grad`, keeping decoder rows at unit norm (`unit_decoder`;
    a free decoder takes a plain step). `clip_norm > 0`: clip the gradient's global norm to it before Adam."""
    if unit_decoder and remove_radial_grad:
        sae.remove_parallel_decoder_grad_()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(sae.parameters()), clip_norm, foreach=True)
    opt.step()
    if unit_decoder:
        sae.normalize_decoder_()
