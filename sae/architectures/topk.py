"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per input, ReLU them.

Optional AuxK: the `aux_k` largest pre-activations among dead latents reconstruct the residual
error x - x_hat, which gives dead latents a gradient (weighted by `aux_coeff`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.architectures.base import SparseAutoencoder, matmul_inst, reconstruction_loss
from sae.config import SAEConfig


class TopKSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        self.b_enc = nn.Parameter(torch.zeros(*self.inst_shape, cfg.d_sae, dtype=self.W_enc.dtype))

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def loss_terms(self, x, pre, latents, x_hat, dead_mask, sparsity_coeff) -> dict[str, Tensor]:
        if not self.cfg.aux_k:
            return {}
        if dead_mask is None or not bool(dead_mask.any()):
            return {"L_aux": x.new_zeros(x.shape[:-1])}
        residual = (x - x_hat).detach()
        dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
        values, indices = dead_pre.topk(min(self.cfg.aux_k, self.cfg.d_sae), dim=-1)
        aux_latents = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        aux_recon = matmul_inst(aux_latents, self.W_dec)
        return {"L_aux": self.cfg.aux_coeff * reconstruction_loss(aux_recon, residual)}
