"""Evaluate trained SAEs on held-out stories: `metrics.json` and `latent_stats.safetensors` per checkpoint.

One pass over the validation stories serves every SAE: per batch of stories the base model runs once
to the hook (the residual), once clean and once with zeros spliced in (CE of the ablation); then once
per SAE with its reconstruction spliced in. Reconstruction metrics come from `sae.metrics`
(`ReconstructionStats`), downstream ones from `sae.splice.splice_losses` over the positions whose
next token is real. A second, model-free pass per SAE re-encodes the stored residuals to fill the
latent histograms and the activations over each top context's window.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel, residual_at
from sae.checkpoint import METRICS_FILE, load_sae
from sae.latent_stats import LATENT_STATS_FILE, LatentStats, empty_histogram_edges
from sae.metrics import METRICS_VERSION, ReconstructionStats, ce_loss_score
from sae.splice import splice_losses
from training.activations import TokenBatch, tokenize_stories


@dataclass
class EvalConfig:
    max_tokens: int | None = 20_000
    """Validation tokens to evaluate on (whole stories, in order, until this many; None: all)."""
    eval_batch_size: int = 4
    """Stories per forward pass of the base model."""
    n_top: int = 12
    """Top-activating contexts kept per latent."""
    window: int = 16
    """Tokens per context window."""
    tokens_after: int = 4
    """Tokens after the max-activating token inside the window (the rest come before it)."""
    n_bins: int = 40
    """Bins of the per-latent activation histograms."""
    downstream: bool = True
    """Also compute the spliced cross-entropy losses (costs one model forward per SAE)."""
    splice_budget: int = 64_000_000
    """Most logits (batch x seq x vocab) per spliced forward pass: SAEs are spliced several at a time."""


class EvalSet(NamedTuple):
    tokens: TokenBatch
    """[n_stories, context] one story per row, right-padded."""
    n_tokens: int
    info: dict[str, Any]


def eval_set(bm: BaseModel, stories: list[str], context_size: int, cfg: EvalConfig,
             info: dict[str, Any] | None = None) -> EvalSet:
    """Validation stories, one per row (truncated to the context), until `cfg.max_tokens` tokens."""
    if not stories:
        raise ValueError("no validation stories to evaluate on")
    tokens = tokenize_stories(bm.tokenizer, stories, context_size, pack=False, prepend_bos=bm.prepend_bos)
    lengths = tokens.attention_mask.sum(1)
    rows = len(lengths)
    if cfg.max_tokens is not None:
        rows = int((lengths.cumsum(0) < cfg.max_tokens).sum()) + 1
        rows = min(rows, len(lengths))
    width = int(lengths[:rows].max())
    tokens = TokenBatch(tokens.input_ids[:rows, :width], tokens.attention_mask[:rows, :width])
    n = int(tokens.attention_mask.sum())
    meta = {**(info or {}), "split": "validation: every 10th story (training.stories.split_stories)",
            "n_stories": rows, "context_size": context_size, "n_tokens": n}
    return EvalSet(tokens, n, meta)


class _TopTracker:
    """Running top-n activations per latent over a stream of token batches."""

    def __init__(self, d_sae: int, n_top: int) -> None:
        self.vals = torch.zeros(d_sae, n_top)
        self.pos = torch.full((d_sae, n_top), -1, dtype=torch.long)

    def update(self, latents: Tensor, start: int) -> None:
        """`latents [n, F]` of the tokens with flat indices start .. start+n-1."""
        n = latents.shape[0]
        vals = torch.cat([self.vals, latents.t().float()], dim=1)
        pos = torch.cat([self.pos, torch.arange(start, start + n).expand(latents.shape[1], n)], dim=1)
        top, idx = vals.topk(self.vals.shape[1], dim=1)
        self.vals, self.pos = top, pos.gather(1, idx)


class _SAEAccumulator:
    def __init__(self, sae: SparseAutoencoder, cfg: EvalConfig) -> None:
        self.sae = sae
        self.recon = ReconstructionStats()
        self.top = _TopTracker(sae.cfg.d_sae, cfg.n_top)
        self.max_act = torch.zeros(sae.cfg.d_sae)
        self.ce_sae = 0.0
        self.kl = 0.0


@torch.no_grad()
def evaluate_saes(
    bm: BaseModel, layer: int, saes: list[SparseAutoencoder], es: EvalSet, cfg: EvalConfig, progress: bool = True
) -> tuple[list[dict[str, Any]], list[LatentStats]]:
    """Metrics (metrics.json content) and LatentStats of each SAE on the eval set."""
    ids_all, mask_all = es.tokens
    accs = [_SAEAccumulator(s.eval(), cfg) for s in saes]
    ce_clean = ce_ablation = 0.0
    n_ce = 0
    xs: list[Tensor] = []
    start = 0
    batches = range(0, len(ids_all), cfg.eval_batch_size)
    for b0 in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        ids = ids_all[b0: b0 + cfg.eval_batch_size]
        mask = mask_all[b0: b0 + cfg.eval_batch_size]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        resid = residual_at(bm, ids, mask, layer).float().cpu()  # [b, s, d]
        keep = mask.bool().reshape(-1)
        x = resid.reshape(-1, resid.shape[-1])[keep]  # [n, d], row-major over the stories' real tokens
        xs.append(x)
        recons = []
        for acc in accs:
            out = acc.sae(resid.reshape(-1, resid.shape[-1]).to(acc.sae.W_enc.dtype))
            lat, rec = out.latents[keep].float(), out.reconstruction.float()
            acc.recon.update(x, rec[keep], lat)
            acc.max_act = torch.maximum(acc.max_act, lat.max(0).values.clamp_min(0))
            acc.top.update(lat, start)
            recons.append(rec.view_as(resid))
        if cfg.downstream:
            losses = splice_losses(bm, ids, mask, layer, recons, cfg.splice_budget)
            n_ce += losses.n_tokens
            ce_clean += float(losses.ce_clean.sum())
            ce_ablation += float(losses.ce_ablation.sum())
            for acc, ce, kl in zip(accs, losses.ce_spliced, losses.kl_spliced):
                acc.ce_sae += float(ce.sum())
                acc.kl += float(kl.sum())
        start += x.shape[0]
    x_all = torch.cat(xs)
    results, stats = [], []
    for acc in accs:
        metrics: dict[str, Any] = {"metrics_version": METRICS_VERSION, **acc.recon.summary()}
        if cfg.downstream:
            n = max(n_ce, 1)
            clean_ce, sae_ce, abl_ce = ce_clean / n, acc.ce_sae / n, ce_ablation / n
            metrics.update(ce_loss_without_sae=clean_ce, ce_loss_with_sae=sae_ce, ce_loss_with_ablation=abl_ce,
                           ce_loss_score=ce_loss_score(clean_ce, sae_ce, abl_ce), kl_div_with_sae=acc.kl / n,
                           n_ce_tokens=n_ce)
        metrics["eval_set"] = es.info
        results.append(metrics)
        stats.append(_latent_stats(acc, x_all, es, cfg))
    return results, stats


@torch.no_grad()
def _latent_stats(acc: _SAEAccumulator, x_all: Tensor, es: EvalSet, cfg: EvalConfig, chunk: int = 2048) -> LatentStats:
    """Histograms and window activations from one re-encoding pass over the stored residuals."""
    sae, n_lat = acc.sae, acc.sae.cfg.d_sae
    ids, mask = es.tokens
    lengths = mask.sum(1)
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    n_tok = x_all.shape[0]
    tok_row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [n_tok]
    tok_col = torch.arange(n_tok) - row_start[tok_row]
    # Windows: `before` tokens, the max token, `after` tokens; -1 outside the story.
    after = min(cfg.tokens_after, cfg.window - 1)
    before = cfg.window - 1 - after
    used = (acc.top.vals > 0) & (acc.top.pos >= 0)  # [F, n_top]
    pos = acc.top.pos.clamp_min(0)
    offsets = torch.arange(-before, after + 1)  # [window]
    col = tok_col[pos][..., None] + offsets  # [F, n_top, window]
    row = tok_row[pos][..., None].expand_as(col)
    inside = used[..., None] & (col >= 0) & (col < lengths[row])
    flat = torch.where(inside, row_start[row] + col, torch.full_like(col, -1))
    token_ids = torch.where(inside, ids[row, col.clamp(0, ids.shape[1] - 1)], torch.full_like(col, -1))
    # Activation of latent f at window token q: gather from each re-encoded chunk (entries sorted by q).
    lat_of = torch.arange(n_lat)[:, None, None].expand_as(col).reshape(-1)
    q = flat.reshape(-1)
    order = torch.argsort(q)
    q_sorted, lat_sorted = q[order], lat_of[order]
    win_vals = torch.zeros(q.numel())
    edges = empty_histogram_edges(float(acc.max_act.max()), cfg.n_bins)
    hist = torch.zeros(n_lat * cfg.n_bins, dtype=torch.long)
    for t0 in range(0, n_tok, chunk):
        z = sae.encode(x_all[t0: t0 + chunk].to(sae.W_enc.dtype)).float()  # [c, F]
        r, c = (z > 0).nonzero(as_tuple=True)
        b = (torch.bucketize(z[r, c], edges) - 1).clamp_(0, cfg.n_bins - 1)
        hist += torch.bincount(c * cfg.n_bins + b, minlength=n_lat * cfg.n_bins)
        lo, hi = torch.searchsorted(q_sorted, torch.tensor([t0, t0 + z.shape[0]]))
        if hi > lo:
            sel = order[lo:hi]
            win_vals[sel] = z[q_sorted[lo:hi] - t0, lat_sorted[lo:hi]]
    freq = acc.recon.fire_counts.double() / max(acc.recon.n_tokens, 1) if acc.recon.fire_counts is not None \
        else torch.zeros(n_lat, dtype=torch.float64)
    return LatentStats(
        freq=freq.float(),
        max_act=acc.max_act.float(),
        hist_edges=edges.float(),
        hist_counts=hist.view(n_lat, cfg.n_bins).to(torch.int32),
        top_acts=torch.where(used, acc.top.vals, torch.zeros_like(acc.top.vals)).float(),
        top_token_ids=token_ids.to(torch.int32),
        top_window_acts=win_vals.view(n_lat, cfg.n_top, cfg.window).half(),
        top_center=torch.full((n_lat, cfg.n_top), before, dtype=torch.int32),
        n_tokens=es.n_tokens,
    )


def _replace_file(folder: Path, name: str, write) -> Path:
    """Write `folder/name` through a temporary file in the same folder and one rename (atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / name


def save_results(folder: str | Path, metrics: dict[str, Any], stats: LatentStats | None) -> None:
    """metrics.json and latent_stats.safetensors into an existing SAE folder, each file atomically."""
    folder = Path(folder)
    _replace_file(folder, METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    if stats is not None:
        def write_stats(p: Path) -> None:
            with tempfile.TemporaryDirectory(dir=folder, prefix=".stats-") as tmp:
                os.replace(stats.save(tmp), p)

        _replace_file(folder, LATENT_STATS_FILE, write_stats)


def evaluate_folders(
    bm: BaseModel, layer: int, folders: list[Path], es: EvalSet, cfg: EvalConfig, progress: bool = True
) -> list[dict[str, Any]]:
    """Load each checkpoint, evaluate them together, write metrics.json + latent_stats.safetensors beside each."""
    saes = [load_sae(f) for f in folders]
    for folder, sae in zip(folders, saes):
        if sae.cfg.d_in != bm.d_model:
            raise ValueError(f"{folder}: SAE reads d_in={sae.cfg.d_in}, the base model has d_model={bm.d_model}")
    metrics, stats = evaluate_saes(bm, layer, saes, es, cfg, progress)
    for folder, m, s in zip(folders, metrics, stats):
        save_results(folder, m, s)
    return metrics
