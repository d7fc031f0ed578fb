"""Every evaluation metric, defined once (DESIGN.md "Metrics").

Reconstruction metrics accumulate over an eval set in `ReconstructionStats` (token dimension 0,
features last; any instance dims in between are kept), and the one-batch functions below are that
accumulator applied to a single batch, so a number means the same thing everywhere. Metric keys are
named in `sae.layout`.

Version 2: `cossim` and `l2_ratio` are means over the inputs with non-zero norm only (cosine and norm
ratio are undefined at x = 0, and 88% of toy inputs are exactly zero); `n_zero_norm_inputs` counts the
inputs left out. Version 1 averaged over every input, counting a zero input as cosine 0 and norm ratio
||x_hat|| / 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sae import layout

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""
RECOVERY_THRESHOLD = 0.99
"""A toy feature counts as recovered when some decoder row has cosine above this with it."""
METRICS_VERSION = 2
"""2: cossim and l2_ratio over the inputs with non-zero norm (see the module docstring)."""


@dataclass
class ReconstructionStats:
    """Running sums over tokens of `x [tokens, *inst, d_in]`, `x_hat` alike and `latents [tokens, *inst, F]`."""

    n_tokens: int = 0
    sum_sq_err: Tensor | float = 0.0
    sum_x: Tensor | float = 0.0
    sum_sq_x: Tensor | float = 0.0
    sum_cos: Tensor | float = 0.0
    sum_norm_ratio: Tensor | float = 0.0
    n_nonzero: Tensor | float = 0.0
    """Inputs with non-zero norm (those cossim and l2_ratio average over)."""
    sum_l0: Tensor | float = 0.0
    fire_counts: Tensor | None = field(default=None)
    d_in: int = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor | None = None) -> ReconstructionStats:
        x, x_hat = x.double(), x_hat.double()
        self.n_tokens += x.shape[0]
        self.d_in = x.shape[-1]
        self.sum_sq_err = self.sum_sq_err + (x_hat - x).pow(2).sum((0, -1))
        self.sum_x = self.sum_x + x.sum(0)
        self.sum_sq_x = self.sum_sq_x + x.pow(2).sum((0, -1))
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        nonzero = x_norm > 0
        cos = (x * x_hat).sum(-1) / (x_norm * x_hat_norm).clamp_min(1e-12)
        self.sum_cos = self.sum_cos + torch.where(nonzero, cos, 0.0).sum(0)
        ratio = x_hat_norm / x_norm.clamp_min(1e-12)
        self.sum_norm_ratio = self.sum_norm_ratio + torch.where(nonzero, ratio, 0.0).sum(0)
        self.n_nonzero = self.n_nonzero + nonzero.sum(0).double()
        if latents is not None:
            fired = latents > 0
            self.sum_l0 = self.sum_l0 + fired.sum(-1).double().sum(0)
            counts = fired.sum(0)
            self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        return self

    def compute(self) -> dict[str, Tensor]:
        """Each metric as a tensor of shape [*inst] (0-d without instances)."""
        n = max(self.n_tokens, 1)
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2: variance about the mean, not about zero.
        total_var = self.sum_sq_x - (torch.as_tensor(self.sum_x) ** 2).sum(-1) / n
        n_nonzero = torch.as_tensor(self.n_nonzero, dtype=torch.float64)
        per_nonzero = torch.where(n_nonzero > 0, n_nonzero, float("nan"))  # no non-zero input: undefined
        out = {
            layout.MSE: torch.as_tensor(self.sum_sq_err) / (n * max(self.d_in, 1)),
            layout.VARIANCE_EXPLAINED: 1 - torch.as_tensor(self.sum_sq_err) / torch.as_tensor(total_var).clamp_min(
                1e-12),
            layout.COSSIM: torch.as_tensor(self.sum_cos) / per_nonzero,
            layout.L2_RATIO: torch.as_tensor(self.sum_norm_ratio) / per_nonzero,
            layout.N_ZERO_NORM_INPUTS: (self.n_tokens - n_nonzero).long(),
        }
        if self.fire_counts is not None:
            out[layout.L0] = torch.as_tensor(self.sum_l0) / n
            out[layout.FRAC_DEAD] = frac_dead(self.fire_counts)
            out[layout.FRAC_DENSE] = frac_dense(self.fire_counts, self.n_tokens)
        return out

    def summary(self) -> dict[str, float | list[float] | int]:
        """`compute()` as JSON-ready numbers (lists over instances), with the eval-set size."""
        out: dict[str, float | list[float] | int] = {k: v.tolist() for k, v in self.compute().items()}
        out[layout.N_TOKENS] = self.n_tokens
        return out


def frac_dead(fire_counts: Tensor) -> Tensor:
    """Fraction of latents that never fired: `fire_counts [*inst, F] -> [*inst]`."""
    return (fire_counts == 0).double().mean(-1)


def frac_dense(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """Fraction of latents firing on more than DENSE_THRESHOLD of the tokens."""
    return (fire_counts.double() / max(n_tokens, 1) > DENSE_THRESHOLD).double().mean(-1)


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over tokens and d_in of (x_hat - x)^2."""
    return ReconstructionStats().update(x, x_hat).compute()[layout.MSE]


def variance_explained(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the tokens."""
    return ReconstructionStats().update(x, x_hat).compute()[layout.VARIANCE_EXPLAINED]


def cossim(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean cosine similarity of x and x_hat over the inputs with non-zero norm."""
    return ReconstructionStats().update(x, x_hat).compute()[layout.COSSIM]


def l2_ratio(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean ||x_hat|| / ||x|| over the inputs with non-zero norm (below 1 means shrinkage)."""
    return ReconstructionStats().update(x, x_hat).compute()[layout.L2_RATIO]


def l0(latents: Tensor) -> Tensor:
    """Mean number of latents > 0 per token."""
    return (latents > 0).sum(-1).double().mean(0)


def per_token_sq_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared reconstruction error per token, summed over d_in: `[tokens, d_in] -> [tokens]`."""
    return (x_hat - x).pow(2).sum(-1)


def ce_loss_score(ce_clean: float, ce_with_sae: float, ce_with_ablation: float) -> float:
    """(ablation - sae) / (ablation - clean): 1 when splicing in the SAE costs nothing, 0 when as bad as zeros."""
    denom = ce_with_ablation - ce_clean
    return float("nan") if denom == 0 else (ce_with_ablation - ce_with_sae) / denom


def next_token_logp(logits: Tensor) -> Tensor:
    """Log-probabilities of the next token, `[..., seq, vocab] -> [..., seq-1, vocab]` (float32)."""
    return torch.log_softmax(logits[..., :-1, :].float(), dim=-1)


def next_token_ce_from_logp(logp: Tensor, input_ids: Tensor) -> Tensor:
    """Cross-entropy of each next token `[..., seq-1]` from `next_token_logp` (reused for KL too)."""
    return -logp.gather(-1, input_ids[..., 1:, None].to(logp.device)).squeeze(-1)


def next_token_ce(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-position next-token cross-entropy `[batch, seq-1]` (position t predicts token t+1)."""
    ce = next_token_ce_from_logp(next_token_logp(logits), input_ids)
    if mask is not None:
        ce = ce * mask[:, 1:].to(ce.dtype)
    return ce


def kl_div_from_logp(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per position from log-probabilities, `[..., vocab] -> [...]`."""
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_div(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p || q) per position, `[batch, seq, vocab] -> [batch, seq]` (p: clean, q: with the SAE)."""
    return kl_div_from_logp(torch.log_softmax(logits_p.float(), dim=-1), torch.log_softmax(logits_q.float(), dim=-1))


def feature_recovery(true_directions: Tensor, decoder: Tensor) -> Tensor:
    """Best (signed) cosine of each true feature direction with any decoder row.

    `true_directions [*inst, n_features, d]`, `decoder [*inst, F, d]` -> `[*inst, n_features]`.
    """
    t = true_directions / true_directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (t @ w.transpose(-1, -2)).max(-1).values


def all_recovered(best_cos: Tensor, threshold: float = RECOVERY_THRESHOLD) -> Tensor:
    """Per instance: does every true feature have a decoder row with cosine > threshold? `[*inst]`."""
    return (best_cos > threshold).all(-1)
