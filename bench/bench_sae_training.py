"""SAE training throughput (tokens/s): our training step vs SAELens's, and the machine's fp32 matmul ceiling.

One training step = loss + gradients + Adam + the per-step bookkeeping, on one fixed random batch
[batch, d_in] (the same tensor for every contender). Ours: `MultiSAETrainer._train_step` with one SAE (the
hand-written fast path with the default recipe: gradient clipping, a free decoder for standard and TopK, TopK
through rescale_acts_by_decoder_norm and the chain rule, fused Adam, dead-latent counters). SAELens:
`SAETrainer._train_step` on `StandardTrainingSAE` / `TopKTrainingSAE` (forward, firing statistics, backward,
grad-norm clipping, Adam, LR and coefficient schedulers).
Contenders are interleaved within each repeat, and the median over repeats is reported.

The ceiling: the FLOPs a dense step needs at least (10 B d F: 2 forward matmuls, 3 backward, as no input
gradient is needed) at the fp32 matmul rate measured in the same run on [B, d] @ [d, F].

Run it in the separate benchmark venv (sae-lens pins its own dependencies; see BENCHMARKS.md):
    .venv-bench/bin/python bench/bench_sae_training.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our sae/ and training/ from the repo

from training.trainer import MultiSAETrainer
from training.trainer_config import SAESpec, TrainerConfig, sae_config_for


class _NoData:
    def next_batch(self):
        raise RuntimeError("the benchmark feeds batches itself")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def ours(arch: str, d_in: int, d_sae: int, k: int, batch: int, fast: bool = True):
    cfg = TrainerConfig(architectures=[arch], widths=[str(d_sae)], batch_size=batch, k=k, steps=10**9,
                        lr_warmup_steps=0, sparsity_warmup_steps=0, fast=fast, progress=False)
    spec = SAESpec(arch, sae_config_for(cfg, arch, d_in, d_sae, {}), Path("unused"))
    trainer = MultiSAETrainer(cfg, [spec], _NoData())
    return trainer._train_step


def saelens(arch: str, d_in: int, d_sae: int, k: int, batch: int, sparse: bool = False):
    from sae_lens import LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, use_sparse_activations=sparse))
    cfg = SAETrainerConfig(total_training_samples=batch * 10**6, train_batch_size_samples=batch, lr_end=3e-5,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(x):
        trainer._train_step(sae=trainer.sae, sae_in=x)
        trainer.n_training_steps += 1

    return step


def matmul_gflops(batch: int, d_in: int, d_sae: int, repeats: int, min_time: float = 0.3) -> float:
    """fp32 GFLOP/s of `[batch, d_in] @ [d_in, d_sae]` (median of `repeats` timings of >= min_time s each)."""
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    a @ b
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_time / 3:
        a @ b
        n += 1
    per_call = (time.perf_counter() - t0) / n
    inner = max(1, int(min_time / per_call))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        rates.append(2 * batch * d_in * d_sae * inner / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--widths", type=int, nargs="+", default=[100, 768, 1000, 6144])
    p.add_argument("--k", type=int, default=32, help="TopK latents per token (<= 64 for the sparse fast path)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per contender (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--archs", nargs="+", default=["standard", "topk"], choices=["standard", "topk"])
    p.add_argument("--no-saelens", action="store_true", help="skip SAELens (e.g. where it is not installed)")
    p.add_argument("--saelens-sparse", action="store_true",
                   help="also time SAELens TopK with use_sparse_activations=True")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.d_in)
    have_saelens = not args.no_saelens
    if have_saelens:
        try:
            import sae_lens

            print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"load average {os.getloadavg()[0]:.1f}")
        except ImportError as err:
            print(f"sae-lens not importable ({err}): timing ours and the ceiling only")
            have_saelens = False
    rows = []
    for d_sae in args.widths:
        ceiling = matmul_gflops(args.batch_size, args.d_in, d_sae, max(args.repeats, 3))
        for arch in args.archs:
            contenders = {"ours": ours(arch, args.d_in, d_sae, args.k, args.batch_size)}
            if have_saelens:
                contenders["saelens"] = saelens(arch, args.d_in, d_sae, args.k, args.batch_size)
                if arch == "topk" and args.saelens_sparse:
                    contenders["saelens-sparse"] = saelens(arch, args.d_in, d_sae, args.k, args.batch_size, True)
            for name, fn in list(contenders.items()):
                try:
                    for _ in range(args.warmup):
                        fn(x)
                except Exception as err:  # e.g. SAELens's sparse TopK backward on CPU
                    print(f"F={d_sae:5d} {arch:8s} {name} failed: {type(err).__name__}: {str(err)[:120]}")
                    del contenders[name]
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeats):  # interleaved, so load changes hit every contender alike
                for name, fn in contenders.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            tok = {name: args.batch_size / t for name, t in med.items()}
            ceiling_tok = ceiling * 1e9 / (10 * args.batch_size * args.d_in * d_sae) * args.batch_size
            row = {"F": d_sae, "arch": arch, "gflops": ceiling, "ceiling_tok_s": ceiling_tok, **{
                f"{n}_tok_s": v for n, v in tok.items()}}
            if "saelens" in tok:
                row["speedup"] = tok["ours"] / tok["saelens"]
            rows.append(row)
            extra = "".join(f"  {n} {v:10,.0f}" for n, v in tok.items() if n != "ours")
            speed = f"  speed-up x{row['speedup']:.2f}" if "speedup" in row else ""
            print(f"F={d_sae:5d} {arch:8s} ours {tok['ours']:10,.0f} tok/s{extra}{speed}  "
                  f"(dense 10BdF ceiling {ceiling_tok:10,.0f} tok/s at {ceiling:.1f} GFLOP/s)", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("\n| F | architecture | ours (tok/s) | SAELens (tok/s) | speed-up | dense ceiling (tok/s) | matmul GFLOP/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sl = f"{r['saelens_tok_s']:,.0f}" if "saelens_tok_s" in r else "–"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "–"
        print(f"| {r['F']} | {r['arch']} | {r['ours_tok_s']:,.0f} | {sl} | {sp} | {r['ceiling_tok_s']:,.0f} | "
              f"{r['gflops']:.1f} |")


if __name__ == "__main__":
    main()
