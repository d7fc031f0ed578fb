"""Gated SAE (Rajamanoharan et al. 2024a): a gate decides which latents fire, a magnitude path how much.

gate = x~ W_enc + b_gate, mag = x~ (W_enc * exp(r_mag)) + b_mag, f = 1[gate > 0] * ReLU(mag);
sparsity is L1 on ReLU(gate), plus an auxiliary reconstruction from ReLU(gate) through a
detached decoder so the gate path learns to reconstruct too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.architectures.base import SparseAutoencoder, matmul_inst, reconstruction_loss
from sae.config import SAEConfig


class GatedSAE(SparseAutoencoder):
    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        shape, dtype = (*self.inst_shape, cfg.d_sae), self.W_enc.dtype
        self.b_gate = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(shape, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(shape, dtype=dtype))

    def pre_acts(self, x: Tensor) -> Tensor:
        """The shared projection x~ W_enc `[batch, *inst, d_sae]`; gate and magnitude derive from it."""
        return matmul_inst(x - self.b_dec, self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        # x~ (W_enc * exp(r_mag)) == (x~ W_enc) * exp(r_mag): one matmul serves both paths.
        mag = pre * self.r_mag.exp() + self.b_mag
        return ((pre + self.b_gate) > 0).to(mag.dtype) * torch.relu(mag)

    def loss_terms(self, x, pre, latents, x_hat, dead_mask, sparsity_coeff) -> dict[str, Tensor]:
        gate_acts = torch.relu(pre + self.b_gate)
        via_gate = matmul_inst(gate_acts, self.W_dec.detach()) + self.b_dec.detach()
        return {
            "L_sparsity": sparsity_coeff * gate_acts.sum(-1),
            "L_aux": reconstruction_loss(via_gate, x),
        }

    def saved_tensors(self) -> dict[str, Tensor]:
        return {"W_enc": self.W_enc, "b_gate": self.b_gate, "b_mag": self.b_mag, "r_mag": self.r_mag,
                "W_dec": self.W_dec, "b_dec": self.b_dec}

    def latent_bias_names(self) -> tuple[str, ...]:
        return ("b_gate", "b_mag", "r_mag")
