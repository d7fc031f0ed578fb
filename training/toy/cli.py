"""`python -m training toy`: SAEs on toy models of superposition, every instance at once.

Trains the toy model once (or loads one with --toy-model), then one batched SAE per
architecture × resampling method, and writes `<out>/<architecture>-<resample>/` for each, plus a
results table (`<out>/README.md`) and a summary plot (`<out>/recovery.png`) over all run folders.

    python -m training toy --architecture standard --resample advanced
    python -m training toy --all                     # 4 architectures × {none, simple, advanced}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sae.architectures import ARCHITECTURES
from sae.dataclass_cli import add_dataclass_arguments
from sae.layout import METRICS_FILE, TOY_MODEL_FILE, TOY_SUMMARY_FILE, TOY_SUMMARY_PLOT
from sae.metrics import RECOVERY_THRESHOLD
from training.toy.model import ToyModel, ToyModelConfig, load_toy_model, train_toy_model
from training.toy.run_folder import evaluate_toy_sae, reevaluate_run, run_name, save_run
from training.toy.sae_training import RESAMPLE_METHODS, ToySAEConfig, train_toy_sae

_TOY_FIELDS = [f for f in ToyModelConfig.__dataclass_fields__]
_SAE_FIELDS = [f for f in ToySAEConfig.__dataclass_fields__ if f not in ("architecture", "resample")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training toy",
        description="Train SAEs on the hidden activations of toy models of superposition (all instances as one "
                    "batched SAE) and write checkpoint folders, metrics, pictures and a results table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        conflict_handler="resolve",
    )
    add_dataclass_arguments(parser, ToyModelConfig)
    add_dataclass_arguments(parser, ToySAEConfig)
    # Lists replace the config's single-valued fields: every combination is trained.
    parser.add_argument("--architecture", nargs="+", choices=ARCHITECTURES, default=["standard"],
                        help="SAE architectures to train")
    parser.add_argument("--resample", nargs="+", choices=RESAMPLE_METHODS, default=["advanced"],
                        help="dead-latent resampling methods to train with")
    parser.add_argument("--all", action="store_true",
                        help=f"train every architecture × resampling method ({len(ARCHITECTURES)} × "
                             f"{len(RESAMPLE_METHODS)} runs)")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/toy"), help="output folder")
    parser.add_argument("--toy-model", type=Path, default=None,
                        help=f"folder holding {TOY_MODEL_FILE} to reuse instead of training a toy model")
    parser.add_argument("--no-pictures", action="store_true", help="skip features.png and training.gif")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these tiny tensors)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--reevaluate", action="store_true",
                        help=f"train nothing: recompute {METRICS_FILE} of every run folder under --out with the "
                             "current metric definitions (after a metrics-version change); rewrite the table")
    return parser


def summary_rows(out: Path) -> list[dict]:
    """The summary of every run folder under `out` (read from its metrics.json), architecture order first."""
    rows = []
    for path in sorted(out.glob(f"*/{METRICS_FILE}")):
        metrics = json.loads(path.read_text())
        rows.append({"run": path.parent.name, "architecture": metrics["architecture"],
                     "resample": metrics["resample"], **metrics["summary"]})
    order = {a: i for i, a in enumerate(ARCHITECTURES)}
    method = {m: i for i, m in enumerate(RESAMPLE_METHODS)}
    return sorted(rows, key=lambda r: (order.get(r["architecture"], 99), method.get(r["resample"], 99)))


def write_summary(out: Path) -> list[dict]:
    """`<out>/README.md` (results table) and `<out>/recovery.png` from the run folders present."""
    rows = summary_rows(out)
    if not rows:
        return rows
    lines = [
        "# Toy-model SAE checkpoints",
        "",
        "Written by `python -m training toy --all`. Each folder `<architecture>-<resampling>/` holds the toy",
        "model (`toy_model.safetensors`, `toy_model.json`), one SAELens-format SAE folder per instance",
        "(`inst_00/` ... `inst_15/`, loadable with `sae.checkpoint.load_sae`), `metrics.json`, `features.png`,",
        "`training.gif` and `training_log.csv`.",
        "",
        f"A feature counts as recovered when some decoder row has cosine > {RECOVERY_THRESHOLD} with it; dead "
        "latents fired on none of the evaluation inputs.",
        "",
        "| architecture | resampling | instances recovering all features | features recovered | dead latents |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['resample']} | {r['n_all_recovered']} / {r['n_inst']} | "
                     f"{r['features_recovered']} / {r['features_total']} | {100 * r['mean_frac_dead']:.1f}% |")
    lines += ["", f"![recovery per architecture and resampling]({TOY_SUMMARY_PLOT})", ""]
    (out / TOY_SUMMARY_FILE).write_text("\n".join(lines))
    from training.toy.plots import plot_recovery_summary

    plot_recovery_summary(rows, out / TOY_SUMMARY_PLOT)
    return rows


def reevaluate(out: Path) -> None:
    """Recompute the metrics of every run folder under `out` (training.toy.run_folder.reevaluate_run)."""
    folders = sorted(p.parent for p in out.glob(f"*/{TOY_MODEL_FILE}"))
    if not folders:
        raise SystemExit(f"no toy run folders (holding {TOY_MODEL_FILE}) under {out}")
    for folder in tqdm(folders, desc="re-evaluating"):
        summary = reevaluate_run(folder)["summary"]
        print(f"{folder.name:20s} all features recovered in {summary['n_all_recovered']}/{summary['n_inst']} instances")
    write_summary(out)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    if args.reevaluate:
        reevaluate(args.out)
        return
    archs = list(ARCHITECTURES) if args.all else args.architecture
    methods = list(RESAMPLE_METHODS) if args.all else args.resample
    toy_cfg = ToyModelConfig(**{f: getattr(args, f) for f in _TOY_FIELDS})
    sae_kwargs = {f: getattr(args, f) for f in _SAE_FIELDS}

    if args.toy_model is not None:
        model = load_toy_model(args.toy_model).to(args.device)
        print(f"toy model loaded from {args.toy_model}")
    else:
        model = ToyModel(toy_cfg).to(args.device)
        with tqdm(total=toy_cfg.toy_steps, desc="toy model", disable=args.no_progress) as bar:
            train_toy_model(model, progress=lambda step: bar.update(step + 1 - bar.n))

    args.out.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        for method in methods:
            cfg = ToySAEConfig(architecture=arch, resample=method, **sae_kwargs)
            name = run_name(cfg)
            start = time.perf_counter()
            with tqdm(total=cfg.steps, desc=name, disable=args.no_progress) as bar:
                def progress(step: int, stats: dict, bar=bar) -> None:
                    bar.update(step + 1 - bar.n)
                    bar.set_postfix(loss=f"{stats['loss']:.4g}", active=f"{stats['frac_active']:.3f}")

                run = train_toy_sae(model, cfg, progress=progress)
            seconds = time.perf_counter() - start
            ev = evaluate_toy_sae(model, run.sae, cfg.eval_batches, cfg.batch_size)
            save_run(args.out / name, model, cfg, run, ev, pictures=not args.no_pictures)
            print(f"{name:20s} all features recovered in {int(ev.all_recovered.sum())}/{len(ev.all_recovered)} "
                  f"instances, dead latents {100 * float(ev.frac_dead.mean()):.1f}%, "
                  f"{cfg.steps / seconds:.0f} steps/s -> {args.out / name}")
    rows = write_summary(args.out)
    if rows:
        print(f"results table: {args.out / TOY_SUMMARY_FILE}")


if __name__ == "__main__":
    main()
