"""Everything the explorer app computes: text -> tokens, latent activations, reconstruction quality.

The app (`app.py`) only wires widgets to the functions here; it never touches torch itself.

- `analyze_text(bm, sae, layer, text)` runs one story through the base model and an SAE and returns a
  `TextAnalysis`: tokens, latents [T, F], per-token squared error, reconstruction metrics, downstream
  cross-entropy clean / with the SAE spliced in / with zeros spliced in, and the time of each phase.
- `compare_saes` does the same for several SAEs of one hook with a single base-model pass.
- `top_latents`, `latents_at_token`, `decoder_logit_effects` answer the app's questions about latents.
- `CheckpointCatalog` lists the LM checkpoints (toy SAEs excluded) and toy folders of checkpoint roots;
  `ModelCache` loads each base model / SAE / latent-stats file once (LRU by path).
- `tokens_html`, `contexts_html`: the HTML the app shows (token spans carry `data-pos` for clicks).

Metrics come from `sae.metrics`, so a number here means what it means in metrics.json.
"""

from __future__ import annotations

import html
import math
import threading
import time
import unicodedata
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae import layout
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel, hook_name, load_base_model, logits_with_replacement, parse_hook_name, residual_at
from sae.checkpoint import (
    METRICS_FILE,
    CheckpointError,
    CheckpointInfo,
    download_checkpoints,
    list_checkpoints,
    load_sae,
    read_json,
)
from sae.latent_stats import LatentStats
from sae.layout import DOWNSTREAM_KEYS, RECONSTRUCTION_KEYS, TOY_MODEL_NAME
from sae.metrics import (
    ReconstructionStats,
    ce_loss_score,
    kl_div_from_logp,
    next_token_ce_from_logp,
    next_token_logp,
    per_token_sq_error,
)

MAX_CHARS = 5_000
"""Longest text (after cleaning) the app analyses."""
MAX_SPLICE_BATCH = 8
"""Spliced forward passes run this many sequences per batch."""
KNOWN_HUB_IDS = {"tinystories-33m": "roneneldan/TinyStories-33M"}
"""Folder-style model names whose Hugging Face Hub id is known."""
MODEL_SOURCE_KEYS = ("model_path", "model_source", "model_name_or_path", "base_model", "hf_model_id", "model_id")
"""cfg.json metadata keys that may say where the base model lives (first found wins)."""


class AnalysisError(ValueError):
    """Bad input or an incompatible checkpoint; the message is meant for the user."""


# ---------------------------------------------------------------------------------------- results


@dataclass
class TextAnalysis:
    """One text run through a base model and one SAE."""

    text: str
    """The cleaned text (control characters removed) that was tokenized."""
    token_texts: list[str]
    """Exact substring of `text` of each token ('' for a token continuing a character split across tokens)."""
    tokens: list[str]
    """Display form of each token: spaces as '␣', newlines as '↵', tabs as '⇥'."""
    token_ids: list[int]
    latents: Tensor
    """[T, F] latent activations."""
    sq_error: Tensor
    """[T] squared reconstruction error ||x - x_hat||^2 per token (summed over d_in)."""
    x_norm_sq: Tensor
    """[T] ||x||^2 per token, to put sq_error in scale."""
    metrics: dict[str, float]
    """mse, variance_explained, cossim, l2_ratio, l0, ce_loss_without_sae, ce_loss_with_sae,
    ce_loss_with_ablation, ce_loss_score, kl_div_with_sae, n_tokens: named as in metrics.json (CE and KL are
    NaN for a one-token text)."""
    ce_clean_per_token: Tensor
    """[T] cross-entropy of predicting token t from tokens < t, clean model (NaN at t = 0)."""
    ce_sae_per_token: Tensor
    """[T] the same with the SAE reconstruction spliced in at the hook."""
    truncated: bool = False
    notices: list[str] = field(default_factory=list)
    """Things the user should know (truncation, removed characters)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds per phase: tokenize, wait (for another request on the same model), model_forward (the
    clean pass: a full one that also yields the hook's residual, or one stopped after the hook when the
    downstream losses are skipped), sae, downstream (the passes with zeros / the SAE spliced in, CE, KL),
    and render / total (added by the app)."""
    model_name: str = ""
    hook_name: str = ""
    d_sae: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def notice(self) -> str:
        return " ".join(self.notices)


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


# ---------------------------------------------------------------------------------------- input


def clean_text(text: str | None, max_chars: int = MAX_CHARS) -> tuple[str, list[str]]:
    """Validate and clean user text: returns (text, notices) or raises AnalysisError.

    Control characters other than newline and tab are removed (as are lone surrogates), Windows and
    old-Mac line ends become '\\n'; emoji, accents and non-Latin scripts are kept as they are.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise AnalysisError(f"expected text, got {type(text).__name__}")
    notices: list[str] = []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kept = [c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs")]
    if len(kept) != len(text):
        notices.append(f"Removed {len(text) - len(kept)} control character(s).")
        text = "".join(kept)
    if not text.strip():
        raise AnalysisError("The text is empty: type or paste a story first.")
    if len(text) > max_chars:
        raise AnalysisError(
            f"The text is {len(text):,} characters long; the limit is {max_chars:,}. Shorten it and try again."
        )
    return text, notices


def visible(piece: str) -> str:
    """A token's text with whitespace made visible."""
    return piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def _tokenize(bm: BaseModel, text: str) -> tuple[list[int], list[str], bool, int]:
    """Token ids and their exact text pieces, cut to the model's context. Returns (ids, pieces, truncated, n_total)."""
    tok = bm.tokenizer
    try:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        enc, offsets = tok(text, add_special_tokens=True), None
    ids = [int(i) for i in enc["input_ids"]]
    n_total = len(ids)
    if n_total == 0:
        raise AnalysisError("The text produced no tokens.")
    truncated = n_total > bm.context_size
    ids = ids[: bm.context_size]
    special = set(getattr(tok, "all_special_ids", []) or [])
    pieces: list[str] = []
    if offsets is not None:
        consumed = 0
        for i, (a, b) in zip(ids, offsets):
            if a == b and i in special:
                pieces.append(tok.convert_ids_to_tokens(i))
                continue
            # From the end of the previous piece: overlapping offsets (a character split over several byte
            # tokens) give '' to the later tokens, gaps (offsets that skip spaces) go to the next token.
            pieces.append(text[consumed:b] if b > consumed else "")
            consumed = max(consumed, b)
    else:
        pieces = [tok.decode([i]) for i in ids]
    return ids, pieces, truncated, n_total


# ---------------------------------------------------------------------------------------- compatibility


def _norm_name(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1].lower()


def check_compatible(bm: BaseModel, sae: SparseAutoencoder, layer: int | str) -> int:
    """Refuse (AnalysisError with the reason) an SAE that was not trained on this model's hook. Returns the layer."""
    try:
        idx = parse_hook_name(layer) if isinstance(layer, str) else int(layer)
    except ValueError as err:
        raise AnalysisError(str(err)) from err
    if not 0 <= idx < bm.n_layers:
        raise AnalysisError(f"{bm.name} has {bm.n_layers} blocks; there is no layer {idx} to read.")
    cfg = sae.cfg
    meta = cfg.metadata or {}
    if cfg.n_inst is not None:
        raise AnalysisError("This SAE has an instance dimension (a toy-model SAE); pick a language-model checkpoint.")
    if cfg.d_in != bm.d_model:
        raise AnalysisError(
            f"Checkpoint mismatch: the SAE reads vectors of width d_in={cfg.d_in}, but {bm.name} has "
            f"d_model={bm.d_model}. It was trained on a different base model."
        )
    sae_model = meta.get("model_name")
    if sae_model and _norm_name(sae_model) != _norm_name(bm.name):
        raise AnalysisError(
            f"Checkpoint mismatch: the SAE was trained on {sae_model!r}, but the loaded base model is {bm.name!r}."
        )
    sae_hook = meta.get("hook_name")
    if sae_hook and sae_hook != hook_name(idx):
        raise AnalysisError(
            f"Checkpoint mismatch: the SAE was trained at hook {sae_hook!r}, but it was asked to read "
            f"{hook_name(idx)!r}."
        )
    return idx


# ---------------------------------------------------------------------------------------- analysis


_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(bm: BaseModel) -> threading.Lock:
    """One lock per base model: its forward passes install hooks on shared modules (the early-stop hook of
    `residual_at` would abort a concurrent request's full pass), so requests take turns on a model."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(bm.model)
        if lock is None:
            lock = _MODEL_LOCKS[bm.model] = threading.Lock()
        return lock


def set_threads(n: int) -> int:
    """Set torch's CPU threads for the process (the app: cores / concurrent requests); returns the count."""
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _spliced_logits(bm: BaseModel, ids: Tensor, layer: int, replacements: list[Tensor]) -> list[Tensor]:
    """Logits [T, vocab] with each replacement [T, d] spliced in at `layer`, batched."""
    out: list[Tensor] = []
    for start in range(0, len(replacements), MAX_SPLICE_BATCH):
        chunk = torch.stack(replacements[start : start + MAX_SPLICE_BATCH])
        batch_ids = ids.expand(chunk.shape[0], -1)
        logits = logits_with_replacement(bm, batch_ids, None, layer, chunk)
        out.extend(logits.float().unbind(0))
    return out


def _clean_logits_and_residual(bm: BaseModel, ids: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Clean logits [T, vocab] and the residual [T, d] at `layer`'s output, from one full forward pass."""
    captured: list[Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = bm.blocks[layer].register_forward_hook(hook)
    try:
        logits = logits_with_replacement(bm, ids[None], None, layer, None)
    finally:
        handle.remove()
    return logits[0].float(), captured[0][0].clone()


def _per_token_ce(logp: Tensor, ids: Tensor) -> Tensor:
    """[T] CE of predicting token t from `next_token_logp` of one row (NaN at t = 0: nothing predicts it)."""
    return torch.cat([torch.full((1,), float("nan")), next_token_ce_from_logp(logp, ids).cpu()])


def _run(
    bm: BaseModel, saes: Sequence[SparseAutoencoder], layer: int | str, text: str, max_chars: int,
    downstream: bool = True,
) -> list[TextAnalysis]:
    """The shared core: one tokenization and base-model pass, then every SAE and one batched splice."""
    if not saes:
        raise AnalysisError("no SAE given")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    idx = -1
    for sae in saes:
        idx = check_compatible(bm, sae, layer)
    text, notices = clean_text(text, max_chars)
    ids_list, pieces, truncated, n_total = _tokenize(bm, text)
    if truncated:
        shown = "".join(pieces)
        notices.insert(0,
            f"The text is {n_total:,} tokens long but {bm.name} reads at most {bm.context_size:,}: only the "
            f"first {bm.context_size:,} tokens (up to “…{' '.join(shown[-40:].split())}”) were analysed."
        )
    ids = torch.tensor(ids_list, dtype=torch.long)
    timings["tokenize"] = _ms(t0)

    t0 = time.perf_counter()
    with model_lock(bm):
        timings["wait"] = _ms(t0)
        return _run_locked(bm, saes, idx, ids, ids_list, pieces, text, notices, truncated, timings, downstream)


def _run_locked(
    bm: BaseModel, saes: Sequence[SparseAutoencoder], idx: int, ids: Tensor, ids_list: list[int], pieces: list[str],
    text: str, notices: list[str], truncated: bool, timings: dict[str, float], downstream: bool,
) -> list[TextAnalysis]:
    t0 = time.perf_counter()
    with_ce = downstream and len(ids_list) >= 2
    if with_ce:  # one full clean pass gives both the clean logits and the residual at the hook
        clean_logits, resid = _clean_logits_and_residual(bm, ids, idx)
    else:  # activations only: stop after the hooked block
        clean_logits, resid = None, residual_at(bm, ids[None], None, idx)[0]
    x = resid.float().cpu()
    timings["model_forward"] = _ms(t0)

    per_sae = []
    for sae in saes:
        t0 = time.perf_counter()
        p = next(sae.parameters())
        with torch.inference_mode():
            xs = x.to(device=p.device, dtype=p.dtype)
            latents = sae.encode(xs)
            x_hat = sae.decode(latents).float().cpu()
            latents = latents.float().cpu()
        stats = ReconstructionStats().update(x, x_hat, latents).compute()
        keep = (*RECONSTRUCTION_KEYS, layout.L0)
        metrics = {k: float(v) for k, v in stats.items() if k in keep}
        if len(ids_list) < 2:  # the variance about the mean of one vector is zero
            metrics[layout.VARIANCE_EXPLAINED] = float("nan")
        metrics[layout.N_TOKENS] = float(len(ids_list))
        per_sae.append((latents, x_hat, per_token_sq_error(x, x_hat), metrics, _ms(t0)))

    t0 = time.perf_counter()
    nan_tok = torch.full((len(ids_list),), float("nan"))
    ce_rows: list[tuple[Tensor, Tensor]] = [(nan_tok, nan_tok)] * len(saes)
    if with_ce:
        reps = [torch.zeros_like(resid)] + [xh.to(resid.dtype) for _, xh, _, _, _ in per_sae]
        logits = [clean_logits, *_spliced_logits(bm, ids, idx, reps)]
        with torch.inference_mode():
            logp_clean = next_token_logp(logits[0])
            ce_clean_tok = _per_token_ce(logp_clean, ids)
            ce_zero_tok = _per_token_ce(next_token_logp(logits[1]), ids)
            ce_clean, ce_zero = float(ce_clean_tok[1:].mean()), float(ce_zero_tok[1:].mean())
            ce_rows = []
            for (_, _, _, metrics, _), spliced in zip(per_sae, logits[2:]):
                logp = next_token_logp(spliced)
                ce_sae_tok = _per_token_ce(logp, ids)
                ce_sae = float(ce_sae_tok[1:].mean())
                kl = kl_div_from_logp(logp_clean, logp)  # KL(clean || SAE)
                metrics.update(
                    ce_loss_without_sae=ce_clean, ce_loss_with_sae=ce_sae, ce_loss_with_ablation=ce_zero,
                    ce_loss_score=ce_loss_score(ce_clean, ce_sae, ce_zero), kl_div_with_sae=float(kl.mean()),
                )
                ce_rows.append((ce_clean_tok, ce_sae_tok))
    else:
        if downstream:
            notices.append("One token only: the next-token losses need at least two tokens.")
        for *_, metrics, _ in per_sae:
            metrics.update({k: float("nan") for k in DOWNSTREAM_KEYS})
    t_down = _ms(t0)

    x_norm_sq = x.pow(2).sum(-1)
    results = []
    for (latents, _, sq_err, metrics, t_sae), (ce_c, ce_s), sae in zip(per_sae, ce_rows, saes):
        results.append(TextAnalysis(
            text=text, token_texts=pieces, tokens=[visible(p) if p else "◦" for p in pieces], token_ids=ids_list,
            latents=latents, sq_error=sq_err, x_norm_sq=x_norm_sq, metrics=metrics,
            ce_clean_per_token=ce_c, ce_sae_per_token=ce_s, truncated=truncated, notices=list(notices),
            timings={**timings, "sae": t_sae, "downstream": t_down / len(saes) if len(saes) > 1 else t_down},
            model_name=bm.name, hook_name=hook_name(idx), d_sae=sae.cfg.d_sae,
        ))
    return results


def analyze_text(
    bm: BaseModel, sae: SparseAutoencoder, layer: int | str, text: str, max_chars: int = MAX_CHARS,
    downstream: bool = True,
) -> TextAnalysis:
    """Run `text` through the base model up to `layer`, encode with the SAE, and measure the reconstruction.

    Raises AnalysisError for empty or over-long (> max_chars) text and for an SAE that does not match the
    model or hook. Text longer than the model's context is cut to its first window (`truncated`, `notices`).
    `downstream=False` skips the CE/KL passes (their metrics are then NaN).
    """
    return _run(bm, [sae], layer, text, max_chars, downstream)[0]


def compare_saes(
    bm: BaseModel, saes: Sequence[SparseAutoencoder], layer: int | str, text: str, max_chars: int = MAX_CHARS
) -> list[TextAnalysis]:
    """`analyze_text` for several SAEs of one hook, sharing the tokenization and the clean/zero passes."""
    return _run(bm, list(saes), layer, text, max_chars)


# ---------------------------------------------------------------------------------------- latents


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


# ---------------------------------------------------------------------------------------- rendering


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    alpha = 0.0 if not math.isfinite(alpha) else min(max(alpha, 0.0), 1.0)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


ACT_RGB = (255, 127, 14)
ERR_RGB = (214, 39, 40)


def tokens_html(
    analysis: TextAnalysis, values: Sequence[float] | Tensor, *, rgb: tuple[int, int, int] = ACT_RGB,
    scale: float | None = None, selected: int | None = None, value_name: str = "activation",
    extra: Callable[[int], str] | None = None,
) -> str:
    """The text as clickable token spans (`data-pos`), background opacity = value / scale."""
    vals = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    finite = [v for v in vals if math.isfinite(v)]
    if scale is None:
        scale = max(finite, default=0.0)
    scale = scale if scale and scale > 0 else 1.0
    parts = ['<div class="sae-tokens">']
    for pos, (piece, shown, v) in enumerate(zip(analysis.token_texts, analysis.tokens, vals)):
        tip = f"#{pos} {shown} · {value_name} {v:.3g}" if math.isfinite(v) else f"#{pos} {shown}"
        if extra is not None:
            tip += extra(pos)
        cls = "tok sel" if pos == selected else "tok"
        style = f"background:{_rgba(rgb, v / scale)}"
        if not piece:
            body, cls = "◦", cls + " cont"
        elif "\n" in piece:  # newlines show as ↵ inside the token, the line breaks follow it
            body = html.escape(piece.replace("\n", "↵"))
            cls += " nl" if not piece.strip() else ""
        else:
            body = html.escape(piece)
        parts.append(f'<span class="{cls}" data-pos="{pos}" title="{html.escape(tip)}" style="{style}">{body}</span>')
        if piece and "\n" in piece:
            parts.append("<br>" * piece.count("\n"))
    parts.append("</div>")
    return "".join(parts)


def contexts_html(
    stats: LatentStats, latent: int, token_strings: Sequence[str], n: int = 8
) -> str:
    """A latent's top-activating contexts from the held-out stories, the max token bold and underlined."""
    latent = int(latent)
    if not 0 <= latent < stats.d_sae:
        return "<p>No such latent in the saved statistics.</p>"
    acts = stats.top_acts[latent].float()
    ids = stats.top_token_ids[latent]
    window_acts = stats.top_window_acts[latent].float()
    centers = stats.top_center[latent]
    rows = []
    peak = float(acts.max()) if acts.numel() else 0.0
    for j in range(min(int(n), acts.shape[0])):
        if float(acts[j]) <= 0:
            break
        spans = []
        for k, tid in enumerate(ids[j].tolist()):
            if tid < 0:
                continue
            s = token_strings[tid] if tid < len(token_strings) else "?"
            a = float(window_acts[j, k])
            body = html.escape(s).replace("\n", "↵")
            cls = "ctok max" if k == int(centers[j]) else "ctok"
            spans.append(
                f'<span class="{cls}" title="{a:.3g}" style="background:{_rgba(ACT_RGB, a / peak if peak else 0)}">'
                f"{body}</span>"
            )
        rows.append(f'<div class="ctx"><span class="ctx-act">{float(acts[j]):.2f}</span>{"".join(spans)}</div>')
    if not rows:
        return "<p>This latent never fired on the held-out stories.</p>"
    return '<div class="sae-contexts">' + "".join(rows) + "</div>"


def histogram_html(edges: Sequence[float], counts: Sequence[float], marks: Sequence[float] = ()) -> str:
    """A latent's activation histogram as a small HTML bar chart on a log x axis (bins are log-spaced).

    `marks` (e.g. the activations on the user's text) are drawn as ticks under the bars.
    """
    edges, counts = [float(e) for e in edges], [float(c) for c in counts]
    if len(edges) != len(counts) + 1 or not counts or edges[0] <= 0 or edges[-1] <= edges[0]:
        return "<p>No histogram saved.</p>"
    peak = max(counts) or 1.0
    lo, hi = math.log10(edges[0]), math.log10(edges[-1])

    def left(v: float) -> float:
        return 100 * min(max((math.log10(max(v, 1e-30)) - lo) / (hi - lo), 0.0), 1.0)

    bars = "".join(
        f'<div class="hb" title="[{a:.3g}, {b:.3g}): {int(c):,}" style="height:{100 * c / peak:.1f}%"></div>'
        for a, b, c in zip(edges[:-1], edges[1:], counts)
    )
    ticks = "".join(f'<span class="hm" style="left:{left(v):.1f}%" title="{v:.3g}"></span>' for v in marks)
    mid = 10 ** ((lo + hi) / 2)
    return (
        '<div class="sae-hist"><div class="htitle"><b>Activation histogram</b> (held-out stories)</div>'
        '<div class="hbars">' + bars + "</div>"
        f'<div class="hmarks">{ticks}</div>'
        f'<div class="haxis"><span>{edges[0]:.2g}</span><span>{mid:.2g}</span><span>{edges[-1]:.3g}</span></div>'
        f'<div class="hcap">held-out activation counts, log-spaced bins (peak bin {int(peak):,})'
        f'{" · ticks: this text" if len(marks) else ""}</div></div>'
    )


def latent_stats_summary(stats: LatentStats | None, latent: int, d_sae: int) -> dict[str, Any] | None:
    """freq, max_act, n_tokens, hist_edges, hist_counts of one latent from saved stats (None if unusable)."""
    if stats is None or stats.d_sae != d_sae or not 0 <= int(latent) < d_sae:
        return None
    latent = int(latent)
    return {"freq": float(stats.freq[latent]), "max_act": float(stats.max_act[latent]), "n_tokens": stats.n_tokens,
            "hist_edges": stats.hist_edges.tolist(), "hist_counts": stats.hist_counts[latent].tolist()}


def timings_line(timings: dict[str, float]) -> str:
    names = (("model_forward", "model forward"), ("sae", "SAE"), ("downstream", "downstream CE passes"),
             ("render", "rendering"))
    return " · ".join(f"{label} {timings[k]:.0f} ms" for k, label in names if k in timings)


# ---------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Source:
    root: Path
    label: str
    """'local' or the Hub repo id."""


@dataclass(frozen=True)
class Entry:
    info: CheckpointInfo
    source: Source
    model_key: str
    """The model's name in the app (the model name, suffixed with the source when two sources share it)."""


class CheckpointCatalog:
    """The language-model SAE checkpoints and toy-model folders under some roots."""

    def __init__(self, sources: Sequence[Source], base_models: dict[str, str] | None = None) -> None:
        self.sources = list(sources)
        self.base_models = dict(base_models or {})
        """model_name -> base model source, overriding the lookup of `base_model_source`."""
        self.entries: list[Entry] = []
        self.toy_folders: list[Path] = []
        owner: dict[str, Source] = {}
        for src in self.sources:
            if not src.root.is_dir():
                continue
            for info in list_checkpoints(src.root):
                if info.model_name == TOY_MODEL_NAME or layout.TOY_DIR in info.path.relative_to(src.root).parts[:1]:
                    continue
                key = info.model_name
                if owner.setdefault(key, src) != src:
                    key = f"{info.model_name} [{src.label}]"
                self.entries.append(Entry(info, src, key))
            toy_root = src.root / layout.TOY_DIR
            if toy_root.is_dir():
                for d in sorted(toy_root.iterdir()):
                    if d.is_dir() and not d.name.startswith(".") and any(
                        (d / f).is_file() for f in (layout.TOY_CONFIG_FILE, METRICS_FILE, layout.TOY_FEATURES_PLOT)
                    ):
                        self.toy_folders.append(d)

    # -- cascading choices
    def models(self) -> list[str]:
        return list(dict.fromkeys(e.model_key for e in self.entries))

    def hooks(self, model: str) -> list[str]:
        return list(dict.fromkeys(e.info.hook_name for e in self.entries if e.model_key == model))

    def runs(self, model: str, hook: str) -> list[str]:
        return sorted({e.info.run for e in self.entries if e.model_key == model and e.info.hook_name == hook})

    def widths(self, model: str, hook: str, run: str) -> list[int]:
        return sorted({e.info.d_sae for e in self._sel(model, hook, run)})

    def steps(self, model: str, hook: str, run: str, d_sae: int) -> list[int | None]:
        steps = {e.info.step for e in self._sel(model, hook, run) if e.info.d_sae == d_sae}
        return sorted(steps, key=lambda s: (s is None, s or 0))

    def _sel(self, model: str, hook: str, run: str) -> list[Entry]:
        return [e for e in self.entries if e.model_key == model and e.info.hook_name == hook and e.info.run == run]

    def find(self, model: str, hook: str, run: str, d_sae: int | str, step: int | None) -> Entry:
        for e in self._sel(model, hook, run):
            if e.info.d_sae == int(d_sae) and e.info.step == step:
                return e
        raise AnalysisError(f"No checkpoint {model} / {hook} / {run} / F={d_sae} / step {step or 'final'}.")

    def finals(self, model: str, hook: str) -> list[Entry]:
        """Every final checkpoint of one model and hook: the compare tab's rows."""
        return [e for e in self.entries if e.model_key == model and e.info.hook_name == hook and e.info.step is None]

    def default(self) -> Entry | None:
        """A sensible first checkpoint: tinystories-mini if present, run 'standard' if present, widest F."""
        if not self.entries:
            return None
        finals = [e for e in self.entries if e.info.step is None] or self.entries

        def score(e: Entry) -> tuple:
            return (e.info.model_name != "tinystories-mini", e.info.run != "standard", -e.info.d_sae)

        return min(finals, key=score)

    def base_model_source(self, entry: Entry) -> str:
        """Where to load the base model an SAE was trained on: the metadata, the folder beside it, or the Hub."""
        info = entry.info
        if info.model_name in self.base_models:
            return self.base_models[info.model_name]
        final = info.path.parent.parent if info.step is not None else info.path
        model_dir = final.parent.parent.parent  # <root>/<model>/<hook>/<run>/F<d>
        if (model_dir / "config.json").is_file():
            return str(model_dir)
        meta = _read_metadata(info.path)
        for key in MODEL_SOURCE_KEYS:
            val = meta.get(key)
            if isinstance(val, str) and val:
                p = Path(val)
                if not p.is_absolute():
                    for base in (entry.source.root, entry.source.root.parent):
                        if (base / p / "config.json").is_file():
                            return str(base / p)
                if p.is_dir() or "/" in val or val.startswith("random:"):
                    return val
        name = info.model_name
        if (entry.source.root / name / "config.json").is_file():
            return str(entry.source.root / name)
        return KNOWN_HUB_IDS.get(name.lower(), name)


def fetch_hub_sources(repo_ids: Sequence[str], timeout: float = 20.0) -> tuple[list[Source], list[str]]:
    """Download Hub repos of checkpoint folders in parallel, giving up on each after `timeout` seconds.

    Returns the sources that arrived and one notice per repo that did not (offline, unknown repo, timeout),
    so an unreachable Hub never blocks the local checkpoints.
    """
    results: dict[str, Path | str] = {}

    def fetch(repo: str) -> None:
        try:
            results[repo] = download_checkpoints(repo)
        except Exception as err:  # any failure becomes a notice
            results[repo] = str(err)

    threads = [threading.Thread(target=fetch, args=(r,), daemon=True) for r in repo_ids]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    sources, notices = [], []
    for repo in repo_ids:
        got = results.get(repo)
        if isinstance(got, Path):
            sources.append(Source(got, repo))
        elif got is None:
            notices.append(f"Hub repo {repo!r}: no answer within {timeout:.0f} s (offline?); skipped.")
        else:
            first = got.splitlines()[0] if got else "unknown error"
            notices.append(f"Hub repo {repo!r} skipped: {first[:300]}")
    return sources, notices


def _read_metadata(folder: Path) -> dict[str, Any]:
    try:
        raw = read_json(folder / layout.CFG_FILE)
    except CheckpointError:
        return {}
    return dict(raw.get("metadata") or {}) if isinstance(raw, dict) else {}


def read_metrics(folder: str | Path) -> dict[str, Any] | None:
    """metrics.json of a checkpoint or toy folder, or None if absent/unreadable."""
    try:
        data = read_json(Path(folder) / METRICS_FILE)
    except CheckpointError:
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------- cache


class ModelCache:
    """Loads each base model, SAE and latent-stats file once; least-recently-used ones are dropped."""

    def __init__(self, max_models: int = 2, max_saes: int = 32, device: str = "cpu") -> None:
        self.max_models, self.max_saes, self.device = max_models, max_saes, device
        self._models: OrderedDict[str, BaseModel] = OrderedDict()
        self._saes: OrderedDict[str, SparseAutoencoder] = OrderedDict()
        self._stats: OrderedDict[str, LatentStats | None] = OrderedDict()
        self._strings: dict[str, list[str]] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}

    @staticmethod
    def _key(path: str | Path) -> str:
        s = str(path)
        if s.startswith("random:"):
            return s
        p = Path(s).expanduser()
        return str(p.resolve()) if p.exists() else s

    def _get(self, store: OrderedDict, key: str, limit: int, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
            key_lock = self._key_locks.setdefault(f"{id(store)}:{key}", threading.Lock())
        with key_lock:  # concurrent first requests load once
            with self._lock:
                if key in store:
                    store.move_to_end(key)
                    return store[key]
            value = load()
            with self._lock:
                store[key] = value
                while len(store) > limit:
                    store.popitem(last=False)
            return value

    def base_model(self, source: str) -> BaseModel:
        key = self._key(source)

        def load() -> BaseModel:
            try:
                return load_base_model(source if source.startswith("random:") else key, device=self.device)
            except Exception as err:  # any loading failure is shown to the user
                raise AnalysisError(f"Could not load the base model {source!r}: {err}") from err

        return self._get(self._models, key, self.max_models, load)

    def sae(self, folder: str | Path) -> SparseAutoencoder:
        key = self._key(folder)

        def load() -> SparseAutoencoder:
            try:
                return load_sae(key, device=self.device)
            except CheckpointError as err:
                raise AnalysisError(f"Could not load the SAE: {err}") from err

        return self._get(self._saes, key, self.max_saes, load)

    def latent_stats(self, folder: str | Path) -> LatentStats | None:
        key = self._key(folder)

        def load() -> LatentStats | None:
            try:
                return LatentStats.load(key)
            except ValueError:
                return None

        return self._get(self._stats, key, self.max_saes, load)

    def token_strings(self, bm: BaseModel) -> list[str]:
        """The decoded text of every vocabulary id of a model (computed once per model)."""
        with self._lock:
            cached = self._strings.get(bm.source)
        if cached is not None:
            return cached
        tok = bm.tokenizer
        strings = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
        with self._lock:
            self._strings[bm.source] = strings
        return strings

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._saes.clear()
            self._stats.clear()
            self._strings.clear()
