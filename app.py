"""SAE explorer: type a story, see which sparse-autoencoder latents fire and how good the reconstruction is.

The Hugging Face Spaces entry point (`python app.py`; `python app.py --help`). A thin Gradio Blocks UI:
every computation lives in `sae.analysis`, which this file only wires to widgets.

Checkpoints come from `checkpoints/` (or `--checkpoints DIR`) and from Hub repos named by `--hub-repo` or
the env var `SAE_HUB_REPOS` (comma-separated). The server listens on `PORT` / `GRADIO_SERVER_PORT`
(default 7860) and `GRADIO_SERVER_NAME` (default 0.0.0.0), as Spaces expects.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from matplotlib.figure import Figure

from sae import analysis as A
from sae import layout

log = logging.getLogger("sae-explorer")
HERE = Path(__file__).resolve().parent
DEFAULT_CHECKPOINTS = HERE / "checkpoints"
HUB_TIMEOUT_S = 20.0
CURVE_TERMS = ("loss", "mse", "l0", "frac_dead")
"""loss_curves.csv columns plotted in the compare tab (when present): the "four regimes" picture."""

EXAMPLES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. "
    "One day, she saw a big red ball in the park. She ran to the ball and kicked it high into the sky.",
    "Tom and his dog Max went to the beach. They ran on the sand and splashed in the water. "
    "Max found a shiny shell and gave it to Tom. Tom smiled and said, \"Thank you, Max! You are my best friend.\"",
    "One day, a little bird could not find its mom. The bird was sad and scared. A kind rabbit hopped over "
    "and said, \"Do not worry, I will help you.\" Together they looked under the big tree.",
    "Sara had a new toy car. It was blue and very fast. She wanted to show it to her friend Ben, "
    "but the car fell into the mud. Sara was sad, but Ben helped her wash it.",
]

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
"""

TOKEN_CLICK_JS = """
element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-pos]');
  if (t) trigger('click', {pos: Number(t.dataset.pos)});
});
"""


# ---------------------------------------------------------------------------------------- formatting


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 1e4 or (0 < abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


def _round(v: Any, digits: int = 4) -> Any:
    return round(v, digits) if isinstance(v, float) and math.isfinite(v) else v


def metrics_html(m: dict[str, float], trained: dict[str, Any] | None) -> str:
    rows = []
    for key, name, desc in METRIC_ROWS:
        ev = _lookup(trained, key) if trained else None
        ev_txt = f" <span class='legend-note'>(eval set: {fmt(ev)})</span>" if isinstance(ev, (int, float)) else ""
        rows.append(f"<tr><td>{name}</td><td class='v'>{fmt(m.get(key))}</td><td class='d'>{desc}{ev_txt}</td></tr>")
    return f"<table class='sae-metrics'>{''.join(rows)}</table>"


def _lookup(d: dict[str, Any] | None, key: str) -> Any:
    """A metric from metrics.json: top level, or one level down (e.g. under "eval")."""
    if not d:
        return None
    if key in d:
        return d[key]
    for v in d.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None


def step_choices(steps: list[int | None]) -> list[tuple[str, str]]:
    return [("final", "final") if s is None else (f"step {s:,}", str(s)) for s in steps]


def parse_step(value: str | None) -> int | None:
    return None if value in (None, "", "final") else int(value)


def read_loss_curves(folder: Path) -> dict[str, list[float]] | None:
    path = folder / layout.LOSS_CURVES_FILE
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
                        per_inst.setdefault(k, [None] * len(obj))[i] = _round(v)
                    elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                        per_inst.setdefault(f"min {k}", [None] * len(obj))[i] = _round(min(v))
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


# ---------------------------------------------------------------------------------------- the app


class Explorer:
    """The app's state shared by all sessions: checkpoint catalog, model cache, startup notices."""

    def __init__(self, catalog: A.CheckpointCatalog, notices: list[str], cache: A.ModelCache | None = None) -> None:
        self.catalog = catalog
        self.notices = notices
        self.cache = cache or A.ModelCache()

    def load(self, entry: A.Entry):
        bm = self.cache.base_model(self.catalog.base_model_source(entry))
        return bm, self.cache.sae(entry.info.path)

    def warm(self) -> None:
        """Load the default checkpoint in the background, so the first analysis is fast."""
        entry = self.catalog.default()
        if entry is None:
            return

        def run() -> None:
            try:
                bm, _ = self.load(entry)
                self.cache.token_strings(bm)
            except A.AnalysisError as err:
                log.warning("could not preload %s: %s", entry.info.label, err)

        threading.Thread(target=run, daemon=True).start()

    def banner(self) -> str:
        lines = [f"⚠️ {n}" for n in self.notices]
        if not self.catalog.entries:
            roots = ", ".join(f"`{s.root}`" for s in self.catalog.sources) or "none"
            lines.append(
                "**No language-model SAE checkpoints found** (looked in " + roots + "). Train them with "
                "`python -m training base-lm` and then `python -m training tinystories`, or download trained ones "
                "with `python app.py --hub-repo <user>/<repo>` (or env `SAE_HUB_REPOS`)."
            )
        return "\n\n".join(lines)


def build_ui(ex: Explorer) -> gr.Blocks:
    cat = ex.catalog
    default = cat.default()
    d_model = default.model_key if default else None
    d_hook = default.info.hook_name if default else None
    d_run = default.info.run if default else None
    d_f = str(default.info.d_sae) if default else None

    with gr.Blocks(title="SAE explorer", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Sparse-autoencoder explorer\n"
            "Type a story, pick a checkpoint, and see which SAE latents fire on which tokens, what each latent "
            "means, and how well the SAE reconstructs the model's activations *on your text*."
        )
        gr.Markdown(ex.banner(), visible=bool(ex.banner()), elem_id="banner")
        state = gr.State(None)
        sel_pos = gr.State(None)

        with gr.Tabs():
            # ------------------------------------------------------------------ explore
            with gr.Tab("Explore", id="explore"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        text = gr.Textbox(label="Your story", lines=5, max_lines=14, value=EXAMPLES[0],
                                          placeholder="Once upon a time…", elem_id="story")
                        with gr.Row():
                            analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze-btn")
                            clear_btn = gr.Button("Clear", elem_id="clear-btn")
                        gr.Examples(EXAMPLES, inputs=text, label="TinyStories-style openings")
                    with gr.Column(scale=2):
                        with gr.Group():
                            model_dd = gr.Dropdown(cat.models(), value=d_model, label="Base model", elem_id="model-dd")
                            hook_dd = gr.Dropdown(cat.hooks(d_model) if d_model else [], value=d_hook, label="Hook",
                                                  elem_id="hook-dd")
                            run_radio = gr.Radio(cat.runs(d_model, d_hook) if d_model else [], value=d_run,
                                                 label="Run / architecture", elem_id="run-radio")
                            f_radio = gr.Radio([str(f) for f in cat.widths(d_model, d_hook, d_run)] if d_model else [],
                                               value=d_f, label="Width F (latents)", elem_id="f-radio")
                            steps = cat.steps(d_model, d_hook, d_run, int(d_f)) if d_model else []
                            step_dd = gr.Dropdown(step_choices(steps), value="final" if steps else None,
                                                  label="Training step",
                                                  elem_id="step-dd")
                        ckpt_info = gr.Markdown(elem_id="ckpt-info")
                status = gr.Markdown(elem_id="status-box")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        with gr.Row():
                            latent_num = gr.Number(label="Latent shown on the text", precision=0, minimum=0,
                                                   value=None, elem_id="latent-num", scale=1)
                            second_mode = gr.Radio(
                                [("reconstruction error ‖x − x̂‖²", "error"), ("CE increase with SAE", "ce")],
                                value="error", label="Second view colours tokens by", scale=2)
                        act_title = gr.Markdown("**Tokens coloured by latent activation** (click a token)")
                        tokens_view = gr.HTML(js_on_load=TOKEN_CLICK_JS, elem_id="tokens-view", min_height=60)
                        err_title = gr.Markdown("**Tokens coloured by reconstruction error**")
                        error_view = gr.HTML(js_on_load=TOKEN_CLICK_JS, elem_id="error-view", min_height=60)
                        timings_md = gr.Markdown(elem_classes=["legend-note"], elem_id="timings")
                        timings_json = gr.JSON(visible=False)
                    with gr.Column(scale=2):
                        gr.Markdown("**Reconstruction quality on this text**")
                        metrics_view = gr.HTML(elem_id="metrics-view")
                        token_md = gr.Markdown("*Click a token to list the latents firing on it.*",
                                               elem_id="token-md")
                        token_df = gr.Dataframe(headers=["latent", "activation"], interactive=False,
                                                elem_id="token-latents", max_height=260)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2):
                        rank_by = gr.Radio([("max activation", "max"), ("total activation", "total")], value="max",
                                           label="Top latents on this text, ranked by")
                        top_df = gr.Dataframe(headers=["latent", "max act", "total act", "# tokens fired"],
                                              interactive=False, elem_id="top-latents", max_height=420)
                    with gr.Column(scale=3):
                        latent_header = gr.Markdown("*Select a latent to see what it does.*", elem_id="latent-header")
                        contexts = gr.HTML(elem_id="latent-contexts", max_height=360)
                        hist = gr.HTML(elem_id="latent-hist")
                        effects_md = gr.Markdown(elem_classes=["legend-note"])
                        effects_df = gr.Dataframe(headers=["promotes", "logit", "suppresses", "logit "],
                                                  interactive=False, elem_id="latent-effects", max_height=300)

            # ------------------------------------------------------------------ compare
            with gr.Tab("Compare widths", id="compare") as compare_tab:
                gr.Markdown("Every final checkpoint of the selected base model and hook, on the story from the "
                            "Explore tab (VE = variance explained; *eval* columns come from each checkpoint's "
                            "metrics.json on the held-out stories). Training curves below, one line per checkpoint.")
                compare_btn = gr.Button("Compare on my story", variant="primary", elem_id="compare-btn")
                compare_status = gr.Markdown()
                compare_df = gr.Dataframe(interactive=False, elem_id="compare-table")
                loss_plot = gr.Plot(label="Training loss curves", show_label=False, elem_id="loss-plot")

            # ------------------------------------------------------------------ toy
            with gr.Tab("Toy models", id="toy"):
                toy_choices = [(p.name, str(p)) for p in cat.toy_folders]
                if not toy_choices:
                    gr.Markdown("No toy-model checkpoints found (train them with `python -m training toy`; they "
                                "go to `checkpoints/toy/`).")
                toy_dd = gr.Dropdown(toy_choices, value=toy_choices[0][1] if toy_choices else None,
                                     label="Toy checkpoint", elem_id="toy-dd")
                with gr.Row():
                    toy_features = gr.Image(label="Learned features (features.png)", type="filepath",
                                            interactive=False)
                    toy_gif = gr.Image(label="Training (training.gif)", type="filepath", interactive=False)
                toy_summary = gr.Dataframe(label="Summary", interactive=False)
                toy_inst = gr.Dataframe(label="Per-instance feature recovery", interactive=False)

            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT)

        # ====================================================================== handlers
        def current_entry(model, hook, run, f, step) -> A.Entry:
            if not model or not hook or not run or not f:
                raise A.AnalysisError("No checkpoint selected. " + (
                    "" if cat.entries else "No language-model checkpoints are available (see the banner above)."))
            return cat.find(model, hook, run, int(f), parse_step(step))

        def fail(err: Exception, *targets) -> dict:
            msg = str(err) if isinstance(err, A.AnalysisError) else f"Something went wrong: {type(err).__name__}: {err}"
            if not isinstance(err, A.AnalysisError):
                log.exception("handler failed")
            gr.Warning(msg)
            return {t: f"⚠️ **{msg}**" for t in targets}

        def render_views(a: A.TextAnalysis, latent: int | None, mode: str, pos: int | None):
            acts = A.latent_values(a, latent)
            vals, name = A.second_view_values(a, mode)
            infos = A.token_infos(a)

            def extra(p: int) -> str:
                i = infos[p]
                out = f" · rel. error {i.rel_error:.3f}"
                if math.isfinite(i.ce_clean):
                    out += f" · CE clean {i.ce_clean:.2f} / SAE {i.ce_sae:.2f}"
                return out

            act_html = A.tokens_html(a, acts, selected=pos, value_name=f"latent {latent}")
            err_html = A.tokens_html(a, vals, rgb=A.ERR_RGB, selected=pos, value_name=name, extra=extra)
            act_t = (f"**Tokens coloured by latent {latent}** (max on this text {fmt(max(acts, default=0.0))}; "
                     "click a token to list its latents)") if latent is not None else (
                     "**Tokens** (click one to list its latents)")
            err_t = ("**Tokens coloured by reconstruction error ‖x − x̂‖²** (darkest = worst)" if mode == "error"
                     else "**Tokens coloured by the CE increase when the SAE is spliced in**")
            return act_html, err_html, act_t, err_t

        def latent_panel(a: A.TextAnalysis, entry: A.Entry, latent: int) -> dict:
            bm, sae = ex.load(entry)
            if not 0 <= latent < sae.cfg.d_sae:
                raise A.AnalysisError(f"Latent {latent} does not exist: this SAE has latents 0..{sae.cfg.d_sae - 1}.")
            here_vals = [v for v in A.latent_values(a, latent) if v > 0]
            here = (f"on this text: max {fmt(max(here_vals))}, fires on {len(here_vals)}/{a.n_tokens} tokens"
                    if here_vals else "does not fire on this text")
            stats = ex.cache.latent_stats(entry.info.path)
            strings = ex.cache.token_strings(bm)
            summary = A.latent_stats_summary(stats, latent, sae.cfg.d_sae)
            if stats is not None and summary is not None:
                head = (f"### Latent {latent}\nFires on **{summary['freq']:.3%}** of {summary['n_tokens']:,} "
                        f"held-out tokens · max activation **{fmt(summary['max_act'])}** · {here}.\n\n"
                        "**Top-activating contexts** (held-out stories; the max token is bold and underlined):")
                ctx = A.contexts_html(stats, latent, strings)
                hist_update = A.histogram_html(summary["hist_edges"], summary["hist_counts"], here_vals)
            else:
                head = f"### Latent {latent}\n{here}. *No latent statistics saved with this checkpoint.*"
                ctx, hist_update = "", ""
            eff = A.decoder_logit_effects(bm, sae, latent, n=10, token_strings=strings)
            rows = [[p[0], round(p[1], 3), s[0], round(s[1], 3)] for p, s in zip(eff.promoted, eff.suppressed)]
            return {
                latent_header: head, contexts: ctx, hist: hist_update,
                effects_md: f"**Tokens the decoder direction promotes / suppresses most** — {eff.method}.",
                effects_df: pd.DataFrame(rows, columns=["promotes", "logit", "suppresses", "logit "]),
            }

        def top_table(a: A.TextAnalysis, by: str) -> pd.DataFrame:
            rows = A.top_latents(a, by=by, n=50)
            return pd.DataFrame([[r.latent, round(r.max_act, 3), round(r.total_act, 3), r.n_fired] for r in rows],
                                columns=["latent", "max act", "total act", "# tokens fired"])

        def ckpt_text(entry: A.Entry) -> str:
            i = entry.info
            trained = A.read_metrics(i.path)
            bits = [f"`{i.architecture}` · d_in {i.d_in} · F {i.d_sae} · "
                    f"{'final' if i.step is None else f'step {i.step:,}'} · source: {entry.source.label}"]
            if trained:
                ev = [f"{name} {fmt(_lookup(trained, k))}" for k, name in
                      (("variance_explained", "var. expl."), ("l0", "L0"), ("ce_loss_score", "CE score"))
                      if isinstance(_lookup(trained, k), (int, float))]
                if ev:
                    bits.append("eval set: " + " · ".join(ev))
            return "  \n".join(bits)

        def analyze(text_v, model, hook, run, f, step, by, mode):
            t_all = time.perf_counter()
            try:
                entry = current_entry(model, hook, run, f, step)
                bm, sae = ex.load(entry)
                a = A.analyze_text(bm, sae, entry.info.hook_name, text_v)
                t0 = time.perf_counter()
                top = top_table(a, by)
                latent = int(top.iloc[0, 0]) if len(top) else 0
                act_html, err_html, act_t, err_t = render_views(a, latent, mode, None)
                out = {
                    state: (a, entry), sel_pos: None, latent_num: latent, top_df: top,
                    tokens_view: act_html, error_view: err_html, act_title: act_t, err_title: err_t,
                    metrics_view: metrics_html(a.metrics, A.read_metrics(entry.info.path)),
                    ckpt_info: ckpt_text(entry),
                    token_md: "*Click a token to list the latents firing on it.*",
                    token_df: pd.DataFrame(columns=["latent", "activation"]),
                }
                out.update(latent_panel(a, entry, latent))
                a.timings["render"] = (time.perf_counter() - t0) * 1e3
                a.timings["total"] = (time.perf_counter() - t_all) * 1e3
                notice = " ".join(f"ℹ️ {n}" for n in a.notices)
                if a.notices:
                    gr.Info(a.notice)
                out[status] = (notice + "\n\n" if notice else "") + (
                    f"Analysed **{a.n_tokens} tokens** with {entry.info.label}.")
                out[timings_md] = "Server time: " + A.timings_line(a.timings)
                out[timings_json] = {k: round(v, 3) for k, v in a.timings.items()}
                return out
            except Exception as err:  # every failure becomes a message, never a stack trace
                return fail(err, status)

        def select_latent(latent, st, pos, mode):
            if st is None:
                return fail(A.AnalysisError("Analyze a text first."), status)
            try:
                a, entry = st
                if latent is None:
                    raise A.AnalysisError("Enter a latent index.")
                latent = int(latent)
                out = latent_panel(a, entry, latent)
                act_html, err_html, act_t, err_t = render_views(a, latent, mode, pos)
                out.update({tokens_view: act_html, error_view: err_html, act_title: act_t, err_title: err_t,
                            latent_num: latent})
                return out
            except Exception as err:
                return fail(err, status)

        def pick_row(evt: gr.SelectData, st, pos, mode):
            row = getattr(evt, "row_value", None)
            if not row:
                return {}
            return select_latent(row[0], st, pos, mode)

        def click_token(st, latent, mode, evt: gr.EventData):
            if st is None:
                return fail(A.AnalysisError("Analyze a text first."), status)
            try:
                pos = getattr(evt, "pos", None)
                if pos is None:
                    return {}
                a, _ = st
                pos = int(pos)
                rows = A.latents_at_token(a, pos, n=30)
                info = A.token_info(a, pos)
                ce_txt = (f" · CE clean {info.ce_clean:.2f} → with SAE {info.ce_sae:.2f}"
                          if math.isfinite(info.ce_clean) else "")
                md = (f"**Token #{pos} `{a.tokens[pos]}`** — {info.n_fired} latents fire"
                      f"{f' (top {len(rows)} shown)' if info.n_fired > len(rows) else ''} · "
                      f"‖x − x̂‖² {info.sq_error:.3g} (relative {info.rel_error:.3f}){ce_txt}. "
                      "Select a row to inspect the latent.")
                lat = int(latent) if latent is not None else None
                act_html, err_html, _, _ = render_views(a, lat, mode, pos)
                return {token_md: md, sel_pos: pos, tokens_view: act_html, error_view: err_html,
                        token_df: pd.DataFrame([[i, round(v, 4)] for i, v in rows], columns=["latent", "activation"])}
            except Exception as err:
                return fail(err, status)

        def rerank(st, by):
            if st is None:
                return {}
            return {top_df: top_table(st[0], by)}

        def remode(st, latent, mode, pos):
            if st is None:
                return {}
            lat = int(latent) if latent is not None else None
            _, err_html, _, err_t = render_views(st[0], lat, mode, pos)
            return {error_view: err_html, err_title: err_t}

        def selectors(model, hook, run, f, step):
            """Make the five choosers consistent after one changed (keep what is still valid)."""
            models = cat.models()
            model = model if model in models else (models[0] if models else None)
            hooks = cat.hooks(model) if model else []
            hook = hook if hook in hooks else (hooks[0] if hooks else None)
            runs = cat.runs(model, hook) if hook else []
            run = run if run in runs else ("standard" if "standard" in runs else (runs[0] if runs else None))
            widths = [str(w) for w in cat.widths(model, hook, run)] if run else []
            f = f if f in widths else (widths[-1] if widths else None)
            steps = step_choices(cat.steps(model, hook, run, int(f))) if f else []
            step = step if step in [v for _, v in steps] else ("final" if steps else None)
            return (gr.update(choices=models, value=model), gr.update(choices=hooks, value=hook),
                    gr.update(choices=runs, value=run), gr.update(choices=widths, value=f),
                    gr.update(choices=steps, value=step))

        def compare(text_v, model, hook):
            """All final checkpoints of a model+hook on the story; without a usable story, eval-set numbers only."""
            try:
                entries = cat.finals(model, hook) if model and hook else []
                if not entries:
                    raise A.AnalysisError("No checkpoints to compare: pick a base model and hook on the Explore tab.")
            except Exception as err:
                return fail(err, compare_status)
            curves = [(f"{e.info.run} F={e.info.d_sae}", read_loss_curves(e.info.path)) for e in entries]
            out: dict = {loss_plot: loss_figure(curves)}
            results: list[A.TextAnalysis | None] = [None] * len(entries)
            try:
                bm = ex.cache.base_model(cat.base_model_source(entries[0]))
                saes = [ex.cache.sae(e.info.path) for e in entries]
                results = list(A.compare_saes(bm, saes, hook, text_v))
                r0 = results[0]
                msg = (f"{len(entries)} checkpoints on your story ({r0.n_tokens} tokens). CE clean "
                       f"{fmt(r0.metrics['ce_loss_without_sae'])}, with zeros "
                       f"{fmt(r0.metrics['ce_loss_with_ablation'])}.")
                out[compare_status] = ("ℹ️ " + r0.notice + "\n\n" if r0.notices else "") + msg
            except Exception as err:  # the eval-set columns and loss curves still show
                out.update(fail(err, compare_status))
            rows = []
            on_text = (("mse", "MSE"), ("variance_explained", "VE"), ("cossim", "cossim"), ("l0", "L0"),
                       ("ce_loss_with_sae", "CE with SAE"), ("ce_loss_score", "CE score"), ("kl_div_with_sae", "KL"))
            for e, r in zip(entries, results):
                trained = A.read_metrics(e.info.path) or {}
                m = r.metrics if r is not None else {}
                rows.append({
                    "run": e.info.run, "F": e.info.d_sae, "arch": e.info.architecture,
                    **{name: _round(m.get(k)) if isinstance(m.get(k), float) and math.isfinite(m[k]) else None
                       for k, name in on_text},
                    "eval VE": _round(_lookup(trained, "variance_explained")),
                    "eval L0": _round(_lookup(trained, "l0")),
                    "eval dead": _round(_lookup(trained, "frac_dead")),
                    "eval CE score": _round(_lookup(trained, "ce_loss_score")),
                })
            out[compare_df] = pd.DataFrame(rows)
            return out

        def show_toy(folder):
            if not folder:
                return {}
            p = Path(folder)
            summary, inst = toy_tables(A.read_metrics(p))
            feats, gif = p / layout.TOY_FEATURES_PLOT, p / layout.TOY_TRAINING_GIF
            return {toy_features: str(feats) if feats.is_file() else None,
                    toy_gif: str(gif) if gif.is_file() else None, toy_summary: summary, toy_inst: inst}

        # ====================================================================== wiring
        sel_inputs = [model_dd, hook_dd, run_radio, f_radio, step_dd]
        an_inputs = [text, *sel_inputs, rank_by, second_mode]
        an_outputs = [state, sel_pos, latent_num, top_df, tokens_view, error_view, act_title, err_title,
                      metrics_view, ckpt_info, token_md, token_df, latent_header, contexts, hist, effects_md,
                      effects_df, status, timings_md, timings_json]
        lat_outputs = [latent_header, contexts, hist, effects_md, effects_df, tokens_view, error_view, act_title,
                       err_title, latent_num, status]

        analyze_btn.click(analyze, an_inputs, an_outputs, api_name="analyze")
        text.submit(analyze, an_inputs, an_outputs, api_name=False)
        clear_btn.click(lambda: "", None, text, api_name=False)
        for comp in sel_inputs:
            comp.input(selectors, sel_inputs, sel_inputs, api_name=False).then(
                analyze, an_inputs, an_outputs, api_name=False)
        latent_num.submit(select_latent, [latent_num, state, sel_pos, second_mode], lat_outputs, api_name=False)
        top_df.select(pick_row, [state, sel_pos, second_mode], lat_outputs, api_name=False)
        token_df.select(pick_row, [state, sel_pos, second_mode], lat_outputs, api_name=False)
        for view in (tokens_view, error_view):
            view.click(click_token, [state, latent_num, second_mode],
                       [token_md, token_df, sel_pos, tokens_view, error_view, status], api_name=False)
        rank_by.input(rerank, [state, rank_by], [top_df], api_name=False)
        second_mode.input(remode, [state, latent_num, second_mode, sel_pos], [error_view, err_title], api_name=False)
        compare_btn.click(compare, [text, model_dd, hook_dd], [compare_df, loss_plot, compare_status],
                          api_name="compare")
        compare_tab.select(compare, [text, model_dd, hook_dd], [compare_df, loss_plot, compare_status],
                           api_name=False)
        toy_outputs = [toy_features, toy_gif, toy_summary, toy_inst]
        toy_dd.change(show_toy, [toy_dd], toy_outputs, api_name=False)

        def on_load(folder, *args):
            for n in ex.notices:
                gr.Warning(n)
            out = show_toy(folder)
            if cat.entries and args[0].strip():
                out.update(analyze(*args))
            return out

        demo.load(on_load, [toy_dd, *an_inputs], [*toy_outputs, *an_outputs], api_name=False)
    return demo


ABOUT = """
### What you are looking at
A **sparse autoencoder (SAE)** rewrites the base model's residual-stream activation *x* at one hook
(e.g. `blocks.1.hook_resid_post`, the output of block 1 = Hugging Face `hidden_states[2]`) as a sparse,
non-negative combination of **F** learned directions (latents): *x̂ = f · W_dec + b_dec*.

- **Tokens coloured by a latent**: background opacity = the latent's activation relative to its max on your text.
  Click a token to see every latent firing on it.
- **Top-activating contexts** come from held-out TinyStories stories, computed when the checkpoint was trained.
- **Promotes / suppresses**: the latent's decoder direction pushed through the final layer norm's affine part
  and the unembedding — the tokens whose logits it raises or lowers directly.
- **Metrics** are defined once in `sae/metrics.py`: MSE, variance explained (about the mean), cosine, L0,
  next-token CE with the SAE spliced in vs. zeros, `ce_loss_score` = (zeros − SAE)/(zeros − clean).

### Getting checkpoints
`python -m training base-lm` trains the small offline model `tinystories-mini`; `python -m training tinystories`
trains its SAEs; `python -m training toy` the toy models. `python app.py --hub-repo user/repo` (or env
`SAE_HUB_REPOS=user/repo1,user/repo2`) adds checkpoints from the Hugging Face Hub.

TinyStories (Eldan & Li, 2023) is licensed CDLA-Sharing-1.0.
"""


# ---------------------------------------------------------------------------------------- startup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env_port = os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or "7860"
    p = argparse.ArgumentParser(description="SAE explorer: a Gradio app to explore sparse-autoencoder latents on "
                                            "TinyStories language models and toy models.")
    p.add_argument("--checkpoints", action="append", default=None, metavar="DIR",
                   help="checkpoints root (repeatable; default: checkpoints/ beside app.py)")
    p.add_argument("--hub-repo", action="append", default=[], metavar="REPO_ID",
                   help="also load checkpoints from this Hugging Face Hub repo (repeatable; env SAE_HUB_REPOS adds "
                        "comma-separated ones)")
    p.add_argument("--base-model", action="append", default=[], metavar="NAME=SOURCE",
                   help="load SAEs whose model_name is NAME on SOURCE (a local HF folder, Hub id or random:<cfg>)")
    p.add_argument("--port", type=int, default=int(env_port), help="port (default: $PORT, $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                   help="interface to listen on (default: $GRADIO_SERVER_NAME or 0.0.0.0)")
    p.add_argument("--hub-timeout", type=float, default=HUB_TIMEOUT_S, help="seconds to wait for each Hub repo")
    p.add_argument("--concurrency", type=int, default=2, help="requests processed at once (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: CPU cores / concurrency, at least 1; oversubscribed threads "
                        "make every request slower)")
    return p.parse_args(argv)


def make_explorer(args: argparse.Namespace) -> Explorer:
    roots = [Path(r) for r in (args.checkpoints or [DEFAULT_CHECKPOINTS])]
    sources = [A.Source(r.resolve(), "local") for r in roots]
    notices = [f"Checkpoints folder {r} does not exist." for r in roots if not r.is_dir() and args.checkpoints]
    repos = [r.strip() for r in os.environ.get("SAE_HUB_REPOS", "").split(",") if r.strip()]
    repos += [r for r in args.hub_repo if r not in repos]
    if repos:
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        hub_sources, hub_notices = A.fetch_hub_sources(repos, timeout=args.hub_timeout)
        sources += hub_sources
        notices += hub_notices
    overrides = dict(s.split("=", 1) for s in args.base_model if "=" in s)
    return Explorer(A.CheckpointCatalog(sources, base_models=overrides), notices)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    threads = A.set_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, args.concurrency)))
    ex = make_explorer(args)
    for n in ex.notices:
        log.warning(n)
    log.info("%d LM checkpoints, %d toy folders; %d torch threads", len(ex.catalog.entries),
             len(ex.catalog.toy_folders), threads)
    ex.warm()
    demo = build_ui(ex)
    demo.queue(default_concurrency_limit=max(1, args.concurrency))
    demo.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=False,
                allowed_paths=[str(s.root) for s in ex.catalog.sources], footer_links=["api"])


class AppStartError(RuntimeError):
    """The app subprocess exited, or did not answer in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_subprocess(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0, log_path: Path | None = None
) -> Iterator[str]:
    """Run `python app.py ARGS` on a free local port; yield its URL once it answers, stop it afterwards.

    For the browser tests and the latency benchmark. The app's output goes to `log_path` (kept), or to a
    temporary file removed at the end. Raises AppStartError, with the end of the log, when the app exits
    or does not answer within `timeout` seconds.
    """
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "SAE_HUB_REPOS": "",
           "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost", **(env or {})}
    keep_log = log_path is not None
    if log_path is None:
        fd, name = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "app.py"), *args, "--port", str(port),
                                 "--host", "127.0.0.1"], cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise AppStartError(f"app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).read(100)
                break
            except OSError as err:
                if time.time() > deadline:
                    raise AppStartError(
                        f"app did not start within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}"
                    ) from err
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if not keep_log:
            log_path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
