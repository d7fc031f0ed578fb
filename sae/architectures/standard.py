"""Standard SAE: f = ReLU((x - b_dec) W_enc + b_enc), L1 penalty summed over latents.

With `l1_decoder_norm` the L1 term is sum_i f_i ||W_dec_i||, so a free (unconstrained) decoder cannot
shrink the penalty by growing its rows while the latents shrink.
"""

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
        if self.cfg.l1_decoder_norm:
            return {"L_sparsity": sparsity_coeff * (latents.abs() * self.W_dec.norm(dim=-1)).sum(-1)}
        return {"L_sparsity": sparsity_coeff * latents.abs().sum(-1)}
