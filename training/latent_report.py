"""`python -m training latents SAE_FOLDER`: a Markdown look at latents' top-activating contexts.

Reads `latent_stats.safetensors` beside the checkpoint and the base model's tokenizer (from the
checkpoint's metadata), so it needs no forward pass. By default it picks `n` live latents spread
evenly over the firing-frequency ranking (rare to common), which is a fairer sample than the top.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from sae.checkpoint import load_config
from sae.latent_stats import LatentStats


def pick_latents(stats: LatentStats, n: int) -> list[int]:
    """`n` latents that fired, evenly spaced over the frequency ranking."""
    alive = [int(i) for i in stats.freq.argsort(descending=True).tolist() if float(stats.freq[i]) > 0]
    if len(alive) <= n:
        return alive
    return [alive[round(j * (len(alive) - 1) / (n - 1))] for j in range(n)] if n > 1 else alive[:1]


def context_line(stats: LatentStats, tokenizer, latent: int, j: int) -> str:
    """One context as text, the max-activation token in bold."""
    pieces = []
    for k, tid in enumerate(stats.top_token_ids[latent, j].tolist()):
        if tid < 0:
            continue
        text = tokenizer.decode([tid]).replace("\n", "↵").replace("|", "\\|")
        if k == int(stats.top_center[latent, j]):
            stripped = text.lstrip()  # Markdown bold may not start with a space
            text = f"{text[: len(text) - len(stripped)]}**{stripped or '␣'}**"
        pieces.append(text)
    return "".join(pieces).strip()


def report(folder: Path, latents: list[int] | None, n: int, contexts: int) -> str:
    cfg = load_config(folder)
    stats = LatentStats.load(folder)
    if stats is None:
        raise SystemExit(f"{folder} has no latent statistics (run the trainer's evaluation first)")
    source = cfg.metadata.get("model_path") or cfg.metadata.get("model_name")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    chosen = latents or pick_latents(stats, n)
    lines = [f"Latents of `{folder}` ({stats.n_tokens:,} held-out tokens)", "",
             "| latent | fires on | max act | top contexts (max token in bold) |", "|---:|---:|---:|---|"]
    for latent in chosen:
        ctx = " · ".join(
            context_line(stats, tokenizer, latent, j)
            for j in range(min(contexts, stats.top_acts.shape[1]))
            if float(stats.top_acts[latent, j]) > 0
        )
        lines.append(f"| {latent} | {float(stats.freq[latent]):.2%} | {float(stats.max_act[latent]):.2f} | {ctx} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training latents", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an SAE checkpoint folder with latent_stats.safetensors")
    parser.add_argument("--latents", type=int, nargs="+", help="latent indices (default: spread over frequency)")
    parser.add_argument("--n", type=int, default=10, help="how many latents to pick when --latents is absent")
    parser.add_argument("--contexts", type=int, default=4, help="top contexts per latent")
    args = parser.parse_args(argv)
    print(report(args.folder, args.latents, args.n, args.contexts))


if __name__ == "__main__":
    main()
