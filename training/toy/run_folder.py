"""A toy run's folder: evaluation, metrics.json, training log, pictures; and re-evaluating a shipped folder.

```
<out>/<architecture>-<resampling>/
    toy_model.safetensors toy_model.json   the toy model (training.toy.model)
    inst_00/ ... inst_15/                  one SAELens folder per instance (sae.checkpoint.load_sae reads it)
    metrics.json training_config.json      evaluation summary + per instance; the run's full config
    training_log.csv features.png training.gif
```
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae import layout
from sae.architectures import SparseAutoencoder, build_sae
from sae.checkpoint import (
    CheckpointError,
    load_sae,
    read_json,
    replace_file_atomically,
    save_sae,
    write_folder_atomically,
)
from sae.metrics import METRICS_VERSION, RECOVERY_THRESHOLD, ReconstructionStats, all_recovered, feature_recovery
from training.toy.model import ToyModel, load_toy_model, save_toy_model
from training.toy.sae_training import ToySAEConfig, ToySAERun, ToyTrainLog


class ToyEval(NamedTuple):
    best_cos: Tensor
    """Best cosine of each true feature with any decoder row `[inst, n_features]`."""
    all_recovered: Tensor
    """Every feature recovered at > RECOVERY_THRESHOLD `[inst]`."""
    frac_dead: Tensor
    """Latents that fired on none of the eval inputs `[inst]`."""
    fire_counts: Tensor
    """Inputs each latent fired on `[inst, d_sae]`."""
    recon: dict[str, Any]
    """ReconstructionStats summary (lists over instances)."""
    n_eval: int
    """Eval inputs per instance."""


@torch.no_grad()
def evaluate_toy_sae(model: ToyModel, sae: SparseAutoencoder, n_batches: int = 16, batch_size: int = 1024,
                     seed: int = 999) -> ToyEval:
    """Feature recovery, dead latents and reconstruction on `n_batches * batch_size` fresh inputs."""
    gen = torch.Generator(device=model.W.device).manual_seed(seed)
    stats = ReconstructionStats()
    for h in model.sample_hidden(n_batches, batch_size, gen):
        out = sae(h)
        stats.update(h, out.reconstruction, out.latents)
    best = feature_recovery(model.feature_directions(), sae.W_dec.detach())
    counts = stats.fire_counts if stats.fire_counts is not None else torch.zeros(1)
    return ToyEval(best, all_recovered(best), (counts == 0).double().mean(-1), counts, stats.summary(),
                   stats.n_tokens)


def run_name(cfg: ToySAEConfig) -> str:
    return f"{cfg.architecture}-{cfg.resample}"


def run_metrics(cfg: ToySAEConfig, ev: ToyEval) -> dict[str, Any]:
    """The run folder's metrics.json: a summary plus one entry per instance."""
    n_inst = ev.best_cos.shape[0]
    per = []
    for i in range(n_inst):
        per.append({
            "inst": i,
            layout.BEST_COS: [round(c, 5) for c in ev.best_cos[i].tolist()],
            "n_recovered": int((ev.best_cos[i] > RECOVERY_THRESHOLD).sum()),
            "all_recovered": bool(ev.all_recovered[i]),
            "frac_dead": float(ev.frac_dead[i]),
            **{k: round(v[i], 6) for k, v in ev.recon.items() if isinstance(v, list)},
        })
    return {
        "run": run_name(cfg),
        "architecture": cfg.architecture,
        "resample": cfg.resample,
        "summary": {
            layout.N_ALL_RECOVERED: int(ev.all_recovered.sum()),
            "n_inst": n_inst,
            "mean_frac_dead": round(float(ev.frac_dead.mean()), 6),
            "mean_best_cos": round(float(ev.best_cos.mean()), 6),
            "features_recovered": int((ev.best_cos > RECOVERY_THRESHOLD).sum()),
            "features_total": ev.best_cos.numel(),
        },
        "recovery_threshold": RECOVERY_THRESHOLD,
        "eval_inputs_per_instance": ev.n_eval,
        layout.METRICS_VERSION_KEY: METRICS_VERSION,
        "instances": per,
    }


def write_log_csv(log: ToyTrainLog, path: str | Path) -> None:
    """One row per (log step, instance): step, inst, lr, loss terms, mean frac_active, frac_active per latent."""
    names = list(log.losses)
    n_lat = log.frac_active.shape[-1]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "inst", "lr", *names, "frac_active", *[f"frac_active_{j}" for j in range(n_lat)]])
        for r, step in enumerate(log.steps.tolist()):
            lr = f"{log.lr[r].item():.4g}"
            for i in range(log.frac_active.shape[1]):
                fa = log.frac_active[r, i]
                w.writerow([step, i, lr, *[f"{log.losses[n][r, i].item():.4g}" for n in names],
                            f"{fa.mean().item():.4g}", *[f"{v:.3g}" for v in fa.tolist()]])


def save_run(folder: str | Path, model: ToyModel, cfg: ToySAEConfig, run: ToySAERun, ev: ToyEval,
             pictures: bool = True) -> Path:
    """Write a run folder atomically: toy model, `inst_XX/` SAELens folders, metrics, log, pictures."""
    metrics = run_metrics(cfg, ev)
    config = {"toy_model": asdict(model.cfg), "sae": asdict(cfg), "resolved_sae_config": {
        k: v for k, v in asdict(run.sae.cfg).items() if k != "metadata"}, "torch_version": torch.__version__,
        "resample_steps": run.log.resample_steps}
    n_inst = run.sae.cfg.n_inst or 1
    log10_sparsity = (ev.fire_counts.double() / max(ev.n_eval, 1) + 1e-10).log10()

    def write(tmp: Path) -> None:
        save_toy_model(model, tmp)
        for i in range(n_inst):
            save_sae(run.sae, tmp / layout.toy_instance_dir(i), inst=i,
                     metadata={"model_name": layout.TOY_MODEL_NAME, "hook_name": layout.TOY_HOOK_NAME, "instance": i,
                               "run": run_name(cfg), "toy_model": f"../{layout.TOY_MODEL_FILE}",
                               "n_features": model.cfg.n_features,
                               "feature_probability": [round(v, 6) for v in model.feature_probability[i].tolist()]},
                     log10_sparsity=log10_sparsity[i], metrics=metrics["instances"][i], training_config=config)
        (tmp / layout.METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / layout.TRAINING_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        write_log_csv(run.log, tmp / layout.TOY_LOG_FILE)
        if pictures and model.cfg.d_hidden == 2:
            from training.toy.plots import animate_training, plot_features

            plot_features(model.feature_directions(), run.sae, ev.best_cos, tmp / layout.TOY_FEATURES_PLOT,
                          title=f"{run_name(cfg)}: {int(ev.all_recovered.sum())}/{n_inst} instances recover "
                                f"all {model.cfg.n_features} features")
            animate_training(model.feature_directions(), run.log, tmp / layout.TOY_TRAINING_GIF, title=run_name(cfg))

    return write_folder_atomically(folder, write)


def load_run_sae(folder: str | Path) -> SparseAutoencoder:
    """The batched SAE of a run folder, rebuilt from its `inst_XX/` SAELens folders."""
    folder = Path(folder)
    inst_dirs = sorted(folder.glob(f"{layout.TOY_INSTANCE_PREFIX}*"))
    if not inst_dirs:
        raise CheckpointError(f"{folder} holds no {layout.TOY_INSTANCE_PREFIX}XX instance folders")
    singles = [load_sae(d) for d in inst_dirs]
    batched = build_sae(singles[0].cfg.replace(n_inst=len(singles)), seed=0)  # a shell: every weight is overwritten
    with torch.no_grad():
        for i, (d, single) in enumerate(zip(inst_dirs, singles)):
            if single.cfg.replace(metadata={}) != singles[0].cfg.replace(metadata={}):
                raise CheckpointError(f"{d}: its cfg.json differs from {inst_dirs[0]}'s")
            for name, p in batched.named_parameters():
                p[i].copy_(dict(single.named_parameters())[name])
    return batched.eval()


def reevaluate_run(folder: str | Path) -> dict[str, Any]:
    """Recompute a written run's metrics with today's metric definitions (no training); rewrite its metrics.json
    files (the run's and each instance's, each atomically). Returns the new metrics."""
    folder = Path(folder)
    config = read_json(folder / layout.TRAINING_CONFIG_FILE)
    known = {f.name for f in fields(ToySAEConfig)}
    cfg = ToySAEConfig(**{k: v for k, v in config["sae"].items() if k in known})
    model = load_toy_model(folder)
    sae = load_run_sae(folder)
    ev = evaluate_toy_sae(model, sae, cfg.eval_batches, cfg.batch_size)
    metrics = run_metrics(cfg, ev)
    write = lambda obj: lambda p: p.write_text(json.dumps(obj, indent=2) + "\n")  # noqa: E731
    for i, inst in enumerate(metrics["instances"]):
        replace_file_atomically(folder / layout.toy_instance_dir(i), layout.METRICS_FILE, write(inst))
    replace_file_atomically(folder, layout.METRICS_FILE, write(metrics))
    return metrics
