"""How low-rank is a model's residual stream at the SAE hook? Share of variance in the top-k principal components.

    python bench/residual_spectrum.py --model checkpoints/tinystories-mini --stories 100

Reads the held-out stories (every 10th story of the stories file, as the SAE pipeline holds out),
harvests the residual at `blocks.<layer>.hook_resid_post` and prints the cumulative explained variance
of its principal components (about the mean, as `variance_explained` is defined).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's sae/ and training/
from sae.base_model import load_base_model
from training.activations import harvest_stories
from training.stories import default_stories_path, load_stories, split_stories


def spectrum(acts: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """Float[Tensor, "n d"] -> {k: share of the variance about the mean held by the top k components}."""
    centred = acts.double() - acts.double().mean(0)
    eig = torch.linalg.svdvals(centred) ** 2
    cum = eig.cumsum(0) / eig.sum()
    return {k: float(cum[min(k, len(cum)) - 1]) for k in ks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="checkpoints/tinystories-mini")
    p.add_argument("--data", default=str(default_stories_path()))
    p.add_argument("--stories", type=int, default=100, help="held-out stories to harvest")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100, 200, 255])
    args = p.parse_args()
    torch.set_num_threads(1)
    bm = load_base_model(args.model)
    stories = split_stories(load_stories(args.data)).val[: args.stories]
    # One story per row from position 0, as the trainer and the evaluation read them (not packed windows).
    acts = harvest_stories(bm, stories, args.layer, context_size=bm.context_size, pack=False, progress=False)
    shares = spectrum(acts, args.ks)
    missing = 1 - shares[max(k for k in args.ks if k < bm.d_model)] if any(k < bm.d_model for k in args.ks) else None
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens": len(acts),
                "d_model": bm.d_model,
                "top_k_variance_share": shares,
                "left_outside_largest_k_below_d": missing,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
