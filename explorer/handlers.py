"""The explore, compare and toy tabs' event handlers, as plain functions (no Gradio: unit-testable).

Each returns a dict from output names (`OUT_*` below; `explorer.ui` maps them to components) to
values; the key WARNING carries a message the UI pops up. Every failure becomes a message, never a
stack trace.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from explorer import latents as L
from explorer.analyze import TextAnalysis, analyze_text, compare_saes
from explorer.catalog import Entry, lookup_metric, read_metrics
from explorer.charts import loss_figure, read_loss_curves, round_metric, toy_tables
from explorer.errors import AnalysisError
from explorer.render import (
    ERR_RGB,
    contexts_html,
    fmt,
    histogram_html,
    metrics_html,
    timings_line,
    tokens_html,
)
from explorer.state import Explorer, parse_deep_link, step_choices
from sae import layout

log = logging.getLogger("sae-explorer")
WARNING = "_warning"
INFO = "_info"
TOP_COLUMNS = ["latent", "max act", "total act", "# tokens fired"]
EFFECT_COLUMNS = ["promotes", "logit", "suppresses", "logit "]
TOKEN_HINT = "*Click a token to list the latents firing on it.*"


class Choices(NamedTuple):
    """A chooser's new options and value (the UI turns it into a component update)."""

    choices: list
    value: Any


def fail(err: Exception, *targets: str) -> dict[str, Any]:
    """The message for `err` in each target, plus a pop-up."""
    msg = str(err) if isinstance(err, AnalysisError) else f"Something went wrong: {type(err).__name__}: {err}"
    if not isinstance(err, AnalysisError):
        log.exception("handler failed", exc_info=err)
    return {WARNING: msg, **{t: f"⚠️ **{msg}**" for t in targets}}


def render_views(a: TextAnalysis, latent: int | None, mode: str, pos: int | None) -> dict[str, str]:
    """The two token strips and their titles."""
    acts = L.latent_values(a, latent)
    vals, name = L.second_view_values(a, mode)
    infos = L.token_infos(a)

    def extra(p: int) -> str:
        i = infos[p]
        out = f" · rel. error {i.rel_error:.3f}"
        if math.isfinite(i.ce_clean):
            out += f" · CE clean {i.ce_clean:.2f} / SAE {i.ce_sae:.2f}"
        return out

    act_t = (f"**Tokens coloured by latent {latent}** (max on this text {fmt(max(acts, default=0.0))}; "
             "click a token to list its latents)") if latent is not None else "**Tokens** (click one for its latents)"
    err_t = ("**Tokens coloured by reconstruction error ‖x − x̂‖²** (darkest = worst)" if mode == "error"
             else "**Tokens coloured by the CE increase when the SAE is spliced in**")
    return {"tokens_view": tokens_html(a, acts, selected=pos, value_name=f"latent {latent}"),
            "error_view": tokens_html(a, vals, rgb=ERR_RGB, selected=pos, value_name=name, extra=extra),
            "act_title": act_t, "err_title": err_t}


def latent_panel(ex: Explorer, a: TextAnalysis, entry: Entry, latent: int) -> dict[str, Any]:
    """Header, top contexts, histogram and logit effects of one latent."""
    bm, sae = ex.load(entry)
    if not 0 <= latent < sae.cfg.d_sae:
        raise AnalysisError(f"Latent {latent} does not exist: this SAE has latents 0..{sae.cfg.d_sae - 1}.")
    here_vals = [v for v in L.latent_values(a, latent) if v > 0]
    here = (f"on this text: max {fmt(max(here_vals))}, fires on {len(here_vals)}/{a.n_tokens} tokens"
            if here_vals else "does not fire on this text")
    loaded = ex.cache.latent_stats(entry.info.path, sae.cfg.d_sae)
    strings = ex.cache.token_strings(bm)
    summary = L.latent_stats_summary(loaded.stats, latent, sae.cfg.d_sae)
    if loaded.stats is not None and summary is not None:
        head = (f"### Latent {latent}\nFires on **{summary['freq']:.3%}** of {summary['n_tokens']:,} "
                f"held-out tokens · max activation **{fmt(summary['max_act'])}** · {here}.\n\n"
                "**Top-activating contexts** (held-out stories; the max token is bold and underlined):")
        ctx = contexts_html(loaded.stats, latent, strings)
        hist = histogram_html(summary["hist_edges"], summary["hist_counts"], here_vals)
    else:
        head = f"### Latent {latent}\n{here}.\n\n⚠️ *No top contexts: {loaded.problem}.*"
        ctx, hist = "", ""
    eff = L.decoder_logit_effects(bm, sae, latent, n=10, token_strings=strings)
    rows = [[p[0], round(p[1], 3), s[0], round(s[1], 3)] for p, s in zip(eff.promoted, eff.suppressed)]
    return {"latent_header": head, "contexts": ctx, "hist": hist,
            "effects_md": f"**Tokens the decoder direction promotes / suppresses most** — {eff.method}.",
            "effects_df": pd.DataFrame(rows, columns=EFFECT_COLUMNS)}


def top_table(a: TextAnalysis, by: str) -> pd.DataFrame:
    rows = L.top_latents(a, by=by, n=50)
    return pd.DataFrame([[r.latent, round(r.max_act, 3), round(r.total_act, 3), r.n_fired] for r in rows],
                        columns=TOP_COLUMNS)


def ckpt_text(entry: Entry) -> str:
    i = entry.info
    trained = read_metrics(i.path)
    bits = [f"`{i.architecture}` · d_in {i.d_in} · F {i.d_sae} · "
            f"{'final' if i.step is None else f'step {i.step:,}'} · source: {entry.source.label}"]
    if trained:
        ev = [f"{name} {fmt(lookup_metric(trained, k))}" for k, name in
              ((layout.VARIANCE_EXPLAINED, "var. expl."), (layout.L0, "L0"), (layout.CE_LOSS_SCORE, "CE score"))
              if isinstance(lookup_metric(trained, k), (int, float))]
        if ev:
            bits.append("eval set: " + " · ".join(ev))
    return "  \n".join(bits)


def analyze(ex: Explorer, text: str, model: str, hook: str, run: str, f: str, step: str, by: str, mode: str,
            latent: int | None = None) -> dict[str, Any]:
    """Analyse the text with the selected checkpoint; show `latent` (default: the top one on the text)."""
    t_all = time.perf_counter()
    try:
        entry = ex.entry(model, hook, run, f, step)
        bm, sae = ex.load(entry)
        a = analyze_text(bm, sae, entry.info.hook_name, text)
        t0 = time.perf_counter()
        top = top_table(a, by)
        if latent is None or not 0 <= int(latent) < sae.cfg.d_sae:
            latent = int(top.iloc[0, 0]) if len(top) else 0
        out: dict[str, Any] = {
            "state": (a, entry), "sel_pos": None, "latent_num": int(latent), "top_df": top,
            **render_views(a, int(latent), mode, None),
            "metrics_view": metrics_html(a.metrics, read_metrics(entry.info.path)),
            "ckpt_info": ckpt_text(entry), "token_md": TOKEN_HINT,
            "token_df": pd.DataFrame(columns=["latent", "activation"]),
        }
        out.update(latent_panel(ex, a, entry, int(latent)))
        a.timings["render"] = (time.perf_counter() - t0) * 1e3
        a.timings["total"] = (time.perf_counter() - t_all) * 1e3
        notice = " ".join(f"ℹ️ {n}" for n in a.notices)
        if a.notices:
            out[INFO] = a.notice
        done = f"Analysed **{a.n_tokens} tokens** with {entry.info.label}."
        out["status"] = (notice + "\n\n" if notice else "") + done
        out["timings_md"] = "Server time: " + timings_line(a.timings)
        out["timings_json"] = {k: round(v, 3) for k, v in a.timings.items()}
        return out
    except Exception as err:  # every failure becomes a message, never a stack trace
        return fail(err, "status")


def select_latent(ex: Explorer, latent: Any, st: Any, pos: int | None, mode: str) -> dict[str, Any]:
    if st is None:
        return fail(AnalysisError("Analyze a text first."), "status")
    try:
        a, entry = st
        if latent is None or latent == "":
            raise AnalysisError("Enter a latent index.")
        latent = int(latent)
        out = latent_panel(ex, a, entry, latent)
        out.update(render_views(a, latent, mode, pos))
        out["latent_num"] = latent
        return out
    except Exception as err:
        return fail(err, "status")


def click_token(st: Any, latent: Any, mode: str, pos: Any) -> dict[str, Any]:
    if st is None:
        return fail(AnalysisError("Analyze a text first."), "status")
    if pos is None:
        return {}
    try:
        a, _ = st
        pos = int(pos)
        rows = L.latents_at_token(a, pos, n=30)
        info = L.token_info(a, pos)
        ce_txt = f" · CE clean {info.ce_clean:.2f} → with SAE {info.ce_sae:.2f}" if math.isfinite(info.ce_clean) else ""
        md = (f"**Token #{pos} `{a.tokens[pos]}`** — {info.n_fired} latents fire"
              f"{f' (top {len(rows)} shown)' if info.n_fired > len(rows) else ''} · "
              f"‖x − x̂‖² {info.sq_error:.3g} (relative {info.rel_error:.3f}){ce_txt}. "
              "Select a row to inspect the latent.")
        views = render_views(a, int(latent) if latent is not None else None, mode, pos)
        return {"token_md": md, "sel_pos": pos, "tokens_view": views["tokens_view"], "error_view": views["error_view"],
                "token_df": pd.DataFrame([[i, round(v, 4)] for i, v in rows], columns=["latent", "activation"])}
    except Exception as err:
        return fail(err, "status")


def rerank(st: Any, by: str) -> dict[str, Any]:
    return {} if st is None else {"top_df": top_table(st[0], by)}


def remode(st: Any, latent: Any, mode: str, pos: int | None) -> dict[str, Any]:
    if st is None:
        return {}
    views = render_views(st[0], int(latent) if latent is not None else None, mode, pos)
    return {"error_view": views["error_view"], "err_title": views["err_title"]}


def selectors(ex: Explorer, model: str | None, hook: str | None, run: str | None, f: str | None,
              step: str | None) -> tuple[Choices, Choices, Choices, Choices, Choices]:
    """Make the five choosers consistent after one changed (keep what is still valid)."""
    cat = ex.catalog
    models = cat.models()
    model = model if model in models else (models[0] if models else None)
    hooks = cat.hooks(model) if model else []
    hook = hook if hook in hooks else (hooks[0] if hooks else None)
    runs = cat.runs(model, hook) if hook else []
    run = run if run in runs else ("standard" if "standard" in runs else (runs[0] if runs else None))
    widths = [str(w) for w in cat.widths(model, hook, run)] if run else []
    f = str(f) if str(f) in widths else (widths[-1] if widths else None)
    steps = step_choices(cat.steps(model, hook, run, int(f))) if f else []
    step = step if step in [v for _, v in steps] else ("final" if steps else None)
    return (Choices(models, model), Choices(hooks, hook), Choices(runs, run), Choices(widths, f), Choices(steps, step))


EVAL_COLUMNS = (
    (layout.VARIANCE_EXPLAINED, "VE"), (layout.L0, "L0"),
    (layout.FRAC_DEAD, "dead"), (layout.CE_LOSS_SCORE, "CE score"),
)
ON_TEXT_COLUMNS = (
    (layout.MSE, "MSE"), (layout.VARIANCE_EXPLAINED, "VE"), (layout.COSSIM, "cossim"), (layout.L0, "L0"),
    (layout.CE_LOSS_WITH_SAE, "CE with SAE"), (layout.CE_LOSS_SCORE, "CE score"), (layout.KL_DIV_WITH_SAE, "KL"),
)


def compare(ex: Explorer, text: str, model: str, hook: str) -> dict[str, Any]:
    """All final checkpoints of a model+hook on the story; without a usable story, eval-set numbers only."""
    entries = ex.catalog.finals(model, hook) if model and hook else []
    if not entries:
        return fail(AnalysisError("No checkpoints to compare: pick a base model and hook on the Explore tab."),
                    "compare_status")
    curves = [(f"{e.info.run} F={e.info.d_sae}", read_loss_curves(e.info.path)) for e in entries]
    out: dict[str, Any] = {"loss_plot": loss_figure(curves)}
    results: list[TextAnalysis | None] = [None] * len(entries)
    try:
        bm = ex.cache.base_model(ex.catalog.base_model_source(entries[0]))
        results = list(compare_saes(bm, [ex.cache.sae(e.info.path) for e in entries], hook, text))
        r0 = results[0]
        msg = (f"{len(entries)} checkpoints on your story ({r0.n_tokens} tokens). CE clean "
               f"{fmt(r0.metrics['ce_loss_without_sae'])}, with zeros {fmt(r0.metrics['ce_loss_with_ablation'])}.")
        out["compare_status"] = ("ℹ️ " + r0.notice + "\n\n" if r0.notices else "") + msg
    except Exception as err:  # the eval-set columns and loss curves still show
        out.update(fail(err, "compare_status"))
    rows = []
    for e, r in zip(entries, results):
        trained = read_metrics(e.info.path) or {}
        m = r.metrics if r is not None else {}
        rows.append({
            "run": e.info.run, "F": e.info.d_sae, "arch": e.info.architecture,
            **{name: round_metric(m.get(k)) if isinstance(m.get(k), float) and math.isfinite(m[k]) else None
               for k, name in ON_TEXT_COLUMNS},
            **{f"eval {name}": round_metric(lookup_metric(trained, k)) for k, name in EVAL_COLUMNS},
        })
    out["compare_df"] = pd.DataFrame(rows)
    return out


def show_toy(folder: str | None) -> dict[str, Any]:
    if not folder:
        return {}
    p = Path(folder)
    summary, inst = toy_tables(read_metrics(p))
    feats, gif = p / layout.TOY_FEATURES_PLOT, p / layout.TOY_TRAINING_GIF
    return {"toy_features": str(feats) if feats.is_file() else None,
            "toy_gif": str(gif) if gif.is_file() else None, "toy_summary": summary, "toy_inst": inst}


SELECTOR_NAMES = ("model_dd", "hook_dd", "run_radio", "f_radio", "step_dd")
"""Output names of the five checkpoint choosers, in `selectors` order."""


def page_load(ex: Explorer, params: dict[str, str], text: str, model: str, hook: str, run: str, f: str, step: str,
              by: str, mode: str) -> dict[str, Any]:
    """Restore a deep link (URL query parameters: text, model, hook, run, F, step, latent), then analyse."""
    link, notices = parse_deep_link(params)
    text = link.text or text
    asked = (link.model, link.hook, link.run, link.f, link.step)
    chosen = selectors(ex, *(a if a is not None else d for a, d in zip(asked, (model, hook, run, f, step))))
    for name, want, got in zip(("model", "hook", "run", "F", "step"), asked, chosen):
        if want is not None and str(want) != str(got.value):
            notices.append(f"The link's {name}={want!r} is not among the checkpoints; showing {got.value!r}.")
    out: dict[str, Any] = {}
    if link.text:  # only a link changes the text box: the user may have typed already
        out["text"] = text
    if any(a is not None for a in asked):
        out.update(zip(SELECTOR_NAMES, chosen))
    if ex.catalog.entries and text.strip():
        out.update(analyze(ex, text, *(c.value for c in chosen), by, mode, latent=link.latent))
        if link.latent is not None and out.get("latent_num") != link.latent and "state" in out:
            notices.append(f"The link's latent {link.latent} does not exist in this checkpoint.")
    if notices:
        out[WARNING] = " ".join([*notices, out.get(WARNING, "")]).strip()
    return out
