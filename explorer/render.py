"""The HTML the explorer shows: token strips (spans carry `data-pos` for clicks), top contexts, histograms,
metric tables, and the page's CSS / click script.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import Tensor

from explorer.catalog import lookup_metric
from sae import layout
from sae.latent_stats import LatentStats

METRIC_ROWS = [
    (layout.MSE, "MSE", "mean over tokens and dimensions of (x̂ − x)²"),
    (layout.VARIANCE_EXPLAINED, "variance explained", "1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² over this text's tokens"),
    (layout.COSSIM, "cosine(x, x̂)", "mean cosine similarity of activation and reconstruction"),
    (layout.L2_RATIO, "‖x̂‖ / ‖x‖", "below 1 means shrinkage"),
    (layout.L0, "L0", "mean number of latents firing per token"),
    (layout.CE_LOSS_WITHOUT_SAE, "CE clean", "next-token cross-entropy of the unmodified model (nats)"),
    (layout.CE_LOSS_WITH_SAE, "CE with SAE", "the SAE's reconstruction spliced in at the hook"),
    (layout.CE_LOSS_WITH_ABLATION, "CE with zeros", "zeros spliced in at the hook"),
    (layout.CE_LOSS_SCORE, "CE loss score", "(zeros − SAE) / (zeros − clean): 1 = nothing lost"),
    (layout.KL_DIV_WITH_SAE, "KL(clean ‖ SAE)", "mean over next-token positions"),
]

CSS = """
.sae-tokens { line-height: 2.1; white-space: pre-wrap; font-size: 1.02rem; padding: 6px 2px; }
.sae-tokens .tok { border-radius: 3px; padding: 2px 0; cursor: pointer;
  box-shadow: inset 0 0 0 1px rgba(128,128,128,.28); }
.sae-tokens .tok:hover { outline: 2px solid #2563eb; }
.sae-tokens .tok.sel { outline: 2px solid #2563eb; outline-offset: 1px; }
.sae-tokens .tok.cont, .sae-tokens .tok.nl { color: #888; font-size: .8em; }
.sae-contexts .ctx { font-size: .92rem; line-height: 1.7; padding: 3px 0; white-space: pre-wrap;
  border-bottom: 1px solid rgba(128,128,128,.2); }
.sae-contexts .ctx-act { display: inline-block; min-width: 3.2em; font-variant-numeric: tabular-nums;
  color: #888; font-size: .8em; }
.sae-contexts .ctok.max { font-weight: 700; text-decoration: underline; }
.sae-metrics { width: 100%; border-collapse: collapse; font-size: .92rem; }
.sae-metrics td { padding: 3px 6px; border-bottom: 1px solid rgba(128,128,128,.2); }
.sae-metrics td.v { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; font-weight: 600; }
.sae-metrics td.d { color: #888; font-size: .8em; }
.legend-note { color: #888; font-size: .85em; }
#status-box p { margin: 0; }
.sae-hist { padding: 4px 2px; }
.sae-hist .hbars { display: flex; align-items: flex-end; gap: 1px; height: 90px;
  border-bottom: 1px solid rgba(128,128,128,.5); }
.sae-hist .hb { flex: 1; background: rgba(255,127,14,.8); min-height: 0; }
.sae-hist .hmarks { position: relative; height: 12px; }
.sae-hist .hm { position: absolute; top: 1px; width: 2px; height: 10px; background: #1f3b73; }
.sae-hist .haxis { display: flex; justify-content: space-between; font-size: .75em; color: #888; }
.sae-hist .hcap { font-size: .75em; color: #888; text-align: center; }
.links-orig, .links-width { border-left: 3px solid rgba(255,127,14,.6); padding: 2px 8px; margin: 8px 0; }
.links-width .verdict { font-weight: 700; }
.links-match .sae-tokens { line-height: 1.8; font-size: .92rem; padding: 2px; }
"""

TOKEN_CLICK_JS = """
element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-pos]');
  if (t) trigger('click', {pos: Number(t.dataset.pos)});
});
"""


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


def _round(v: Any, digits: int = 4) -> Any:
    return round(v, digits) if isinstance(v, float) and math.isfinite(v) else v


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    alpha = 0.0 if not math.isfinite(alpha) else min(max(alpha, 0.0), 1.0)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


ACT_RGB = (255, 127, 14)
ERR_RGB = (214, 39, 40)
GAIN_RGB = (31, 119, 180)
"""Blue: a decrease (e.g. CE falling under an intervention)."""


class HasTokens(Protocol):
    token_texts: list[str]
    """Exact text of each token ('' for a continuation byte)."""
    tokens: list[str]
    """Display form of each token."""


def tokens_html(
    analysis: HasTokens, values: Sequence[float] | Tensor, *, rgb: tuple[int, int, int] = ACT_RGB,
    scale: float | None = None, selected: int | None = None, value_name: str = "activation",
    extra: Callable[[int], str] | None = None, neg_rgb: tuple[int, int, int] | None = None,
) -> str:
    """The text as clickable token spans (`data-pos`), background opacity = value / scale (negative values in
    `neg_rgb` when given)."""
    vals = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    finite = [abs(v) if neg_rgb else v for v in vals if math.isfinite(v)]
    if scale is None:
        scale = max(finite, default=0.0)
    scale = scale if scale and scale > 0 else 1.0
    parts = ['<div class="sae-tokens">']
    for pos, (piece, shown, v) in enumerate(zip(analysis.token_texts, analysis.tokens, vals)):
        tip = f"#{pos} {shown} · {value_name} {v:.3g}" if math.isfinite(v) else f"#{pos} {shown}"
        if extra is not None:
            tip += extra(pos)
        cls = "tok sel" if pos == selected else "tok"
        color, alpha = (neg_rgb, -v / scale) if neg_rgb and v < 0 else (rgb, v / scale)
        style = f"background:{_rgba(color, alpha)}"
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


def timings_line(timings: dict[str, float]) -> str:
    names = (("model_forward", "model forward"), ("sae", "SAE"), ("downstream", "downstream CE passes"),
             ("render", "rendering"))
    return " · ".join(f"{label} {timings[k]:.0f} ms" for k, label in names if k in timings)


def metrics_html(m: dict[str, float], trained: dict[str, Any] | None) -> str:
    rows = []
    for key, name, desc in METRIC_ROWS:
        ev = lookup_metric(trained, key) if trained else None
        ev_txt = f" <span class='legend-note'>(eval set: {fmt(ev)})</span>" if isinstance(ev, (int, float)) else ""
        rows.append(f"<tr><td>{name}</td><td class='v'>{fmt(m.get(key))}</td><td class='d'>{desc}{ev_txt}</td></tr>")
    return f"<table class='sae-metrics'>{''.join(rows)}</table>"
