"""The Gradio page: components and the wiring of events to the plain handlers in `explorer.handlers` and
`explorer.tool_handlers` (this module holds no computation of its own).

Analyses carry a browser-side request number (`SEQ_JS`): the server drops a result that is older than
the newest request of the same session, so a late page-load analysis never overwrites the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from explorer import handlers as H
from explorer import tool_handlers as T
from explorer.gpu import gpu_task
from explorer.intervene import MAX_NEW_TOKENS, OPERATIONS
from explorer.render import TOKEN_CLICK_JS
from explorer.state import Explorer, step_choices

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

SEQ_JS = """(...args) => { window.__saeSeq = (window.__saeSeq || 0) + 1; args[0] = window.__saeSeq; return args; }"""
"""Numbers analysis requests in the order the user made them (the first input is the number)."""
COPY_LINK_JS = """(text, model, hook, run, f, step, latent) => {
  const u = new URL(window.location.href); u.search = "";
  const p = {text, model, hook, run, F: f, step, latent};
  for (const [k, v] of Object.entries(p)) if (v !== null && v !== undefined && v !== "") u.searchParams.set(k, v);
  const s = u.toString();
  try { navigator.clipboard.writeText(s); } catch (e) {}
  return s;
}"""
SELECTORS = ("model_dd", "hook_dd", "run_radio", "f_radio", "step_dd")
AN_INPUTS = ("text", *SELECTORS, "rank_by", "second_mode")
AN_OUTPUTS = ("state", "sel_pos", "latent_num", "top_df", "tokens_view", "error_view", "act_title", "err_title",
              "metrics_view", "ckpt_info", "token_md", "token_df", "latent_header", "contexts", "hist", "effects_md",
              "effects_df", "status", "timings_md", "timings_json")
LAT_OUTPUTS = ("latent_header", "contexts", "hist", "effects_md", "effects_df", "tokens_view", "error_view",
               "act_title", "err_title", "latent_num", "status")
LINK_OUTPUTS = ("links_status", "links_view", "links_json")
IV_OUTPUTS = ("iv_status", "iv_ce_view", "iv_acts_view", "iv_top_title", "iv_top_df", "iv_before", "iv_after",
              "iv_json")
TOY_OUTPUTS = ("toy_features", "toy_gif", "toy_summary", "toy_inst")
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


def emit(C: dict[str, Any], out: dict[str, Any]) -> dict[Any, Any]:
    """A handler's named outputs as Gradio updates (pop-ups for its warning / info)."""
    if H.WARNING in out:
        gr.Warning(out[H.WARNING])
    if H.INFO in out:
        gr.Info(out[H.INFO])
    res = {}
    for k, v in out.items():
        if k.startswith("_"):
            continue
        res[C[k]] = gr.update(choices=v.choices, value=v.value) if isinstance(v, H.Choices) else v
    return res


def comps(C: dict[str, Any], names: Sequence[str]) -> list[Any]:
    return [C[n] for n in names]


def explore_tab(ex: Explorer, C: dict[str, Any]) -> None:
    cat = ex.catalog
    d = cat.default()
    model, hook, run, f = (d.model_key, d.info.hook_name, d.info.run, str(d.info.d_sae)) if d else (None,) * 4
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            C["text"] = gr.Textbox(label="Your story", lines=5, max_lines=14, value=EXAMPLES[0],
                                   placeholder="Once upon a time…", elem_id="story")
            with gr.Row():
                C["analyze_btn"] = gr.Button("Analyze", variant="primary", elem_id="analyze-btn")
                C["clear_btn"] = gr.Button("Clear", elem_id="clear-btn")
                C["copy_btn"] = gr.Button("Copy link", elem_id="copy-link")
            C["link_box"] = gr.Textbox(label="Link to this view (text, checkpoint, latent)", elem_id="link-box",
                                       interactive=False, max_lines=2)
            gr.Examples(EXAMPLES, inputs=C["text"], label="TinyStories-style openings")
        with gr.Column(scale=2):
            with gr.Group():
                C["model_dd"] = gr.Dropdown(cat.models(), value=model, label="Base model", elem_id="model-dd")
                C["hook_dd"] = gr.Dropdown(cat.hooks(model) if model else [], value=hook, label="Hook",
                                           elem_id="hook-dd")
                C["run_radio"] = gr.Radio(cat.runs(model, hook) if model else [], value=run,
                                          label="Run / architecture", elem_id="run-radio")
                C["f_radio"] = gr.Radio([str(w) for w in cat.widths(model, hook, run)] if model else [], value=f,
                                        label="Width F (latents)", elem_id="f-radio")
                steps = cat.steps(model, hook, run, int(f)) if model else []
                C["step_dd"] = gr.Dropdown(step_choices(steps), value="final" if steps else None,
                                           label="Training step", elem_id="step-dd")
            C["ckpt_info"] = gr.Markdown(elem_id="ckpt-info")
    C["status"] = gr.Markdown(elem_id="status-box")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row():
                C["latent_num"] = gr.Number(label="Latent shown on the text", precision=0, minimum=0, value=None,
                                            elem_id="latent-num", scale=1)
                modes = [("reconstruction error ‖x − x̂‖²", "error"), ("CE increase with SAE", "ce")]
                C["second_mode"] = gr.Radio(modes, value="error", label="Second view colours tokens by", scale=2)
            C["act_title"] = gr.Markdown("**Tokens coloured by latent activation** (click a token)")
            C["tokens_view"] = gr.HTML(js_on_load=TOKEN_CLICK_JS, elem_id="tokens-view", min_height=60)
            C["err_title"] = gr.Markdown("**Tokens coloured by reconstruction error**")
            C["error_view"] = gr.HTML(js_on_load=TOKEN_CLICK_JS, elem_id="error-view", min_height=60)
            C["timings_md"] = gr.Markdown(elem_classes=["legend-note"], elem_id="timings")
            C["timings_json"] = gr.JSON(visible=False)
        with gr.Column(scale=2):
            gr.Markdown("**Reconstruction quality on this text**")
            C["metrics_view"] = gr.HTML(elem_id="metrics-view")
            C["token_md"] = gr.Markdown(H.TOKEN_HINT, elem_id="token-md")
            C["token_df"] = gr.Dataframe(headers=["latent", "activation"], interactive=False,
                                         elem_id="token-latents", max_height=260)
    latent_row(C)


def latent_row(C: dict[str, Any]) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            C["rank_by"] = gr.Radio([("max activation", "max"), ("total activation", "total")], value="max",
                                    label="Top latents on this text, ranked by")
            C["top_df"] = gr.Dataframe(headers=H.TOP_COLUMNS, interactive=False, elem_id="top-latents",
                                       max_height=420)
        with gr.Column(scale=3):
            C["latent_header"] = gr.Markdown("*Select a latent to see what it does.*", elem_id="latent-header")
            C["contexts"] = gr.HTML(elem_id="latent-contexts", max_height=360)
            C["hist"] = gr.HTML(elem_id="latent-hist")
            C["effects_md"] = gr.Markdown(elem_classes=["legend-note"])
            C["effects_df"] = gr.Dataframe(headers=H.EFFECT_COLUMNS, interactive=False, elem_id="latent-effects",
                                           max_height=300)


def links_tab(C: dict[str, Any]) -> None:
    gr.Markdown("The latent shown on the Explore tab, matched in every other width of the same base model, hook "
                "and run by the cosine of decoder directions, with each match's activations on your story. One "
                "latent splitting into several at a larger F is *feature splitting*.")
    C["links_btn"] = gr.Button("Find this latent in the other widths", variant="primary", elem_id="links-btn")
    C["links_status"] = gr.Markdown(elem_id="links-status")
    C["links_view"] = gr.HTML(elem_id="links-view")
    C["links_json"] = gr.JSON(visible=False)


def intervene_tab(C: dict[str, Any]) -> None:
    gr.Markdown("Edit the latent shown on the Explore tab at the hook — ablate (set to 0), clamp to a value, or "
                "add a multiple of its decoder direction — and see how the next-token losses, the predictions "
                "and a continuation of your story change.")
    with gr.Row():
        C["iv_op"] = gr.Radio(list(OPERATIONS), value="ablate", label="Operation", elem_id="iv-op")
        C["iv_value"] = gr.Number(value=0.0, label="Clamp value / steering multiple", elem_id="iv-value")
        C["iv_positions"] = gr.Textbox(value="all", label="Tokens to edit ('all' or positions like 3, 5-7)",
                                       elem_id="iv-positions")
    with gr.Row():
        C["iv_position"] = gr.Number(value=None, precision=0, label="Predictions after token # (empty: last)",
                                     elem_id="iv-position")
        C["iv_new"] = gr.Slider(0, MAX_NEW_TOKENS, value=24, step=1, label="New tokens", elem_id="iv-new")
        C["iv_sampling"] = gr.Radio(["greedy", "seeded sampling"], value="greedy", label="Continuation")
        C["iv_seed"] = gr.Number(value=0, precision=0, label="Seed")
    C["iv_btn"] = gr.Button("Intervene", variant="primary", elem_id="iv-btn")
    C["iv_status"] = gr.Markdown(elem_id="iv-status")
    gr.Markdown("**Change of next-token CE per token** (red: worse, blue: better; the outlined token is where "
                "predictions are read)")
    C["iv_ce_view"] = gr.HTML(elem_id="iv-ce-view")
    gr.Markdown("**The latent on the text before the edit**")
    C["iv_acts_view"] = gr.HTML(elem_id="iv-acts-view")
    C["iv_top_title"] = gr.Markdown()
    C["iv_top_df"] = gr.Dataframe(interactive=False, elem_id="iv-top")
    with gr.Row():
        C["iv_before"] = gr.Textbox(label="Continuation without the edit", lines=4, elem_id="iv-before")
        C["iv_after"] = gr.Textbox(label="Continuation with the edit", lines=4, elem_id="iv-after")
    C["iv_json"] = gr.JSON(visible=False)


def compare_tab(C: dict[str, Any]) -> None:
    gr.Markdown("Every final checkpoint of the selected base model and hook, on the story from the Explore tab "
                "(VE = variance explained; *eval* columns come from each checkpoint's metrics.json on the held-out "
                "stories). Training curves below, one line per checkpoint.")
    C["compare_btn"] = gr.Button("Compare on my story", variant="primary", elem_id="compare-btn")
    C["compare_status"] = gr.Markdown()
    C["compare_df"] = gr.Dataframe(interactive=False, elem_id="compare-table")
    C["loss_plot"] = gr.Plot(label="Training loss curves", show_label=False, elem_id="loss-plot")


def toy_tab(ex: Explorer, C: dict[str, Any]) -> None:
    choices = [(p.name, str(p)) for p in ex.catalog.toy_folders]
    if not choices:
        gr.Markdown("No toy-model checkpoints found (train them with `python -m training toy`; they go to "
                    "`checkpoints/toy/`).")
    C["toy_dd"] = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Toy checkpoint",
                              elem_id="toy-dd")
    with gr.Row():
        C["toy_features"] = gr.Image(label="Learned features (features.png)", type="filepath", interactive=False)
        C["toy_gif"] = gr.Image(label="Training (training.gif)", type="filepath", interactive=False)
    C["toy_summary"] = gr.Dataframe(label="Summary", interactive=False)
    C["toy_inst"] = gr.Dataframe(label="Per-instance feature recovery", interactive=False)


def build_ui(ex: Explorer) -> gr.Blocks:
    C: dict[str, Any] = {}
    with gr.Blocks(title="SAE explorer", analytics_enabled=False) as demo:
        gr.Markdown("# Sparse-autoencoder explorer\nType a story, pick a checkpoint, and see which SAE latents fire "
                    "on which tokens, what each latent means, how it appears in other widths, and what editing it "
                    "changes — all *on your text*.")
        gr.Markdown(ex.banner(), visible=bool(ex.banner()), elem_id="banner")
        C["state"], C["sel_pos"] = gr.State(None), gr.State(None)
        C["seq"] = gr.Number(value=0, visible=False)
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                explore_tab(ex, C)
            with gr.Tab("Across widths", id="links") as C["links_tab"]:
                links_tab(C)
            with gr.Tab("Intervene", id="intervene"):
                intervene_tab(C)
            with gr.Tab("Compare widths", id="compare") as C["compare_tab"]:
                compare_tab(C)
            with gr.Tab("Toy models", id="toy"):
                toy_tab(ex, C)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT)
        wire_explore(ex, C)
        wire_tools(ex, C)
        wire_load(ex, C, demo)
    return demo


def sequenced(ex: Explorer, C: dict[str, Any], fn: Callable[..., dict], outputs: Sequence[str]) -> Callable:
    """An analysis event: its first input is the browser's request number; a result that is no longer the
    newest of its session is dropped (every output skipped)."""

    def run(request: gr.Request, seq: float | None, *args: Any) -> dict[Any, Any]:
        session = getattr(request, "session_hash", None) or "api"
        n = ex.sequencer.begin(session, "analyze", seq)
        out = fn(*args)
        if not ex.sequencer.is_latest(session, "analyze", n):
            return {C[k]: gr.skip() for k in outputs}
        return emit(C, out)

    return run


def wire_explore(ex: Explorer, C: dict[str, Any]) -> None:
    an_in, an_out = comps(C, ["seq", *AN_INPUTS]), comps(C, AN_OUTPUTS)
    analyze = sequenced(ex, C, gpu_task(lambda *a: H.analyze(ex, *a)), AN_OUTPUTS)
    C["analyze_btn"].click(analyze, an_in, an_out, api_name="analyze", js=SEQ_JS)
    C["text"].submit(analyze, an_in, an_out, api_name=False, js=SEQ_JS)
    C["clear_btn"].click(lambda: "", None, C["text"], api_name=False)
    sel = comps(C, SELECTORS)

    def on_select(*values: Any) -> dict[Any, Any]:
        return emit(C, dict(zip(SELECTORS, H.selectors(ex, *values))))

    for comp in sel:
        comp.input(on_select, sel, sel, api_name=False).then(analyze, an_in, an_out, api_name=False, js=SEQ_JS)
    lat_out = comps(C, LAT_OUTPUTS)
    C["latent_num"].submit(lambda *a: emit(C, H.select_latent(ex, *a)),
                           comps(C, ["latent_num", "state", "sel_pos", "second_mode"]), lat_out, api_name=False)

    def pick_row(evt: gr.SelectData, st: Any, pos: Any, mode: str) -> dict[Any, Any]:
        row = getattr(evt, "row_value", None)
        return emit(C, H.select_latent(ex, row[0], st, pos, mode)) if row else {}

    for df in (C["top_df"], C["token_df"]):
        df.select(pick_row, comps(C, ["state", "sel_pos", "second_mode"]), lat_out, api_name=False)

    def click_token(st: Any, latent: Any, mode: str, evt: gr.EventData) -> dict[Any, Any]:
        return emit(C, H.click_token(st, latent, mode, getattr(evt, "pos", None)))

    click_out = comps(C, ["token_md", "token_df", "sel_pos", "tokens_view", "error_view", "status"])
    for view in (C["tokens_view"], C["error_view"]):
        view.click(click_token, comps(C, ["state", "latent_num", "second_mode"]), click_out, api_name=False)
    C["rank_by"].input(lambda st, by: emit(C, H.rerank(st, by)), comps(C, ["state", "rank_by"]), [C["top_df"]],
                       api_name=False)
    C["second_mode"].input(lambda st, lat, mode, pos: emit(C, H.remode(st, lat, mode, pos)),
                           comps(C, ["state", "latent_num", "second_mode", "sel_pos"]),
                           comps(C, ["error_view", "err_title"]), api_name=False)
    C["copy_btn"].click(None, comps(C, ["text", *SELECTORS, "latent_num"]), C["link_box"], js=COPY_LINK_JS,
                        api_name=False)


def wire_tools(ex: Explorer, C: dict[str, Any]) -> None:
    ckpt = ["text", *SELECTORS, "latent_num"]
    links = gpu_task(lambda *a: T.links(ex, *a))
    C["links_btn"].click(lambda *a: emit(C, links(*a)), comps(C, ckpt), comps(C, LINK_OUTPUTS), api_name="links")
    iv = gpu_task(lambda *a: T.run_intervention(ex, *a))
    iv_in = comps(C, [*ckpt, "iv_op", "iv_value", "iv_positions", "iv_position", "iv_new", "iv_sampling", "iv_seed"])
    C["iv_btn"].click(lambda *a: emit(C, iv(*a)), iv_in, comps(C, IV_OUTPUTS), api_name="intervene")
    compare = gpu_task(lambda *a: H.compare(ex, *a))
    cmp_in, cmp_out = comps(C, ["text", "model_dd", "hook_dd"]), comps(C, ["compare_df", "loss_plot", "compare_status"])
    C["compare_btn"].click(lambda *a: emit(C, compare(*a)), cmp_in, cmp_out, api_name="compare")
    C["compare_tab"].select(lambda *a: emit(C, compare(*a)), cmp_in, cmp_out, api_name=False)
    C["toy_dd"].change(lambda folder: emit(C, H.show_toy(folder)), [C["toy_dd"]], comps(C, TOY_OUTPUTS),
                       api_name=False)


def wire_load(ex: Explorer, C: dict[str, Any], demo: gr.Blocks) -> None:
    """Page load: startup notices, the toy tab, and the deep link's (or the default) analysis."""
    load_names = ("text", *SELECTORS, *AN_OUTPUTS)
    page = gpu_task(lambda params, *a: H.page_load(ex, params, *a))

    def on_load(request: gr.Request, seq: float | None, *args: Any) -> dict[Any, Any]:
        for n in ex.notices:
            gr.Warning(n)
        params = dict(request.query_params) if request is not None else {}
        return sequenced(ex, C, lambda *a: page(params, *a), load_names)(request, seq, *args)

    demo.load(on_load, comps(C, ["seq", *AN_INPUTS]), comps(C, load_names), api_name=False, js=SEQ_JS)
    demo.load(lambda folder: emit(C, H.show_toy(folder)), [C["toy_dd"]], comps(C, TOY_OUTPUTS), api_name=False)
