"""Questions about the latents and tokens of one `TextAnalysis`, and what a latent's decoder direction does.

- `top_latents`, `latents_at_token`, `latent_values`, `token_info(s)`, `second_view_values` read an analysis.
- `decoder_logit_effects` projects a decoder direction through the final norm and the unembedding.
- `latent_stats_summary` reads one latent's row of the held-out statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from explorer.analyze import TextAnalysis, visible
from explorer.errors import AnalysisError
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel
from sae.latent_stats import LatentStats


class LatentRow(NamedTuple):
    latent: int
    max_act: float
    total_act: float
    n_fired: int


class LogitEffects(NamedTuple):
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    method: str
    """How the effect was computed, for the UI."""



def top_latents(analysis: TextAnalysis, by: str = "max", n: int = 20) -> list[LatentRow]:
    """The latents that fired on the text, ranked by their max or total activation over its tokens."""
    if by not in ("max", "total"):
        raise AnalysisError(f"rank latents by 'max' or 'total', not {by!r}")
    acts = analysis.latents
    if acts.numel() == 0:
        return []
    max_act = acts.max(0).values
    total = acts.clamp_min(0).sum(0)
    fired = (acts > 0).sum(0)
    key = max_act if by == "max" else total
    key = torch.where(fired > 0, key, torch.full_like(key, -math.inf))
    n = min(int(n), int((fired > 0).sum()))
    if n <= 0:
        return []
    order = torch.sort(key, descending=True, stable=True).indices[:n]
    return [LatentRow(int(i), float(max_act[i]), float(total[i]), int(fired[i])) for i in order]


def latents_at_token(analysis: TextAnalysis, pos: int, n: int = 20) -> list[tuple[int, float]]:
    """(latent, activation) of the latents firing at token `pos`, largest first."""
    pos = int(pos)
    if not 0 <= pos < analysis.n_tokens:
        raise AnalysisError(f"token position {pos} is outside the text (0..{analysis.n_tokens - 1})")
    row = analysis.latents[pos]
    fired = int((row > 0).sum())
    vals, idx = torch.sort(row, descending=True, stable=True)
    k = min(int(n), fired)
    return [(int(i), float(v)) for v, i in zip(vals[:k], idx[:k])]


class TokenInfo(NamedTuple):
    n_fired: int
    sq_error: float
    rel_error: float
    """||x - x_hat||^2 / ||x||^2."""
    ce_clean: float
    ce_sae: float
    """NaN at the first token (nothing predicts it)."""


def token_info(analysis: TextAnalysis, pos: int) -> TokenInfo:
    """What the app shows about one token besides its latents."""
    pos = int(pos)
    if not 0 <= pos < analysis.n_tokens:
        raise AnalysisError(f"token position {pos} is outside the text (0..{analysis.n_tokens - 1})")
    err = float(analysis.sq_error[pos])
    return TokenInfo(int((analysis.latents[pos] > 0).sum()), err, err / max(float(analysis.x_norm_sq[pos]), 1e-12),
                     float(analysis.ce_clean_per_token[pos]), float(analysis.ce_sae_per_token[pos]))


def token_infos(analysis: TextAnalysis) -> list[TokenInfo]:
    """`token_info` of every token at once."""
    fired = (analysis.latents > 0).sum(1).tolist()
    err = analysis.sq_error.tolist()
    rel = (analysis.sq_error / analysis.x_norm_sq.clamp_min(1e-12)).tolist()
    ce_c, ce_s = analysis.ce_clean_per_token.tolist(), analysis.ce_sae_per_token.tolist()
    return [TokenInfo(*row) for row in zip(fired, err, rel, ce_c, ce_s)]


def latent_values(analysis: TextAnalysis, latent: int | None) -> list[float]:
    """The latent's activation on every token (zeros for None or a latent the SAE lacks)."""
    if latent is None or not 0 <= int(latent) < analysis.latents.shape[1]:
        return [0.0] * analysis.latents.shape[0]
    return analysis.latents[:, int(latent)].tolist()


def second_view_values(analysis: TextAnalysis, mode: str) -> tuple[list[float], str]:
    """Per-token values of the second view: 'error' (||x - x_hat||^2) or 'ce' (CE increase with the SAE, >= 0)."""
    if mode == "ce":
        diff = (analysis.ce_sae_per_token - analysis.ce_clean_per_token).clamp_min(0).nan_to_num(0.0)
        return diff.tolist(), "CE increase"
    return analysis.sq_error.tolist(), "‖x − x̂‖²"


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    for path in ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        mod: Any = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def decoder_logit_effects(
    bm: BaseModel, sae: SparseAutoencoder, latent: int, n: int = 10, through_ln: bool = True,
    token_strings: Sequence[str] | None = None,
) -> LogitEffects:
    """The tokens whose logits the latent's decoder direction raises / lowers most: W_dec[latent] @ W_U.

    With `through_ln`, the direction first goes through the final layer norm's affine part (centred for a
    LayerNorm, then scaled by its weight γ), as TransformerLens's fold_ln does; the per-token 1/σ of the
    norm is a positive factor and does not change the ranking, and the bias is the same for every latent.
    """
    latent = int(latent)
    if not 0 <= latent < sae.cfg.d_sae:
        raise AnalysisError(f"latent {latent} does not exist: this SAE has latents 0..{sae.cfg.d_sae - 1}")
    unembed = bm.model.get_output_embeddings()
    if unembed is None:
        raise AnalysisError(f"{bm.name} has no unembedding to project the decoder direction through")
    with torch.inference_mode():
        d = sae.W_dec[latent].detach().float().to(unembed.weight.device)
        method = "W_dec[latent] · W_U (direct path, no final layer norm)"
        norm = _final_norm(bm.model) if through_ln else None
        if norm is not None:
            if isinstance(norm, torch.nn.LayerNorm):
                d = d - d.mean()
                method = "W_dec[latent] through the final LayerNorm (centred, × γ), then · W_U"
            else:
                method = "W_dec[latent] through the final norm (× γ), then · W_U"
            weight = getattr(norm, "weight", None)
            if weight is not None:
                d = d * weight.detach().float()
        effects = unembed.weight.detach().float() @ d  # [vocab]
        k = min(int(n), effects.shape[0])
        top, bottom = torch.topk(effects, k), torch.topk(-effects, k)
    strings = token_strings if token_strings is not None else None

    def label(i: int) -> str:
        s = strings[i] if strings is not None and i < len(strings) else bm.tokenizer.decode([i])
        return visible(s)

    return LogitEffects(
        promoted=[(label(int(i)), float(v)) for v, i in zip(top.values, top.indices)],
        suppressed=[(label(int(i)), -float(v)) for v, i in zip(bottom.values, bottom.indices)],
        method=method,
    )



def latent_stats_summary(stats: LatentStats | None, latent: int, d_sae: int) -> dict[str, Any] | None:
    """freq, max_act, n_tokens, hist_edges, hist_counts of one latent from saved stats (None if unusable)."""
    if stats is None or stats.d_sae != d_sae or not 0 <= int(latent) < d_sae:
        return None
    latent = int(latent)
    return {"freq": float(stats.freq[latent]), "max_act": float(stats.max_act[latent]), "n_tokens": stats.n_tokens,
            "hist_edges": stats.hist_edges.tolist(), "hist_counts": stats.hist_counts[latent].tolist()}
