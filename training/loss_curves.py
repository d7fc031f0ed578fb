"""Loss curves of the language-model trainer: one CSV row per log interval, and the per-run picture.

```
<run folder>/F<d_sae>/loss_curves.csv     one SAE's rows (CURVE_COLUMNS)
<run folder>/loss_curves.{csv,png}        every width of the run: the "four regimes" picture
```
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae.layout import LOSS_CURVES_FILE as CURVES_FILE
from sae.layout import LOSS_CURVES_PLOT as CURVES_PLOT
from training.trainer_config import SAESpec

CURVE_COLUMNS = ("step", "tokens", "lr", "sparsity_coeff", "loss", "mse", "variance_explained", "sparsity_loss",
                 "aux_loss", "l0", "frac_dead")


def write_curve_csv(path: Path, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    extra = extra or {}
    cols = [*extra, *CURVE_COLUMNS]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({**extra, **{c: row.get(c, "") for c in CURVE_COLUMNS}})


def read_curve_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a loss_curves.csv (numeric columns as floats)."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, val in row.items():
            try:
                parsed[key] = int(val) if key in ("step", "tokens", "d_sae") else float(val)
            except (TypeError, ValueError):
                parsed[key] = val
        out.append(parsed)
    return out



def write_run_curves(specs: Sequence[SAESpec], curves: Sequence[list[dict[str, float]]]) -> list[Path]:
    """Per run folder: loss_curves.csv (all widths, long format) and loss_curves.png (one line per F)."""
    by_run: dict[Path, list[tuple[SAESpec, list[dict[str, float]]]]] = {}
    for spec, curve in zip(specs, curves):
        by_run.setdefault(spec.folder.parent, []).append((spec, curve))
    written = []
    for run_dir, items in by_run.items():
        rows = [{"d_sae": s.cfg.d_sae, **r} for s, c in items for r in c]
        cols = ["run", "d_sae", *CURVE_COLUMNS]
        with (run_dir / CURVES_FILE).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            for r in rows:
                writer.writerow({"run": items[0][0].run, **{c: r.get(c, "") for c in cols[1:]}})
        written.append(plot_curves(run_dir / CURVES_PLOT, items[0][0].run, [(s.cfg.d_sae, c) for s, c in items],
                                   d_in=items[0][0].cfg.d_in))
    return written


def plot_curves(path: Path, title: str, curves: Sequence[tuple[int, list[dict[str, float]]]], d_in: int) -> Path:
    """Reconstruction loss, L0 and dead fraction against tokens, one line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for d_sae, rows in sorted(curves):
        if not rows:
            continue
        tokens = [r["tokens"] for r in rows]
        regime = "F < d" if d_sae < d_in else "F = d" if d_sae == d_in else "F > d"
        label = f"F={d_sae} ({regime})"
        axes[0].plot(tokens, [max(r["mse"], 1e-12) for r in rows], label=label)
        axes[1].plot(tokens, [r["l0"] for r in rows], label=label)
        axes[2].plot(tokens, [r["frac_dead"] for r in rows], label=label)
    axes[0].set(yscale="log", ylabel="reconstruction loss per element (normalised units)")
    axes[1].set(yscale="log", ylabel="L0 (latents firing per token)")
    axes[2].set(ylabel="fraction of dead latents")
    for ax in axes:
        ax.set(xlabel="training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{title}: d_in = {d_in}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

