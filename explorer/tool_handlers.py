"""Handlers of the width-links and intervention views (and of the `links` / `intervene` API endpoints).

Plain functions like `explorer.handlers`: each returns output name -> value, with a JSON summary
(`links_json`, `intervene_json`) that API clients read.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from explorer.errors import AnalysisError
from explorer.handlers import fail
from explorer.intervene import MAX_NEW_TOKENS, OPERATIONS, Intervention, InterventionResult, intervene
from explorer.links import VERDICTS, LinksResult, link_latent
from explorer.render import ACT_RGB, ERR_RGB, GAIN_RGB, fmt, tokens_html
from explorer.state import Explorer

MAX_STRIPS = 3
"""Token strips shown per width (the best matches)."""


def _latent_index(latent: Any) -> int:
    if latent is None or latent == "":
        raise AnalysisError("Enter a latent index.")
    try:
        value = float(latent)
    except (TypeError, ValueError) as err:
        raise AnalysisError(f"Latent must be a whole number, not {latent!r}.") from err
    if not value.is_integer() or value < 0:
        raise AnalysisError(f"Latent must be a whole number ≥ 0, not {latent!r}.")
    return int(value)


def links(ex: Explorer, text: str, model: str, hook: str, run: str, f: str, step: str, latent: Any) -> dict[str, Any]:
    """The selected latent's best decoder-cosine matches in every other width of the same model, hook and run."""
    try:
        entry = ex.entry(model, hook, run, f, step)
        lat = _latent_index(latent)
        bm, sae = ex.load(entry)
        others = [e for e in ex.catalog.finals(model, hook) if e.info.run == run and e.info.path != entry.info.path]
        if not others:
            raise AnalysisError(f"Run {run!r} has no other width to link to: only F={entry.info.d_sae}.")
        loaded = [(f"F={e.info.d_sae}", str(e.info.path), ex.cache.sae(e.info.path)) for e in others]
        res = link_latent(bm, sae, str(entry.info.path), loaded, entry.info.hook_name, text, lat, ex.cosines)
        return {"links_status": f"Latent **{lat}** of F={entry.info.d_sae} ({run}) in {len(others)} other width(s).",
                "links_view": links_html(res), "links_json": links_json(res)}
    except Exception as err:
        return {**fail(err, "links_status"), "links_view": "", "links_json": {"error": str(err)}}


def links_html(res: LinksResult) -> str:
    a = res.analysis
    scale = max([float(res.original_acts.max())] + [float(w.acts.max()) for w in res.widths if w.acts.numel()])
    parts = [f'<div class="links-orig"><b>F={res.d_sae} latent {res.latent}</b> (selected)',
             tokens_html(a, res.original_acts, scale=scale, value_name=f"latent {res.latent}"), "</div>"]
    for w in res.widths:
        cos = ", ".join(f"{m.latent} ({m.cosine:.2f})" for m in w.matches)
        parts.append(f'<div class="links-width" data-width="{w.d_sae}"><div class="links-head">'
                     f'<b>{html.escape(w.label)}</b> — <span class="verdict">{w.verdict}</span> '
                     '<span class="legend-note">'
                     f'({html.escape(VERDICTS[w.verdict])}) · matches (decoder cosine): {cos}</span></div>')
        for k, m in enumerate(w.matches[:MAX_STRIPS]):
            parts.append(f'<div class="links-match"><span class="legend-note">latent {m.latent} · cos {m.cosine:.2f} · '
                         f'max here {fmt(float(w.acts[:, k].max()))}</span>')
            parts.append(tokens_html(a, w.acts[:, k], scale=scale, value_name=f"{w.label} latent {m.latent}"))
            parts.append("</div>")
        parts.append("</div>")
    return "".join(parts)


def links_json(res: LinksResult) -> dict[str, Any]:
    return {"latent": res.latent, "d_sae": res.d_sae, "tokens": res.analysis.tokens,
            "acts": [round(v, 4) for v in res.original_acts.tolist()],
            "widths": [{"label": w.label, "d_sae": w.d_sae, "verdict": w.verdict,
                        "matches": [{"latent": m.latent, "cosine": round(m.cosine, 4),
                                     "acts": [round(v, 4) for v in w.acts[:, k].tolist()]}
                                    for k, m in enumerate(w.matches)]} for w in res.widths]}


def parse_positions(value: str | None, n_tokens: int | None = None) -> tuple[int, ...] | None:
    """'' or 'all' -> None (every token); '3, 5-7' -> (3, 5, 6, 7)."""
    if value is None or not str(value).strip() or str(value).strip().lower() in ("all", "every", "*"):
        return None
    out: list[int] = []
    for part in str(value).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError as err:
            raise AnalysisError(f"Token positions must look like '3, 5-7' or 'all', not {value!r}.") from err
    return tuple(dict.fromkeys(out))


def run_intervention(
    ex: Explorer, text: str, model: str, hook: str, run: str, f: str, step: str, latent: Any, op: str,
    value: Any, positions: str | None, position: Any, n_new: Any, sampling: str, seed: Any,
) -> dict[str, Any]:
    """Ablate / clamp / steer a latent on the text and show what changes."""
    try:
        entry = ex.entry(model, hook, run, f, step)
        if op not in OPERATIONS:
            raise AnalysisError(f"Unknown operation {op!r}: choose one of {', '.join(OPERATIONS)}.")
        iv = Intervention(_latent_index(latent), op, float(value or 0.0), parse_positions(positions))
        bm, sae = ex.load(entry)
        pos = None if position in (None, "") else int(position)
        n = MAX_NEW_TOKENS if n_new in (None, "") else int(n_new)
        if not 0 <= n <= MAX_NEW_TOKENS:
            raise AnalysisError(f"New tokens must be between 0 and {MAX_NEW_TOKENS}, not {n}.")
        seed_v = None if sampling == "greedy" else int(seed or 0)
        res = intervene(bm, sae, entry.info.hook_name, text, iv, pos, n, seed_v, ex.cache.token_strings(bm))
        return intervention_outputs(res, iv)
    except Exception as err:
        return {**fail(err, "iv_status"), "iv_json": {"error": str(err)}}


def intervention_outputs(res: InterventionResult, iv: Intervention) -> dict[str, Any]:
    change = res.ce_change
    finite = change[1:][~change[1:].isnan()]
    mean = float(finite.mean()) if finite.numel() else math.nan
    what = {"ablate": "set to 0", "clamp": f"clamped to {iv.value:g}", "steer": f"steered by {iv.value:+g} × W_dec"}
    where = "every token" if iv.positions is None else f"tokens {', '.join(map(str, res.edited))}"
    tip = lambda p: f" · CE {res.ce_before[p]:.2f} → {res.ce_after[p]:.2f}"  # noqa: E731
    rows = [[b.token, round(b.prob, 4), a.token, round(a.prob, 4)] for b, a in zip(res.top_before, res.top_after)]
    return {
        "iv_status": (f"Latent **{iv.latent}** {what[iv.op]} on {where}: mean next-token CE change "
                      f"**{fmt(mean)}** nats over {finite.numel()} predictions."),
        "iv_ce_view": tokens_html(res, change.nan_to_num(0.0), rgb=ERR_RGB, neg_rgb=GAIN_RGB, selected=res.position,
                                  value_name="CE change", extra=tip),
        "iv_acts_view": tokens_html(res, res.latent_acts, rgb=ACT_RGB, value_name=f"latent {iv.latent} before"),
        "iv_top_title": f"**Next-token predictions after token #{res.position} `{res.tokens[res.position]}`**",
        "iv_top_df": pd.DataFrame(rows, columns=["before", "p before", "after", "p after"]),
        "iv_before": res.continuation_before, "iv_after": res.continuation_after,
        "iv_json": {"latent": iv.latent, "op": iv.op, "value": iv.value, "edited": res.edited, "tokens": res.tokens,
                    "ce_change": [None if math.isnan(v) else round(v, 5) for v in change.tolist()],
                    "mean_ce_change": None if math.isnan(mean) else mean, "position": res.position,
                    "top_before": [list(p) for p in res.top_before], "top_after": [list(p) for p in res.top_after],
                    "continuation_before": res.continuation_before, "continuation_after": res.continuation_after},
    }
