"""Pictures of toy-model SAEs in 2-D: a grid of instances, a training animation, a recovery summary.

Uses matplotlib's object API (`Figure`, no pyplot state), so it runs headless and in threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.animation import PillowWriter
from matplotlib.figure import Figure
from torch import Tensor

from sae.architectures import SparseAutoencoder
from sae.metrics import RECOVERY_THRESHOLD

_FEATURE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"]


def _grid(n: int, size: float, **kw: Any) -> tuple[Figure, list]:
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size, size * rows / cols), **kw)
    axes = fig.subplots(rows, cols, squeeze=False).flatten().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _panel(ax, true_dirs: Tensor, lim: float) -> None:
    """Axes set-up plus the toy model's feature directions `[n_features, 2]` (gray lines, colored tips)."""
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.axhline(0, color="#eee", lw=0.6, zorder=0)
    ax.axvline(0, color="#eee", lw=0.6, zorder=0)
    for f, (x, y) in enumerate(true_dirs.tolist()):
        ax.plot([0, x], [0, y], color="#bbb", lw=3, zorder=1, solid_capstyle="round")
        ax.plot([x], [y], "o", color=_FEATURE_COLORS[f % 10], ms=6, zorder=2)


def _nearest_feature(true_dirs: Tensor, rows: Tensor) -> list[int]:
    """For each row `[d_sae, 2]`, the feature `[n_features, 2]` it is most aligned with (its color)."""
    t = true_dirs / true_dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (r @ t.T).argmax(-1).tolist()


def plot_features(true_dirs: Tensor, sae: SparseAutoencoder, best_cos: Tensor, path: str | Path,
                  title: str = "") -> None:
    """One panel per instance: true features (gray lines, dots), decoder rows (solid arrows, unit length) and
    encoder directions (dotted, unit length), each latent colored by the feature it is closest to.

    `true_dirs [inst, n_features, 2]`, `best_cos [inst, n_features]`.
    """
    w_dec = sae.W_dec.detach().cpu()
    w_enc = sae.W_enc.detach().cpu().transpose(-1, -2)
    true_dirs = true_dirs.detach().cpu()
    n_inst = true_dirs.shape[0]
    lim = 1.15 * max(float(true_dirs.norm(dim=-1).max()), 1.0)
    fig, axes = _grid(n_inst, 10, dpi=60)
    for i, ax in enumerate(axes):
        _panel(ax, true_dirs[i], lim)
        colors = _nearest_feature(true_dirs[i], w_dec[i])
        enc = w_enc[i] / w_enc[i].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for j, ((dx, dy), (ex, ey)) in enumerate(zip(w_dec[i].tolist(), enc.tolist())):
            c = _FEATURE_COLORS[colors[j] % 10]
            ax.plot([0, ex], [0, ey], ":", color=c, lw=1.2, zorder=3)
            ax.annotate("", (dx, dy), (0, 0), arrowprops={"arrowstyle": "-|>", "color": c, "lw": 1.5}, zorder=4)
        n_rec = int((best_cos[i] > RECOVERY_THRESHOLD).sum())
        ok = n_rec == best_cos.shape[1]
        ax.set_title(f"inst {i}: {n_rec}/{best_cos.shape[1]}, min cos {float(best_cos[i].min()):.3f}",
                     fontsize=9, color="#1a7f37" if ok else "#b42318")
    fig.suptitle(f"{title}\ngray: toy-model features · arrows: SAE decoder rows · dotted: encoder directions",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


def animate_training(true_dirs: Tensor, log: Any, path: str | Path, title: str = "", max_frames: int = 33,
                     fps: int = 6, dpi: int = 50) -> None:
    """GIF of the decoder rows moving during training (`log`: a ToyTrainLog with W_dec snapshots)."""
    true_dirs = true_dirs.detach().cpu()
    snaps, steps = log.W_dec, log.snapshot_steps.tolist()
    picks = sorted({round(k * (len(steps) - 1) / max(max_frames - 1, 1)) for k in range(max_frames)})
    n_inst = true_dirs.shape[0]
    lim = 1.15 * max(float(true_dirs.norm(dim=-1).max()), 1.0)
    fig, axes = _grid(n_inst, 6.4, dpi=dpi)
    lines, tips = [], []
    final = snaps[-1]
    for i, ax in enumerate(axes):
        _panel(ax, true_dirs[i], lim)
        colors = _nearest_feature(true_dirs[i], final[i])
        # no antialiasing: flat colors keep the GIF small
        lines.append([ax.plot([], [], color=_FEATURE_COLORS[c % 10], lw=1.6, zorder=3, antialiased=False)[0]
                      for c in colors])
        tips.append([ax.plot([], [], "x", color=_FEATURE_COLORS[c % 10], ms=5, zorder=4, antialiased=False)[0]
                     for c in colors])
        ax.set_title(f"inst {i}", fontsize=8)
    text = fig.suptitle("", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    resampled = set(getattr(log, "resample_steps", []))
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(path), dpi=dpi):
        for k in picks:
            for i in range(n_inst):
                for j, (x, y) in enumerate(snaps[k, i].tolist()):
                    lines[i][j].set_data([0, x], [0, y])
                    tips[i][j].set_data([x], [y])
            mark = " (after resampling)" if steps[k] in resampled else ""
            text.set_text(f"{title}: decoder rows, step {steps[k]}{mark}")
            writer.grab_frame()
        for _ in range(fps):  # hold the final frame for a second
            writer.grab_frame()


def plot_recovery_summary(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Bars per architecture × resampling: instances recovering all features, and the dead-latent fraction.

    Each row: architecture, resample, n_all_recovered, n_inst, mean_frac_dead.
    """
    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    methods = list(dict.fromkeys(r["resample"] for r in rows))
    by_key = {(r["architecture"], r["resample"]): r for r in rows}
    fig = Figure(figsize=(10, 3.8), dpi=80)
    ax_rec, ax_dead = fig.subplots(1, 2)
    width = 0.8 / max(len(methods), 1)
    n_inst = max(int(r["n_inst"]) for r in rows)
    for m, method in enumerate(methods):
        xs = [a + (m - (len(methods) - 1) / 2) * width for a in range(len(archs))]
        rec = [by_key.get((a, method), {}).get("n_all_recovered", 0) for a in archs]
        dead = [100 * by_key.get((a, method), {}).get("mean_frac_dead", 0.0) for a in archs]
        color = ["#9aa5b1", "#5b8def", "#1a7f37", "#d62728"][m % 4]
        bars = ax_rec.bar(xs, rec, width, label=method, color=color)
        ax_rec.bar_label(bars, fontsize=8)
        bars = ax_dead.bar(xs, dead, width, label=method, color=color)
        ax_dead.bar_label(bars, fmt="%.1f", fontsize=8)
    for ax in (ax_rec, ax_dead):
        ax.set_xticks(range(len(archs)), archs)
        ax.spines[["top", "right"]].set_visible(False)
    ax_rec.set_ylim(0, n_inst + 1)
    ax_rec.set_ylabel(f"instances (of {n_inst}) recovering all features")
    ax_rec.set_title(f"feature recovery (cos > {RECOVERY_THRESHOLD})", fontsize=10)
    ax_dead.set_ylabel("dead latents (%)")
    ax_dead.set_title("dead latents after training", fontsize=10)
    handles, labels = ax_rec.get_legend_handles_labels()
    fig.legend(handles, labels, title="dead-latent resampling", fontsize=8, title_fontsize=8, loc="lower center",
               ncols=len(methods), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
