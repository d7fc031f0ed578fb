"""The compare tab's training curves and the toy tab's tables, read from checkpoint folders."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from explorer.render import fmt
from sae import layout

LOSS_CURVES_FILE = layout.LOSS_CURVES_FILE
CURVE_TERMS = ("loss", "mse", "l0", "frac_dead")
"""loss_curves.csv columns plotted in the compare tab (when present): the "four regimes" picture."""


def round_metric(v: Any, digits: int = 4) -> Any:
    return round(v, digits) if isinstance(v, float) and math.isfinite(v) else v


def read_loss_curves(folder: Path) -> dict[str, list[float]] | None:
    path = folder / LOSS_CURVES_FILE
    if not path.is_file():
        return None
    cols: dict[str, list[float]] = {}
    try:
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                for k, v in row.items():
                    try:
                        cols.setdefault(k, []).append(float(v))
                    except (TypeError, ValueError):
                        cols.setdefault(k, []).append(math.nan)
    except (OSError, csv.Error):
        return None
    return cols or None


def loss_figure(curves: list[tuple[str, dict[str, list[float]]]]) -> Figure | None:
    """One panel per loss term, one line per checkpoint."""
    curves = [(lbl, c) for lbl, c in curves if c]
    if not curves:
        return None
    xkeys = ("tokens", "n_tokens", "step", "steps")
    terms: list[str] = []
    for _, c in curves:
        for k in c:
            if k not in xkeys and k not in terms and any(math.isfinite(v) for v in c[k]):
                terms.append(k)
    preferred = [t for t in CURVE_TERMS if t in terms]
    terms = (preferred or [t for t in terms if "loss" in t.lower() or t.startswith("L_")] or terms)[:4]
    fig = Figure(figsize=(3.6 * len(terms) + 1.6, 3.0), layout="constrained")
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    for ax, term in zip(axes, terms):
        for label, c in curves:
            if term not in c:
                continue
            xk = next((k for k in xkeys if k in c), None)
            xs = c[xk] if xk else list(range(len(c[term])))
            ax.plot(xs, c[term], label=label, lw=1.3)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel(next((k for k in xkeys if k in curves[0][1]), "row"))
        if all(v > 0 for _, c in curves if term in c for v in c[term] if math.isfinite(v)):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    return fig


def toy_tables(metrics: dict[str, Any] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary scalars, per-instance table) from a toy folder's metrics.json, whatever its exact shape."""
    if not metrics:
        return pd.DataFrame(), pd.DataFrame()
    scalars: dict[str, Any] = {}
    per_inst: dict[str, list] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}" if not prefix else f"{prefix}.{k}", v)
        elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
            for i, r in enumerate(obj):
                for k, v in r.items():
                    if k in ("inst", "instance"):
                        continue
                    if isinstance(v, (int, float, str, bool)):
                        per_inst.setdefault(k, [None] * len(obj))[i] = round_metric(v)
                    elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                        per_inst.setdefault(f"min {k}", [None] * len(obj))[i] = round_metric(min(v))
                        per_inst.setdefault(k, [None] * len(obj))[i] = " ".join(f"{x:.3f}" for x in v)
        elif isinstance(obj, list) and obj and all(isinstance(v, (int, float, bool)) for v in obj):
            per_inst[prefix] = list(obj)
        elif isinstance(obj, (int, float, str, bool)) or obj is None:
            scalars[prefix] = obj

    walk("", metrics)
    n = max((len(v) for v in per_inst.values()), default=0)
    inst_cols = {k: v for k, v in per_inst.items() if len(v) == n}
    for k, v in per_inst.items():
        if len(v) != n:
            scalars[k] = ", ".join(fmt(x) if isinstance(x, float) else str(x) for x in v[:20])
    inst = pd.DataFrame({"instance": list(range(n)), **inst_cols}) if n else pd.DataFrame()
    summary = pd.DataFrame({"metric": list(scalars), "value": [str(v) for v in scalars.values()]})
    return summary, inst
