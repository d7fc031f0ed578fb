"""Activation harvesting throughput: early stopping (residual_at) vs a full forward with all hidden states.

Both run on the same batch in the same process; prints a markdown table of median tokens/s.
Example: python bench/bench_harvest.py --batch 8 --seq 256 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.base_model import load_base_model, residual_at  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="../shared/data/tinystories-33m/config.json",
                   help="GPT-Neo config.json for random weights (relative paths: from the repo root)")  # fmt: skip
    p.add_argument("--model", help="load this Hub id / local folder instead of --config")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = Path(args.config)
    spec = args.model or f"random:{config if config.is_absolute() else ROOT / config}"
    bm = load_base_model(spec, device=args.device)
    ids = torch.randint(0, bm.tokenizer.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)

    def early():
        return residual_at(bm, ids, mask, args.layer)

    def full():
        with torch.inference_mode():
            return bm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)

    def sync():
        if ids.is_cuda:
            torch.cuda.synchronize()

    torch.testing.assert_close(early(), full().hidden_states[args.layer + 1])
    times: dict[str, list[float]] = {"early": [], "full": []}
    for _ in range(args.repeats):  # interleaved so drifting machine load hits both alike
        for name, fn in (("early", early), ("full", full)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    n_tok = args.batch * args.seq
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    hw = platform.processor() or platform.machine()
    print(
        f"model `{bm.name}` ({bm.n_layers} blocks, d_model {bm.d_model}), hook blocks.{args.layer}.hook_resid_post, "
        f"batch {args.batch} x {args.seq} tokens, {args.repeats} repeats (after 1 warm-up), device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {hw}\n"
    )
    print("| method | median s/batch | median tokens/s |")
    print("|---|---:|---:|")
    for name, label in (("early", f"early stop after block {args.layer} (`residual_at`)"),
                        ("full", "full forward, `output_hidden_states=True`")):  # fmt: skip
        print(f"| {label} | {statistics.median(times[name]):.3f} | {tps[name]:,.0f} |")
    print(f"\nspeed-up: **{tps['early'] / tps['full']:.2f}x**")


if __name__ == "__main__":
    main()
