"""Which Adam state should a resampled latent get? Size of its first updates against a live latent's.

A dead latent received no gradient, so Adam's second-moment estimate of its parameters decayed
towards zero. After resampling, the usual recipe zeroes both moments (`zero`); the alternative
(`typical`) zeroes the first moment and gives the second the mean of the parameter's other entries.
For each policy this trains one SAE (language-model setting: standard SAE, Adam betas (0.9, 0.999),
synthetic sparse data; toy setting: the canonical toy experiment, Adam betas (0, 0.999)) with a
quarter of its latents held dead for the first half of the run, resamples them (advanced), and
records over the next steps the encoder update norm of resampled latents over that of live latents
(same process, same seed, so the runs differ only in the policy).

    python bench/bench_resample_policy.py            # prints a table
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.architectures import build_sae
from sae.config import SAEConfig
from training.optim import constrained_step, make_adam
from training.resampling import ADAM_POLICIES, resample_dead_latents
from training.toy.model import ToyModel, ToyModelConfig


def lm_like_batches(d_in: int, n_dirs: int, batch: int, gen: torch.Generator):
    """Sparse non-negative combinations of `n_dirs` fixed random directions (a crude residual stream)."""
    dirs = torch.randn(n_dirs, d_in, generator=gen)
    while True:
        coef = torch.rand(batch, n_dirs, generator=gen) * (torch.rand(batch, n_dirs, generator=gen) < 0.05)
        yield coef @ dirs, None


def toy_batches(batch: int, gen: torch.Generator):
    model = ToyModel(ToyModelConfig(n_inst=8, feature_probability=[0.025]))
    angles = torch.arange(5) * 2 * math.pi / 5 + torch.rand(8, 1, generator=gen)
    with torch.no_grad():
        model.W.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 1.15)
    while True:
        cb = model.sample_hidden_compact(1, batch, gen)
        yield cb.h[0], cb.weight[0]


def run(setting: str, policy: str, steps: int, after: int, seed: int = 0) -> list[float]:
    """Per step after resampling: mean encoder-update norm of resampled latents / of live latents."""
    gen = torch.Generator().manual_seed(seed)
    if setting == "lm":
        cfg = SAEConfig(architecture="standard", d_in=32, d_sae=128, sparsity_coeff=2.0 / 32)
        data, betas, lr, batch = lm_like_batches(32, 96, 256, gen), (0.9, 0.999), 4e-4, 256
    else:
        cfg = SAEConfig(architecture="standard", d_in=2, d_sae=5, n_inst=8, sparsity_coeff=0.2)
        data, betas, lr, batch = toy_batches(1024, gen), (0.0, 0.999), 1e-3, 1024
    sae = build_sae(cfg, seed=seed)
    opt = make_adam(sae.parameters(), lr, betas)
    inst = () if cfg.n_inst is None else (cfg.n_inst,)
    held = torch.zeros(*inst, cfg.d_sae, dtype=torch.bool)
    held[..., : max(1, cfg.d_sae // 4)] = True
    ratios = []
    for step in range(steps + after):
        x, weight = next(data)
        if step < steps:  # hold the latents dead: no gradient reaches them
            with torch.no_grad():
                sae.b_enc.copy_(torch.where(held, torch.full_like(sae.b_enc, -100.0), sae.b_enc))
        if step == steps:
            resample_dead_latents(sae, held, "advanced", x=x, weight=weight, scale=0.2 if setting == "lm" else 1.0,
                                  gen=gen, opt=opt, adam_policy=policy)  # type: ignore[arg-type]
        before = sae.W_enc.detach().clone()
        out = sae(x, weight=weight, batch_size=batch)
        out.loss.backward()
        constrained_step(sae, opt)
        opt.zero_grad(set_to_none=True)
        if step >= steps:
            delta = (sae.W_enc.detach() - before).norm(dim=-2)  # [*inst, d_sae]
            ratios.append(float(delta[held].mean() / delta[~held].mean().clamp_min(1e-30)))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="steps before resampling")
    parser.add_argument("--after", type=int, default=20, help="steps recorded after resampling")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| setting | Adam policy | update ratio, step 1 | max over first 5 steps | mean over steps 1-20 |")
    print("|---|---|---:|---:|---:|")
    for setting in ("lm", "toy"):
        for policy in ADAM_POLICIES:
            rs = [run(setting, policy, args.steps, args.after, seed) for seed in range(args.seeds)]
            first = [r[0] for r in rs]
            max5 = [max(r[:5]) for r in rs]
            mean = [sum(r) / len(r) for r in rs]
            fmt = lambda v: f"{min(v):.1f}-{max(v):.1f}"  # noqa: E731
            print(f"| {setting} | {policy} | {fmt(first)} | {fmt(max5)} | {fmt(mean)} |")


if __name__ == "__main__":
    main()
