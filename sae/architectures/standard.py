"""Standard SAE: f = ReLU((x - b_dec) W_enc + b_enc), L1 penalty summed over latents."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.architectures.base import SparseAutoencoder
from sae.config import SAEConfig


class StandardSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        self.b_enc = nn.Parameter(torch.zeros(*self.inst_shape, cfg.d_sae, dtype=self.W_enc.dtype))

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def loss_terms(self, x, pre, latents, x_hat, dead_mask, sparsity_coeff) -> dict[str, Tensor]:
        return {"L_sparsity": sparsity_coeff * latents.abs().sum(-1)}
