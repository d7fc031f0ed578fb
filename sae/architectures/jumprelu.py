"""JumpReLU SAE (Rajamanoharan et al. 2024b): f = pre * 1[pre > theta], an L0 penalty, theta learned.

The threshold theta = exp(log_theta) gets gradients through straight-through estimators with a
rectangle kernel K(u) = 1[|u| < 1/2] of width epsilon (the paper's pseudo-derivatives).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sae.architectures.base import SparseAutoencoder
from sae.config import SAEConfig


def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a `[batch, *inst, d_sae]` gradient down to the threshold's `[*inst, d_sae]`."""
    return grad.sum(0) if grad.ndim > len(shape) else grad


class JumpReLUFn(torch.autograd.Function):
    """pre * 1[pre > theta]; d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = grad_out * (pre > theta).to(pre.dtype)
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad_out
        return grad_pre, _sum_to(grad_theta, theta.shape), None


class StepFn(torch.autograd.Function):
    """1[pre > theta]; d/dtheta = -(1 / eps) K((pre - theta) / eps), no gradient to pre."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad_out
        return torch.zeros_like(pre), _sum_to(grad_theta, theta.shape), None


class JumpReLUSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        shape, dtype = (*self.inst_shape, cfg.d_sae), self.W_enc.dtype
        self.b_enc = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.log_threshold = nn.Parameter(torch.full(shape, math.log(cfg.init_threshold), dtype=dtype))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: Tensor) -> Tensor:
        # ReLU first so a (loaded) non-positive threshold never lets negative activations through.
        return JumpReLUFn.apply(torch.relu(pre), self.threshold, self.cfg.ste_epsilon)

    def loss_terms(self, x, pre, latents, x_hat, dead_mask, sparsity_coeff) -> dict[str, Tensor]:
        l0 = StepFn.apply(pre, self.threshold, self.cfg.ste_epsilon).sum(-1)
        return {"L_sparsity": sparsity_coeff * l0}

    def latent_axes(self) -> dict[str, int]:
        return {**super().latent_axes(), "log_threshold": -1}

    @torch.no_grad()
    def reinit_latents_(self, mask: Tensor, directions: Tensor, enc_norm: float | Tensor) -> None:
        """Also put the thresholds back at their initial value: a dead latent's threshold gets no gradient, so
        a stale (large) one would keep the resampled latent dead."""
        super().reinit_latents_(mask, directions, enc_norm)
        init = torch.full_like(self.log_threshold, math.log(self.cfg.init_threshold))
        self.log_threshold.copy_(torch.where(mask, init, self.log_threshold))

    def saved_tensors(self) -> dict[str, Tensor]:
        return {**super().saved_tensors(), "threshold": self.threshold}

    def _set_saved_tensor(self, name: str, t: Tensor) -> None:
        if name == "threshold":
            # log of a saved threshold; SAELens allows 0 thresholds, which we clamp to a tiny positive.
            self.log_threshold.copy_(t.clamp_min(1e-12).log())
        else:
            super()._set_saved_tensor(name, t)
