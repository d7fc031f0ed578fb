"""The shared skeleton of every SAE architecture.

Every tensor may carry a leading instance dimension `*inst` (toy models train 16 SAEs as one
module); a language-model SAE is the same code without it. Activations are `[batch, *inst, d_in]`,
latents `[batch, *inst, d_sae]`; W_enc is `[*inst, d_in, d_sae]`, W_dec `[*inst, d_sae, d_in]`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae.config import SAEConfig


class SAEOutput(NamedTuple):
    loss: Tensor
    """Scalar to minimise: per-instance loss averaged over the batch, summed over instances."""
    losses: dict[str, Tensor]
    """Each term averaged over the batch, shape [*inst]: L_reconstruction, L_sparsity, L_aux (weighted)."""
    latents: Tensor
    """Latent activations f, [batch, *inst, d_sae]."""
    reconstruction: Tensor
    """x_hat, [batch, *inst, d_in]."""


BLOCK_DIAG_MAX = 1 << 16
"""matmul_inst uses one block-diagonal matmul while the [inst*a, inst*b] matrix has at most this many entries."""


def matmul_inst(x: Tensor, w: Tensor) -> Tensor:
    """`x [batch, *inst, a] @ w [*inst, a, b] -> [batch, *inst, b]`, one matmul per instance."""
    if w.ndim == 2:
        return x @ w
    n, a, b = w.shape
    if n * n * a * b <= BLOCK_DIAG_MAX:
        # Toy sizes (16 instances of 2 -> 5): one dense matmul against the block-diagonal matrix is
        # several times faster than a batched matmul of tiny products, and keeps outputs contiguous.
        eye = torch.eye(n, dtype=w.dtype, device=w.device)
        block = (eye[:, None, :, None] * w[:, :, None, :]).reshape(n * a, n * b)
        return (x.reshape(*x.shape[:-2], n * a) @ block).view(*x.shape[:-2], n, b)
    return torch.einsum("nia,iab->nib", x, w)


def reconstruction_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error averaged over d_in: `[batch, *inst]`."""
    return (x_hat - x).pow(2).mean(-1)


class SparseAutoencoder(nn.Module):
    """Base class: parameters W_enc, W_dec, b_dec and the encode/decode/forward contract."""

    cfg: SAEConfig

    def __init__(self, cfg: SAEConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        inst = () if cfg.n_inst is None else (cfg.n_inst,)
        dtype = getattr(torch, cfg.dtype)
        # Decoder rows start as random unit vectors, encoder as their transpose (Conerly et al. 2024).
        w_dec = torch.randn(*inst, cfg.d_sae, cfg.d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(w_dec.transpose(-1, -2).clone().to(dtype))
        self._W_dec = None if cfg.tied else nn.Parameter(w_dec.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(*inst, cfg.d_in, dtype=dtype))
        self.inst_shape = inst

    # --- the decoder ------------------------------------------------------------------------------
    @property
    def W_dec(self) -> Tensor:
        """[*inst, d_sae, d_in]; the transposed encoder when weights are tied."""
        return self.W_enc.transpose(-1, -2) if self._W_dec is None else self._W_dec

    @property
    def decoder_param(self) -> nn.Parameter:
        """The parameter holding the decoder directions (W_enc itself when tied)."""
        return self.W_enc if self._W_dec is None else self._W_dec

    def decode(self, latents: Tensor) -> Tensor:
        """`[batch, *inst, d_sae] -> [batch, *inst, d_in]`."""
        return matmul_inst(latents, self.W_dec) + self.b_dec

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Set every decoder row to unit norm (call after each optimizer step)."""
        if self._W_dec is None:
            self.W_enc.div_(self.W_enc.norm(dim=-2, keepdim=True).clamp_min(1e-8))
        else:
            self._W_dec.div_(self._W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the gradient component along each decoder row, so a step cannot just rescale it."""
        p = self.decoder_param
        if p.grad is None:
            return
        row_dim = -2 if self._W_dec is None else -1
        unit = p / p.norm(dim=row_dim, keepdim=True).clamp_min(1e-8)
        p.grad -= (p.grad * unit).sum(row_dim, keepdim=True) * unit

    # --- the contract each architecture fills in ---------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[batch, *inst, d_sae]`, b_dec subtracted from the input first."""
        return matmul_inst(x - self.b_dec, self.W_enc) + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """Pre-activations -> latent activations, both `[batch, *inst, d_sae]`."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """`[batch, *inst, d_in] -> [batch, *inst, d_sae]` latent activations."""
        return self.activation(self.pre_acts(x))

    def loss_terms(
        self, x: Tensor, pre: Tensor, latents: Tensor, x_hat: Tensor, dead_mask: Tensor | None,
        sparsity_coeff: float,
    ) -> dict[str, Tensor]:
        """Per-example loss terms `[batch, *inst]`, already weighted, besides L_reconstruction."""
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        *,
        sparsity_coeff: float | None = None,
        weight: Tensor | None = None,
        batch_size: int | None = None,
    ) -> SAEOutput:
        """Encode, decode and compute the loss terms.

        `dead_mask [*inst, d_sae]` feeds AuxK (topk). `sparsity_coeff`: this step's coefficient (a trainer's
        warm-up), None: `cfg.sparsity_coeff`; the config is never changed. `weight [batch, *inst]`: how many
        inputs each row stands for, so batch means are sum(weight * term) / batch_size (the toy trainer's
        compact batches); None: plain means over the rows.
        """
        coeff = self.cfg.sparsity_coeff if sparsity_coeff is None else sparsity_coeff
        pre = self.pre_acts(x)
        latents = self.activation(pre)
        x_hat = self.decode(latents)
        per_example = {"L_reconstruction": reconstruction_loss(x_hat, x)}
        per_example.update(self.loss_terms(x, pre, latents, x_hat, dead_mask, coeff))
        if weight is None:
            losses = {name: term.mean(0) for name, term in per_example.items()}
        else:
            n = x.shape[0] if batch_size is None else batch_size
            losses = {name: (term * weight).sum(0) / n for name, term in per_example.items()}
        loss = sum(losses.values()).sum()  # type: ignore[union-attr]
        return SAEOutput(loss, losses, latents, x_hat)

    # --- checkpoints and resampling -----------------------------------------------------------------
    def effective_weights(self, inst: int | None = None) -> dict[str, Tensor]:
        """The tensors the forward pass uses, named as in SAELens (one instance if `inst` is given)."""
        weights = {name: t.detach() for name, t in self.saved_tensors().items()}
        if inst is not None:
            weights = {name: t[inst] for name, t in weights.items()}
        return {name: t.contiguous().clone() for name, t in weights.items()}

    def saved_tensors(self) -> dict[str, Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    @torch.no_grad()
    def load_effective_weights(self, weights: dict[str, Tensor]) -> None:
        """Inverse of `effective_weights()` for a module without tied weights."""
        if self._W_dec is None:
            raise ValueError("load into an untied module: tied weights are written out as W_dec")
        for name, t in weights.items():
            self._set_saved_tensor(name, t)

    def _set_saved_tensor(self, name: str, t: Tensor) -> None:
        target = self._W_dec if name == "W_dec" else getattr(self, name)
        target.copy_(t)

    @torch.no_grad()
    def reinit_latents_(self, mask: Tensor, directions: Tensor, enc_norm: float | Tensor) -> None:
        """Point the latents in `mask [*inst, d_sae]` at `directions [*inst, d_sae, d_in]` (unit rows).

        Decoder rows become the directions, encoder columns the directions scaled to `enc_norm`,
        and the latents' encoder biases are zeroed: the resampling of Bricken et al. (2023).
        """
        enc_norm = torch.as_tensor(enc_norm, dtype=self.W_enc.dtype)
        while enc_norm.ndim < mask.ndim + 1:
            enc_norm = enc_norm.unsqueeze(-1)
        new_enc = (directions * enc_norm).transpose(-1, -2)  # [*inst, d_in, d_sae]
        col_mask = mask.unsqueeze(-2)
        self.W_enc.copy_(torch.where(col_mask, new_enc, self.W_enc))
        if self._W_dec is not None:
            self._W_dec.copy_(torch.where(mask.unsqueeze(-1), directions, self._W_dec))
        for name in self.latent_bias_names():
            bias = getattr(self, name)
            bias.copy_(torch.where(mask, torch.zeros_like(bias), bias))

    def latent_bias_names(self) -> tuple[str, ...]:
        """Parameters `[*inst, d_sae]` that a resampled latent starts again at zero."""
        return ("b_enc",)

    def latent_axes(self) -> dict[str, int]:
        """Parameter name -> its latent axis (negative), for every parameter that holds one slice per latent.

        Resampling uses it to reset a latent's optimizer state without knowing parameter names; shapes alone
        cannot tell W_enc `[d_in, F]` from W_dec `[F, d_in]` when F = d_in.
        """
        axes = {"W_enc": -1, **{name: -1 for name in self.latent_bias_names()}}
        if self._W_dec is not None:
            axes["_W_dec"] = -2
        return axes

