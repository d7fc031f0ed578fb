"""Print the README's worked example: one latent of a shipped SAE, its matches in the other widths, and what
ablating it changes in a story. Rerun it after retraining and paste the output into the README.

    python docs/worked_example.py                      # checkpoints/, tinystories-mini, run standard, F=100
    python docs/worked_example.py --latent 17 --run topk
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. "
         "One day, she saw a big red ball in the park. She ran to the ball and kicked it high into the sky.")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The flags that pick the checkpoint tree, base model, hook and run (shared with make_screenshots)."""
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    p.add_argument("--model", default="tinystories-mini")
    p.add_argument("--hook", default="blocks.1.hook_resid_post")
    p.add_argument("--run", default="standard")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--width", type=int, default=100, help="the width whose latent is followed (default 100)")
    p.add_argument("--latent", type=int, default=None, help="default: the latent with the largest activation")
    p.add_argument("--text", default=STORY)
    p.add_argument("--new-tokens", type=int, default=24)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    from explorer.analyze import analyze_text
    from explorer.catalog import CheckpointCatalog, Source
    from explorer.intervene import Intervention, intervene
    from explorer.latents import top_latents
    from explorer.links import link_latent
    from explorer.state import Explorer

    args = parse_args(argv)
    ex = Explorer(CheckpointCatalog([Source(Path(args.checkpoints), "local")]), [])
    entry = ex.entry(args.model, args.hook, args.run, args.width, "final")
    bm, sae = ex.load(entry)
    a = analyze_text(bm, sae, args.hook, args.text)
    latent = args.latent if args.latent is not None else top_latents(a, "max", 1)[0].latent
    acts = a.latents[:, latent]
    fired = [f"`{a.tokens[i]}` ({float(acts[i]):.2f})" for i in torch.argsort(acts, descending=True)[:5] if acts[i] > 0]
    others = [e for e in ex.catalog.finals(args.model, args.hook) if e.info.run == args.run and e != entry]
    loaded = [(f"F={e.info.d_sae}", str(e.info.path), ex.cache.sae(e.info.path)) for e in others]
    links = link_latent(bm, sae, str(entry.info.path), loaded, args.hook, args.text, latent, ex.cosines)
    print(f"Run `{args.run}`, F={args.width}, latent **{latent}** on the story below; it fires most on "
          f"{', '.join(fired)}.\n")
    print("| width | verdict | best matches (decoder cosine) | max on the story |")
    print("|---|---|---|---:|")
    for w in links.widths:
        best = ", ".join(f"{m.latent} ({m.cosine:.2f})" for m in w.matches[:3])
        print(f"| {w.label} | {w.verdict} | {best} | {float(w.acts[:, 0].max()):.2f} |")
    res = intervene(bm, sae, args.hook, args.text, Intervention(latent, "ablate"), n_new=args.new_tokens,
                    token_strings=ex.cache.token_strings(bm))
    change = res.ce_change
    finite = change[1:]
    order = torch.argsort(finite.abs(), descending=True)[:3] + 1
    worst = ", ".join(f"`{res.tokens[int(i)]}` ({float(change[i]):+.2f})" for i in order)
    print(f"\nAblating it on every token changes the mean next-token CE by **{float(finite.mean()):+.3f}** nats "
          f"({finite.numel()} predictions); the largest changes are at {worst}.\n")
    for when, preds in (("before", res.top_before), ("after", res.top_after)):
        print(f"- Top next tokens after the story, {when}: {', '.join(f'`{p.token}` {p.prob:.2f}' for p in preds[:4])}")
    print(f"- Greedy continuation before: “{res.continuation_before.strip()}”")
    print(f"- Greedy continuation after: “{res.continuation_after.strip()}”")


if __name__ == "__main__":
    main()
