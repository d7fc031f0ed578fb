"""Latency of the explorer app: server-side time to analyse a 200-token story, through the real HTTP API.

Starts `app.py` on a free local port, sends `--requests` analyse requests with `gradio_client` (after
`--warmup` unmeasured ones), and reports p50 / p95 of the phases the analysis records (model forward,
SAE, downstream CE passes, rendering), of the whole server handler, and of the client round trip.
Target: p50 of the server handler < 300 ms for F = 1000 on tinystories-mini.

    python bench/bench_app_latency.py                                  # checkpoints/tinystories-mini, F=1000
    python bench/bench_app_latency.py --sae DIR/<model>/<hook>/<run>/F<d>  [--model HF_FOLDER]
    python bench/bench_app_latency.py --write                          # also update BENCHMARKS.md

`--write` replaces only the "## App latency" section of BENCHMARKS.md (re-read right before writing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## App latency"
PHASES = [("model_forward", "model forward (clean pass; residual captured at the hook)"),
          ("sae", "SAE encode/decode + reconstruction metrics"),
          ("downstream", "downstream passes (zeros / SAE spliced in) + CE, KL"),
          ("render", "rendering (token HTML, tables, latent panel)"), ("total", "whole server handler")]
STORY_SEED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. One day, "
    "she saw a big red ball in the park. She ran to the ball and kicked it high into the sky. The ball flew over "
    "the trees and landed near a pond. A friendly duck swam over and pushed the ball back to Lily with its beak. "
    "Lily laughed and said, \"Thank you, duck! You are very kind.\" The duck quacked happily. From that day on, "
    "Lily and the duck played together every morning. They raced along the grass, splashed in the water, and "
    "shared bread under the big oak tree. When winter came, the pond froze, and the duck had to fly away to a "
    "warmer place. Lily was sad, but her mom hugged her and said, \"The duck will come back in the spring.\" "
    "Lily waited and waited. She drew pictures of the duck and hung them on her wall. When the flowers bloomed "
    "again, Lily ran to the pond, and there was the duck, waiting for her with a new friend."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="checkpoints root (default checkpoints/)")
    p.add_argument("--model-name", default="tinystories-mini", help="base model folder name in the checkpoints tree")
    p.add_argument("--hook", default="blocks.1.hook_resid_post")
    p.add_argument("--run", default=None, help="run folder (default: standard if present, else the first)")
    p.add_argument("--width", type=int, default=1000, help="SAE width F (default 1000)")
    p.add_argument("--sae", default=None, help="an SAE folder <root>/<model>/<hook>/<run>/F<d> (overrides the above)")
    p.add_argument("--model", default=None, help="base model source (HF folder / Hub id) if not beside the SAEs")
    p.add_argument("--synthetic", action="store_true",
                   help="benchmark a random-weight model of tinystories-mini's shape (GPT-Neo, d_model 256, 4 blocks, "
                        "vocab 4096, 512 positions) with a random F-wide SAE and latent stats, built in a temporary "
                        "folder: for machines without trained checkpoints (speed does not depend on the weights)")
    p.add_argument("--tokens", type=int, default=200, help="story length in tokens (default 200)")
    p.add_argument("--requests", type=int, default=50, help="measured requests (default 50)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured requests first (default 3)")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--benchmarks-file", default=str(ROOT / "BENCHMARKS.md"))
    return p.parse_args(argv)


def build_synthetic(root: Path, width: int, hook: str) -> Path:
    """A checkpoints tree with a random tinystories-mini-shaped model and one random SAE (+ latent stats)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    from sae.architectures import build_sae
    from sae.base_model import load_base_model, parse_hook_name, residual_at
    from sae.checkpoint import sae_folder, save_sae
    from sae.config import SAEConfig
    from sae.latent_stats import LatentStats, empty_histogram_edges

    eot = "<|endoftext|>"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([STORY_SEED] * 4, vocab_size=4096, special_tokens=[eot], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eot, bos_token=eot, pad_token=eot, unk_token=eot)
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, max_position_embeddings=512,
                       attention_types=[[["global", "local"], 2]], window_size=256, intermediate_size=1024,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model_dir = root / "tinystories-mini-random"
    GPTNeoForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bm = load_base_model(str(model_dir))
    layer = parse_hook_name(hook)
    x = residual_at(bm, torch.tensor([tok(STORY_SEED).input_ids[:500]]), None, layer)[0]
    sae = build_sae(SAEConfig("standard", 256, width, metadata={"model_name": bm.name, "hook_name": hook}), seed=0)
    with torch.no_grad():
        sae.b_enc.sub_(sae.pre_acts(x).quantile(0.97, dim=0))  # ~3% of latents fire per token
        acts = sae.encode(x)
    n_top, window, n_bins = 12, 16, 40  # training/evaluate.py's defaults
    edges = empty_histogram_edges(float(acts.max()), n_bins)
    stats = LatentStats(
        freq=(acts > 0).float().mean(0), max_act=acts.max(0).values, hist_edges=edges,
        hist_counts=torch.randint(0, 50, (width, n_bins)), top_acts=torch.rand(width, n_top).sort(1, True).values,
        top_token_ids=torch.randint(0, len(tok), (width, n_top, window)),
        top_window_acts=torch.rand(width, n_top, window).half(), top_center=torch.full((width, n_top), 11),
        n_tokens=100_000)
    save_sae(sae, sae_folder(root, bm.name, hook, "standard", width), extra=stats.save)
    return root


def resolve_target(args: argparse.Namespace) -> tuple[Path, str, str, str, int]:
    """(checkpoints root, model name, hook, run, F) of the SAE to benchmark."""
    if args.synthetic:
        root = build_synthetic(Path(tempfile.mkdtemp(prefix="bench-app-")), args.width, args.hook)
        return root, "tinystories-mini-random", args.hook, "standard", args.width
    if args.sae:
        folder = Path(args.sae).resolve()
        if not (folder / "cfg.json").is_file():
            sys.exit(f"--sae {folder}: no cfg.json there")
        m = re.fullmatch(r"F(\d+)", folder.name)
        if not m:
            sys.exit(f"--sae {folder}: expected a folder named F<d_sae> in <root>/<model>/<hook>/<run>/")
        meta = json.loads((folder / "cfg.json").read_text()).get("metadata", {})
        return (folder.parents[3], meta.get("model_name", folder.parents[2].name),
                meta.get("hook_name", folder.parents[1].name), folder.parent.name, int(m.group(1)))
    hook_dir = Path(args.checkpoints) / args.model_name / args.hook
    if not hook_dir.is_dir():
        sys.exit(f"{hook_dir} does not exist: train the SAEs first (python -m training tinystories) or pass --sae")
    runs = sorted(d.name for d in hook_dir.iterdir() if (d / f"F{args.width}" / "cfg.json").is_file())
    if not runs:
        sys.exit(f"no run under {hook_dir} has an F{args.width} checkpoint; pass --width or --sae")
    run = args.run or ("standard" if "standard" in runs else runs[0])
    return Path(args.checkpoints).resolve(), args.model_name, args.hook, run, args.width


def make_story(model_source: str, n_tokens: int) -> str:
    if model_source.startswith("random:"):  # random weights with the GPT-2 tokenizer (sae.base_model)
        sys.path.insert(0, str(ROOT))
        from sae.base_model import gpt2_tokenizer

        tok = gpt2_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_source)
    text = STORY_SEED
    while len(tok(text).input_ids) < n_tokens:
        text = text + " " + STORY_SEED
    enc = tok(text, return_offsets_mapping=True)
    end = enc["offset_mapping"][n_tokens - 1][1]
    story = text[:end]
    got = len(tok(story).input_ids)
    if got != n_tokens:  # merges at the cut can shift the count by one or two
        print(f"note: story is {got} tokens (asked {n_tokens})", file=sys.stderr)
    return story


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def measure(url: str, story: str, target: tuple, args: argparse.Namespace):
    """Warm-up plus timed `/analyze` calls: per-phase server timings, round trips (ms), tokens, load."""
    from gradio_client import Client

    model_name, hook, run, width = target
    client = Client(url, verbose=False)
    load_avg = [os.getloadavg()[0]]
    call = (story, model_name, hook, run, str(width), "final", "max", "error")
    phases: dict[str, list[float]] = {k: [] for k, _ in PHASES}
    rtt: list[float] = []
    n_tok = None
    for i in range(args.warmup + args.requests):
        t0 = time.perf_counter()
        out = client.predict(*call, api_name="/analyze")
        dt = (time.perf_counter() - t0) * 1e3
        timings = next((o for o in out if isinstance(o, dict) and "model_forward" in o), None)
        if timings is None:
            status = next((o for o in out if isinstance(o, str) and "⚠" in o), out)
            sys.exit(f"the app did not analyse the story: {status}")
        if n_tok is None:
            n_tok = next((int(m.group(1)) for o in out if isinstance(o, str)
                          for m in [re.search(r"Analysed \*\*(\d+) tokens", o)] if m), None)
        if i >= args.warmup:
            rtt.append(dt)
            for k, _ in PHASES:
                phases[k].append(float(timings.get(k, float("nan"))))
    load_avg.append(os.getloadavg()[0])
    return phases, rtt, n_tok, load_avg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root, model_name, hook, run, width = resolve_target(args)
    model_source = args.model or str(root / model_name)
    story = make_story(model_source, args.tokens)
    app_args = ["--checkpoints", str(root)]
    if args.model:
        app_args += ["--base-model", f"{model_name}={args.model}"]
    sys.path.insert(0, str(ROOT))
    from explorer.serve import AppStartError, serve_in_subprocess

    log_path = Path(tempfile.mkstemp(suffix=".log")[1])
    try:
        with serve_in_subprocess(app_args, timeout=120, log_path=log_path) as url:
            phases, rtt, n_tok, load_avg = measure(url, story, (model_name, hook, run, width), args)
        app_log = log_path.read_text()
    except AppStartError as err:
        sys.exit(str(err))
    finally:
        log_path.unlink(missing_ok=True)
        if args.synthetic:
            shutil.rmtree(root, ignore_errors=True)

    rows = [(label, percentile(phases[k], 0.5), percentile(phases[k], 0.95)) for k, label in PHASES]
    rows.append(("client round trip (gradio_client, incl. queue + transfer)", percentile(rtt, 0.5),
                 percentile(rtt, 0.95)))
    p50_total = percentile(phases["total"], 0.5)
    cmdline = "python bench/bench_app_latency.py " + " ".join(
        _portable(a) for a in (argv if argv is not None else sys.argv[1:]))
    table = ["| phase | p50 (ms) | p95 (ms) |", "|---|---:|---:|"]
    table += [f"| {label} | {p50:.1f} | {p95:.1f} |" for label, p50, p95 in rows]
    verdict = "meets" if p50_total < 300 else "misses"
    m = re.search(r"(\d+) torch threads", app_log)
    threads = m.group(1) if m else "?"
    load = " / ".join(f"{x:.1f}" for x in load_avg)
    cpu = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {threads} torch thread(s) per request (app default: "
           f"cores / concurrency), 1-min load average {load} at start / end (other jobs share the cores)")
    body = "\n".join([
        SECTION, "",
        f"Server-side time to analyse a {n_tok}-token story with `{model_name}` · `{hook}` · `{run}` · F={width}, "
        f"{args.requests} requests through `gradio_client` against a locally started `app.py` "
        f"({args.warmup} warm-up requests not counted). Phases are the timings `explorer.analyze` records per request.",
        "",
        *(["`--synthetic`: random weights in tinystories-mini's shape (GPT-Neo, d_model 256, 4 blocks, vocab 4096) "
           "and a random SAE with ~3% of latents firing, because no trained checkpoint was available; the time "
           "depends on the shapes, not on the weights.", ""] if args.synthetic else []),
        f"Command: `{cmdline.strip()}`",
        "",
        *table, "",
        f"p50 of the whole handler: **{p50_total:.0f} ms** ({verdict} the 300 ms target). Machine: {cpu}; "
        f"measured {time.strftime('%Y-%m-%d')}.",
        "",
    ])
    print(body)
    if args.write:
        write_section(Path(args.benchmarks_file), body)
        print(f"updated {args.benchmarks_file}")


def _portable(arg: str) -> str:
    """Command-line argument as recorded in BENCHMARKS.md: no paths of this particular machine."""
    for prefix in ("", "random:"):
        if arg.startswith(prefix) and Path(arg[len(prefix):]).is_absolute():
            path = Path(arg[len(prefix):]).resolve()
            try:
                return prefix + str(path.relative_to(ROOT))
            except ValueError:
                return prefix + "<DIR>/" + "/".join(path.parts[-4:])
    return arg


def write_section(path: Path, body: str) -> None:
    """Replace (or append) our section only; everything else in the file is kept byte for byte."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        new = text[:start] + body + ("\n" if nxt else "") + text[end:]
    path.write_text(new)


if __name__ == "__main__":
    main()
