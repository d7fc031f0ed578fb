"""Text -> tokens, latent activations and reconstruction quality of one SAE (or several of one hook).

- `analyze_text(bm, sae, layer, text)` runs one story through the base model and an SAE and returns a
  `TextAnalysis`: tokens, latents [T, F], per-token squared error, reconstruction metrics, downstream
  cross-entropy clean / with the SAE spliced in / with zeros spliced in, and the time of each phase.
- `compare_saes` does the same for several SAEs of one hook with a single base-model pass.

Metrics come from `sae.metrics` and `sae.splice`, so a number here means what it means in metrics.json.
"""

from __future__ import annotations

import threading
import time
import unicodedata
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from explorer.errors import AnalysisError
from sae import layout
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel, hook_name, parse_hook_name, residual_at
from sae.metrics import ReconstructionStats, ce_loss_score, per_token_sq_error
from sae.splice import clean_pass, splice_losses

MAX_CHARS = 5_000
"""Longest text (after cleaning) the app analyses."""
DOWNSTREAM_KEYS = layout.DOWNSTREAM_KEYS
"""metrics.json keys of the downstream losses (NaN when they are skipped)."""


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


def tokenize_text(bm: BaseModel, text: str) -> tuple[list[int], list[str], bool, int]:
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


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _per_token_ce(ce: Tensor) -> Tensor:
    """[T] from one row [1, T-1] of `splice_losses`: NaN at t = 0 (nothing predicts the first token)."""
    return torch.cat([torch.full((1,), float("nan")), ce[0].float().cpu()])


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
    ids_list, pieces, truncated, n_total = tokenize_text(bm, text)
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
    clean = None
    if with_ce:  # one full clean pass gives both the clean logits and the residual at the hook
        clean = clean_pass(bm, ids[None], None, idx)
        resid = clean.residual[0]
    else:  # activations only: stop after the hooked block
        resid = residual_at(bm, ids[None], None, idx)[0]
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
        keep = (layout.MSE, layout.VARIANCE_EXPLAINED, layout.COSSIM, layout.L2_RATIO, layout.L0)
        metrics = {k: float(v) for k, v in stats.items() if k in keep}
        if len(ids_list) < 2:  # the variance about the mean of one vector is zero
            metrics[layout.VARIANCE_EXPLAINED] = float("nan")
        metrics["n_tokens"] = float(len(ids_list))
        per_sae.append((latents, x_hat, per_token_sq_error(x, x_hat), metrics, _ms(t0)))

    t0 = time.perf_counter()
    nan_tok = torch.full((len(ids_list),), float("nan"))
    ce_rows: list[tuple[Tensor, Tensor]] = [(nan_tok, nan_tok)] * len(saes)
    if with_ce:
        reps = [xh[None].to(resid.dtype) for _, xh, _, _, _ in per_sae]
        losses = splice_losses(bm, ids[None], None, idx, reps, clean=clean)
        ce_clean_tok, ce_zero_tok = _per_token_ce(losses.ce_clean), _per_token_ce(losses.ce_ablation)
        ce_clean, ce_zero = float(ce_clean_tok[1:].mean()), float(ce_zero_tok[1:].mean())
        ce_rows = []
        for (_, _, _, metrics, _), ce_s, kl in zip(per_sae, losses.ce_spliced, losses.kl_spliced):
            ce_sae_tok = _per_token_ce(ce_s)
            ce_sae = float(ce_sae_tok[1:].mean())
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
    bm: BaseModel, saes: Sequence[SparseAutoencoder], layer: int | str, text: str, max_chars: int = MAX_CHARS,
    downstream: bool = True,
) -> list[TextAnalysis]:
    """`analyze_text` for several SAEs of one hook, sharing the tokenization and the clean/zero passes."""
    return _run(bm, list(saes), layer, text, max_chars, downstream)


