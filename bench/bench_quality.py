"""SAE quality at the same budget: our trainer against SAELens's `SAETrainer`, scored by one evaluator.

Both trainers get the same harvested activations (the training stories of `training.stories.split_stories`,
residual at `blocks.<layer>.hook_resid_post`), the same input normalisation (x * s with E||x s||^2 = d_in),
the same batches in the same order (a fresh `ActivationBuffer` with the same seed per run), steps, batch
size, Adam settings, LR schedule (linear warm-up, constant, linear decay over the last fraction) and
sparsity-coefficient warm-up. Every result is written as a SAELens folder with the scale folded in,
loaded back with `sae_lens.SAE.load_from_disk`, and scored on held-out stories by the one evaluator
below: variance explained, L0, dead fraction (never fired on the eval tokens), CE loss score and
KL(clean || spliced).

Sparsity coefficients are given in SAELens's units (its reconstruction loss sums over d_in, ours
averages, so our coefficient is l1 / d_in). A small sweep of them (`--l1 1 2 4`) lets the table compare
the two trainers at matched L0: each of our standard runs is set against SAELens's variance explained
and CE loss score interpolated (linear in log L0) at our L0.

Run it in the benchmark venv (`make interop` builds it: sae-lens + the pinned torch CPU build):
    .venv-bench/bin/python bench/bench_quality.py --model checkpoints/tinystories-mini --steps 1000 \
        --batch-size 2048 --widths 1000 d --l1 1 2 4
Options of our trainer go in with `--ours key=value ...` (TrainerConfig fields), SAELens's with
`--saelens key=value ...` (its training-SAE config fields, plus b_dec=mean|zeros); `--ours-variant
NAME:key=value,...` adds extra runs of ours (ablations).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's fit() draws its own bar; ours is off below

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our sae/ and training/ from the repo

from sae.base_model import BaseModel, load_base_model, logits_with_replacement, residual_at
from sae.metrics import ReconstructionStats, ce_loss_score, kl_div, next_token_ce
from sae.splice import next_token_mask
from training.activations import ActivationBuffer
from training.evaluate import EvalConfig, EvalSet, eval_set
from training.stories import default_stories_path, load_stories, split_stories
from training.streaming import harvest_chunk
from training.trainer import MultiSAETrainer
from training.trainer_config import TrainerConfig, activation_scale, build_specs, parse_width

DEFAULT_OUT = Path("runs/bench-quality")
RESULTS_FILE = "results.json"


class Data(NamedTuple):
    acts: Tensor
    """[n, d_in] raw training activations."""
    scale: float
    mean: Tensor
    """[d_in] raw mean activation."""
    variance: float
    """E||x - mean||^2 (raw units)."""


@dataclasses.dataclass
class Budget:
    steps: int
    batch_size: int
    lr: float
    lr_warmup_steps: int
    lr_decay_fraction: float
    sparsity_warmup_steps: int
    dead_window: int
    k: int
    seed: int


@dataclasses.dataclass
class Run:
    library: str
    """ours or saelens."""
    arch: str
    """standard or topk."""
    d_sae: int
    l1: float | None
    """Sparsity coefficient in SAELens units (standard only)."""
    options: dict[str, Any]
    label: str


# ------------------------------------------------------------------------------------------- data


def training_vectors(bm: BaseModel, stories: list[str], layer: int, chunk: int = 8) -> Tensor:
    """Float[Tensor, "n_tokens d_model"]: what the trainer's story stream harvests (one story per row, from
    position 0, as the evaluation reads them), not packed windows (stories starting mid-context)."""
    return torch.cat([harvest_chunk(bm, stories[i: i + chunk], layer, bm.context_size).cpu()
                      for i in range(0, len(stories), chunk)])


def load_data(bm: BaseModel, stories: list[str], layer: int, cache_dir: Path, key: str) -> Data:
    """Harvested training activations (cached under `cache_dir`, keyed by model, data and layer)."""
    digest = hashlib.sha1(f"{key}|one story per row".encode()).hexdigest()[:12]
    path = cache_dir / f"acts-{digest}.safetensors"
    if path.is_file():
        acts = load_file(str(path))["acts"]
    else:
        acts = training_vectors(bm, stories, layer)
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({"acts": acts.contiguous()}, str(path))
    mean = acts.mean(0)
    variance = float((acts[:: max(1, len(acts) // 100_000)] - mean).pow(2).sum(-1).mean())
    return Data(acts, activation_scale(acts), mean, variance)


# ------------------------------------------------------------------------------------------- trainers


def train_ours(run: Run, data: Data, budget: Budget, folder: Path) -> float:
    """Our MultiSAETrainer on one SAE; returns seconds per step. Writes `folder`."""
    d_in = data.acts.shape[1]
    options = dict(run.options)  # our initial b_dec is the TrainerConfig field b_dec_init
    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    unknown = set(options) - fields
    if unknown:
        raise SystemExit(f"unknown TrainerConfig fields for ours: {sorted(unknown)}")
    cfg = TrainerConfig(
        widths=[str(run.d_sae)], architectures=[run.arch], steps=budget.steps, batch_size=budget.batch_size,
        lr=budget.lr, lr_warmup_steps=budget.lr_warmup_steps, lr_decay_fraction=budget.lr_decay_fraction,
        sparsity_coeff=None if run.l1 is None else run.l1 / d_in, sparsity_warmup_steps=budget.sparsity_warmup_steps,
        k=budget.k, dead_window=budget.dead_window, seed=budget.seed, checkpoint_every=0, progress=False,
        log_every=max(1, budget.steps // 20), **options,
    )
    specs = build_specs(cfg, d_in, lambda _run, _f: folder, {"model_name": "bench", "hook_name": "bench"})
    buffer = ActivationBuffer(data.acts, budget.batch_size, seed=budget.seed)
    trainer = MultiSAETrainer(cfg, specs, buffer, scale=data.scale, data_mean=data.mean, data_variance=data.variance)
    t0 = time.perf_counter()
    trainer.train(overwrite=True)
    return (time.perf_counter() - t0) / budget.steps


def _saelens_sae(run: Run, d_in: int, budget: Budget):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    options = {k: v for k, v in run.options.items() if k != "b_dec"}
    if run.arch == "standard":
        cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=run.d_sae, l1_coefficient=float(run.l1 or 0.0),
                                        l1_warm_up_steps=budget.sparsity_warmup_steps, **options)
        return StandardTrainingSAE(cfg)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=run.d_sae, k=budget.k, **options)
    return TopKTrainingSAE(cfg)


@torch.no_grad()
def _save_saelens(sae, scale: float, folder: Path) -> None:
    """Inference folder reading raw activations: decoder norms folded (TopK), then the input scale."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        sae.fold_W_dec_norm()  # unit decoder rows: the rescaling is now the identity
        sae.cfg.rescale_acts_by_decoder_norm = False
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)
    sae.save_inference_model(folder)


def train_saelens(run: Run, data: Data, budget: Budget, folder: Path) -> float:
    """SAELens's SAETrainer.fit on the same batches; returns seconds per step. Writes `folder`."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_in = data.acts.shape[1]
    torch.manual_seed(budget.seed)
    sae = _saelens_sae(run, d_in, budget)
    if run.options.get("b_dec", "zeros") == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(data.mean * data.scale)
    decay = int(budget.steps * budget.lr_decay_fraction)
    cfg = SAETrainerConfig(
        total_training_samples=budget.steps * budget.batch_size, train_batch_size_samples=budget.batch_size,
        lr=budget.lr, lr_end=budget.lr, lr_scheduler_name="constant", lr_warm_up_steps=budget.lr_warmup_steps,
        lr_decay_steps=decay, dead_feature_window=budget.dead_window, feature_sampling_window=budget.steps,
        logger=LoggingConfig(log_to_wandb=False),
    )
    buffer = ActivationBuffer(data.acts, budget.batch_size, seed=budget.seed)
    batches = (buffer.next_batch() * data.scale for _ in iter(int, 1))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    t0 = time.perf_counter()
    trainer.fit()
    per_step = (time.perf_counter() - t0) / budget.steps
    _save_saelens(sae, data.scale, folder)
    return per_step


# ------------------------------------------------------------------------------------------- evaluator


@torch.no_grad()
def evaluate(bm: BaseModel, layer: int, folders: list[Path], es: EvalSet, batch: int = 8) -> list[dict[str, float]]:
    """Each folder loaded with SAELens; reconstruction metrics and spliced CE / KL on the eval stories."""
    from sae_lens import SAE

    saes = [SAE.load_from_disk(str(f), device="cpu").eval() for f in folders]
    stats = [ReconstructionStats() for _ in saes]
    ce_sae = [0.0] * len(saes)
    kl = [0.0] * len(saes)
    ce_clean = ce_zero = 0.0
    n_ce = 0
    ids_all, mask_all = es.tokens
    for b0 in range(0, len(ids_all), batch):
        mask = mask_all[b0: b0 + batch]
        width = int(mask.sum(1).max())
        ids, mask = ids_all[b0: b0 + batch, :width], mask[:, :width]
        resid = residual_at(bm, ids, mask, layer).float()
        keep = mask.bool()
        ntm = next_token_mask(ids, mask).float()
        n_ce += int(ntm.sum())
        clean = logits_with_replacement(bm, ids, mask, layer, None).float()
        ce_clean += float((next_token_ce(clean, ids) * ntm).sum())
        zero = logits_with_replacement(bm, ids, mask, layer, torch.zeros_like(resid)).float()
        ce_zero += float((next_token_ce(zero, ids) * ntm).sum())
        for i, sae in enumerate(saes):
            lat = sae.encode(resid)
            rec = sae.decode(lat)
            stats[i].update(resid[keep], rec[keep], lat[keep])
            spliced = logits_with_replacement(bm, ids, mask, layer, rec).float()
            ce_sae[i] += float((next_token_ce(spliced, ids) * ntm).sum())
            kl[i] += float((kl_div(clean[:, :-1], spliced[:, :-1]) * ntm).sum())
    out = []
    for i in range(len(saes)):
        s = stats[i].compute()
        c0, c1, cz = ce_clean / n_ce, ce_sae[i] / n_ce, ce_zero / n_ce
        out.append({"variance_explained": float(s["variance_explained"]), "l0": float(s["l0"]),
                    "frac_dead": float(s["frac_dead"]), "ce_loss_score": ce_loss_score(c0, c1, cz),
                    "kl_div": kl[i] / n_ce, "ce_clean": c0, "ce_with_sae": c1, "n_tokens": stats[i].n_tokens})
    return out


# ------------------------------------------------------------------------------------------- tables


def interpolate_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """Linear in log L0 through `(l0, value)` points; None outside their range."""
    pts = sorted(points)
    for (a, va), (b, vb) in itertools.pairwise(pts):
        if a <= l0 <= b and b > a:
            t = (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a))
            return va + t * (vb - va)
    return None


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| F | architecture | trainer | L1 | variance explained | L0 | dead | CE loss score | KL | "
             "s/step | SAELens EV / CE score at this L0 |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        peers = [(p["l0"], p) for p in rows if p["library"] == "saelens" and p["arch"] == r["arch"]
                 and p["d_sae"] == r["d_sae"] and p["options"] == {} and p["l0"] > 0]
        matched = "–"
        if r["library"] == "ours" and r["arch"] == "standard" and len(peers) > 1:
            ev = interpolate_at_l0([(a, p["variance_explained"]) for a, p in peers], r["l0"])
            ce = interpolate_at_l0([(a, p["ce_loss_score"]) for a, p in peers], r["l0"])
            matched = "outside the sweep" if ev is None else f"{ev:.4f} / {ce:.4f}"
        l1 = "–" if r["l1"] is None else f"{r['l1']:g}"
        lines.append(f"| {r['d_sae']} | {r['arch']} | {r['label']} | {l1} | {r['variance_explained']:.4f} | "
                     f"{r['l0']:.1f} | {r['frac_dead']:.3f} | {r['ce_loss_score']:.4f} | {r['kl_div']:.4f} | "
                     f"{r['s_per_step']:.3f} | {matched} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- cli


def _parse_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"option {item!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_runs(args: argparse.Namespace, d_in: int) -> list[Run]:
    ours_opts, theirs_opts = _parse_options(args.ours), _parse_options(args.saelens)
    runs: list[Run] = []
    for d_sae in [parse_width(w, d_in) for w in args.widths]:
        for arch in args.archs:
            l1s: list[float | None] = list(args.l1) if arch == "standard" else [None]
            for l1 in l1s:
                tag = f"{arch}-F{d_sae}" + (f"-l1={l1:g}" if l1 is not None else "")
                if "saelens" in args.libraries:
                    runs.append(Run("saelens", arch, d_sae, l1, dict(theirs_opts), f"saelens-{tag}"))
                if "ours" in args.libraries:
                    runs.append(Run("ours", arch, d_sae, l1, dict(ours_opts), f"ours-{tag}"))
                for library, variants, base in (("ours", args.ours_variant, ours_opts),
                                                ("saelens", args.saelens_variant, theirs_opts)):
                    for variant in variants:
                        name, _, opts = variant.partition(":")
                        if name.split("@")[-1] not in (arch, "any"):
                            continue
                        extra = _parse_options([o for o in opts.split(",") if o])
                        runs.append(Run(library, arch, d_sae, l1, {**base, **extra},
                                        f"{library}-{name.split('@')[0]}-{tag}"))
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="checkpoints/tinystories-mini", help="base model folder (or Hub id)")
    p.add_argument("--data", default=None, help="stories file (default: the local TinyStories sample)")
    p.add_argument("--layer", type=int, default=1, help="hooked block: blocks.<layer>.hook_resid_post")
    p.add_argument("--widths", nargs="+", default=["1000", "d"], help="latent counts F (d = d_model)")
    p.add_argument("--archs", nargs="+", default=["standard", "topk"], choices=["standard", "topk"])
    p.add_argument("--libraries", nargs="*", default=["ours", "saelens"], choices=["ours", "saelens"],
                   help="baseline runs (none: only the --ours-variant / --saelens-variant runs)")
    p.add_argument("--l1", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                   help="standard: L1 coefficients in SAELens units (ours uses l1 / d_in)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--lr-warmup-steps", type=int, default=500)
    p.add_argument("--lr-decay-fraction", type=float, default=0.2)
    p.add_argument("--sparsity-warmup-steps", type=int, default=None,
                   help="L1 warm-up (default: steps / 2.5, i.e. 1000 of 2500 as in the trainer)")
    p.add_argument("--dead-window", type=int, default=500, help="steps without firing = dead (both trainers)")
    p.add_argument("--k", type=int, default=32, help="TopK latents per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=10_000, help="held-out tokens to score on")
    p.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="TrainerConfig fields for ours")
    p.add_argument("--saelens", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SAELens training-SAE config fields (and b_dec=mean|zeros)")
    p.add_argument("--ours-variant", nargs="*", default=[], metavar="NAME@ARCH:KEY=VALUE,...",
                   help="extra runs of ours with these options (ARCH: standard, topk or any)")
    p.add_argument("--saelens-variant", nargs="*", default=[], metavar="NAME@ARCH:KEY=VALUE,...",
                   help="extra runs of SAELens with these options")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="SAE folders, activation cache, results")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--tag", default="", help="results file suffix (results<tag>.json)")
    p.add_argument("--table", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="train nothing: print one table of these results files (runs split over processes)")
    args = p.parse_args(argv)
    if args.table:
        rows = [row for f in args.table for row in json.loads(f.read_text())["rows"]]
        print(table(sorted(rows, key=lambda r: (-r["d_sae"], r["arch"], r["l1"] or 0, r["library"], r["label"]))))
        return
    torch.set_num_threads(args.threads)
    import sae_lens

    bm = load_base_model(args.model)
    data_path = args.data or str(default_stories_path())
    split = split_stories(load_stories(data_path))
    key = f"{Path(args.model).resolve()}|{Path(data_path).resolve()}|{args.layer}|{bm.context_size}"
    data = load_data(bm, split.train, args.layer, args.out, key)
    es = eval_set(bm, split.val, bm.context_size, EvalConfig(max_tokens=args.eval_tokens))
    budget = Budget(args.steps, args.batch_size, args.lr, args.lr_warmup_steps, args.lr_decay_fraction,
                    args.sparsity_warmup_steps if args.sparsity_warmup_steps is not None else int(args.steps / 2.5),
                    args.dead_window, args.k, args.seed)
    runs = build_runs(args, bm.d_model)
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{len(data.acts):,} training vectors (d_in {bm.d_model}), {es.n_tokens:,} eval tokens; "
          f"{len(runs)} runs of {budget.steps} steps x {budget.batch_size}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    for run in runs:
        folder = args.out / "saes" / run.label
        train = train_ours if run.library == "ours" else train_saelens
        per_step = train(run, data, budget, folder)
        (metrics,) = evaluate(bm, args.layer, [folder], es)
        row = {**dataclasses.asdict(run), **metrics, "s_per_step": per_step}
        rows.append(row)
        print(f"{run.label:40s} EV {metrics['variance_explained']:.4f}  L0 {metrics['l0']:6.1f}  "
              f"dead {metrics['frac_dead']:.3f}  CE score {metrics['ce_loss_score']:.4f}  "
              f"KL {metrics['kl_div']:.4f}  {per_step:.3f} s/step", flush=True)
        (args.out / f"results{args.tag}.json").write_text(json.dumps(
            {"budget": dataclasses.asdict(budget), "model": args.model, "eval_tokens": es.n_tokens,
             "rows": rows}, indent=1) + "\n")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
