"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per input, ReLU them.

Optional AuxK: the `aux_k` largest pre-activations among dead latents reconstruct the residual
error x - x_hat, which gives dead latents a gradient (weighted by `aux_coeff`, times
min(dead / aux_k, 1) with `aux_scale_dead`; the activations ReLU'd unless `aux_relu` is False).
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

    def pre_acts(self, x: Tensor) -> Tensor:
        pre = super().pre_acts(x)
        return pre * self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else pre

    def unit_decoder(self) -> Tensor:
        """The rows the latents multiply: W_dec, or W_dec / row norm with rescale_acts_by_decoder_norm."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        return self.W_dec

    def decode(self, latents: Tensor) -> Tensor:
        return matmul_inst(latents, self.unit_decoder()) + self.b_dec

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
        # Picks beyond the dead latents are -inf: they contribute nothing either way.
        acts = torch.relu(values) if self.cfg.aux_relu else values.masked_fill(values.isinf(), 0.0)
        aux_latents = torch.zeros_like(pre).scatter(-1, indices, acts)
        aux_recon = matmul_inst(aux_latents, self.unit_decoder())
        return {"L_aux": aux_weight(self.cfg, dead_mask) * reconstruction_loss(aux_recon, residual)}


def aux_weight(cfg: SAEConfig, dead_mask: Tensor) -> Tensor | float:
    """The AuxK loss weight: aux_coeff, times min(dead / aux_k, 1) per instance with aux_scale_dead."""
    if not cfg.aux_scale_dead:
        return cfg.aux_coeff
    n_dead = dead_mask.sum(-1).to(torch.float32)
    return cfg.aux_coeff * (n_dead / float(cfg.aux_k or 1)).clamp(max=1.0)
