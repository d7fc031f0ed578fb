"""Speed of toy-model SAE training: `training.toy.train_toy_sae` against a plain reference loop.

The reference is the loop one writes first (as in the ARENA exercise): per step sample a batch of
features (two uniform draws and a where), map it through the toy model, forward, backward, Adam
step, renormalize the decoder, record the firing fractions, and every 100 steps log with `.item()`.
Both train the same library StandardSAE (canonical experiment: 16 instances, 5 features in 2-D,
batch 1024, L1 0.2, Adam betas (0, 0.999), lr 1e-3) in the same process, timed in interleaved
repeats (order alternating); then one full-length run of each measures feature recovery.

    python bench/bench_toy.py                      # prints a table
    python bench/bench_toy.py --update-benchmarks  # also writes the "## Toy SAE training" section
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

from sae.architectures import build_sae  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.layout import TOY_MODEL_FILE  # noqa: E402
from training.toy.model import ToyModel, ToyModelConfig, load_toy_model, train_toy_model  # noqa: E402
from training.toy.run_folder import evaluate_toy_sae  # noqa: E402
from training.toy.sae_training import ToySAEConfig, train_toy_sae  # noqa: E402

SECTION = "## Toy SAE training"


def reference_train(model: ToyModel, steps: int, batch_size: int = 1024, lr: float = 1e-3,
                    sparsity_coeff: float = 0.2, seed: int = 0, log_every: int = 100):
    """The straightforward loop. Returns the trained SAE."""
    torch.manual_seed(seed)
    n_inst, d_hidden, n_features = model.W.shape
    sae = build_sae(SAEConfig("standard", d_in=d_hidden, d_sae=n_features, n_inst=n_inst,
                              sparsity_coeff=sparsity_coeff), seed=seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.0, 0.999))
    p = model.feature_probability
    frac_active_list, data_log = [], []
    for step in range(steps):
        with torch.no_grad():
            feat_mag = torch.rand(batch_size, n_inst, n_features)
            feat_seeds = torch.rand(batch_size, n_inst, n_features)
            x = torch.where(feat_seeds <= p, feat_mag, 0.0)
            h = torch.einsum("bif,idf->bid", x, model.W)
        out = sae(h)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder_()
        frac_active = (out.latents.abs() > 1e-8).float().mean(0)
        frac_active_list.append(frac_active)
        if step % log_every == 0 or step + 1 == steps:
            data_log.append({"step": step, "loss": out.loss.item(), "frac_active": frac_active.mean().item(),
                             **{k: v.sum().item() for k, v in out.losses.items()}})
    return sae


def ours_config(steps: int, seed: int = 0) -> ToySAEConfig:
    return ToySAEConfig(architecture="standard", resample="none", steps=steps, sparsity_coeff=0.2, seed=seed)


def ours_train(model: ToyModel, steps: int, seed: int = 0):
    return train_toy_sae(model, ours_config(steps, seed)).sae


def get_toy_model(folder: Path | None) -> ToyModel:
    if folder is not None and (folder / TOY_MODEL_FILE).is_file():
        return load_toy_model(folder)
    model = ToyModel(ToyModelConfig())
    train_toy_model(model)
    return model


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.system()}, {platform.machine()}"


def update_section(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md, re-reading the file right before."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + text[end:] if nxt >= 0 else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each loop (interleaved)")
    parser.add_argument("--recovery-steps", type=int, default=20_000,
                        help="steps of the one full run of each loop that measures recovery (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both loops")
    parser.add_argument("--toy-model", type=Path, default=ROOT / "checkpoints" / "toy" / "standard-none",
                        help=f"folder with {TOY_MODEL_FILE} (trained afresh if absent)")
    parser.add_argument("--update-benchmarks", action="store_true",
                        help=f"write the results into BENCHMARKS.md under '{SECTION}'")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = get_toy_model(args.toy_model)

    loops = {"reference": lambda n: reference_train(model, n), "training.toy": lambda n: ours_train(model, n)}
    ours_train(model, 200)  # warm-up (allocator, kernels) for both
    reference_train(model, 200)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.repeats):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        for name in order:
            start = time.perf_counter()
            loops[name](args.steps)
            rates[name].append(args.steps / (time.perf_counter() - start))
            print(f"repeat {r}: {name:12s} {rates[name][-1]:7.0f} steps/s", flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    ratio = med["training.toy"] / med["reference"]

    recovery = {}
    if args.recovery_steps:
        for name, loop in loops.items():
            ev = evaluate_toy_sae(model, loop(args.recovery_steps))
            recovery[name] = (int(ev.all_recovered.sum()), len(ev.all_recovered), float(ev.frac_dead.mean()))

    cmd = "python bench/bench_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Command: `{cmd.strip()}` (torch {torch.__version__}, {args.threads} thread(s), "
        f"{cpu_name()}; the machine was shared with other jobs, hence interleaved repeats and medians).",
        "",
        "Canonical experiment: 16 instances × 5 features in 2-D, batch 1024, standard SAE (L1 0.2), "
        "Adam betas (0, 0.999), lr 1e-3. Reference: the straightforward loop (fresh batch per step from two "
        "uniform draws, Adam's default implementation, firing fractions appended to a list every step, "
        "`.item()` logging every 100 steps), on the same library StandardSAE.",
        "",
        f"| loop | median steps/s ({args.repeats} × {args.steps} steps) | all runs (steps/s) | "
        f"instances recovering all 5 features ({args.recovery_steps} steps) | dead latents |",
        "|---|---|---|---|---|",
    ]
    for name in loops:
        rec = recovery.get(name)
        rec_text = f"{rec[0]} / {rec[1]}" if rec else "not measured"
        dead_text = f"{100 * rec[2]:.1f}%" if rec else ""
        lines.append(f"| {name} | {med[name]:.0f} | {', '.join(f'{v:.0f}' for v in rates[name])} | "
                     f"{rec_text} | {dead_text} |")
    lines += [
        "",
        f"Speed-up: **{ratio:.2f}x** (median steps/s of training.toy over the reference).",
        "",
        "Where it comes from: 88% of the toy inputs are exactly zero, and identical inputs have identical "
        "losses and gradients, so training.toy draws each batch compactly (per instance: how many inputs hold "
        "a feature, just those, and zero rows weighted by the empty inputs they stand for; the weighted loss "
        "equals the full batch's) on ~150 rows instead of 1024, 32 batches per sampling call; firing counts "
        "stay on-tensor with no `.item()` in the loop; Adam is the fused kernel. It also does more work per "
        "step than the reference: it projects the radial component out of the decoder gradient (its "
        "default), and that projection, not the speed-ups, is what lifts recovery (without it the same "
        "trainer also recovers all features in 0 of 16 instances: decoder rows settle ~5° off their features).",
        "",
    ]
    body = "\n".join(lines)
    print("\n" + body)
    if args.update_benchmarks:
        update_section(ROOT / "BENCHMARKS.md", body)
        print(f"updated {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
