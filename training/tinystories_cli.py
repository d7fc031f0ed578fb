"""`python -m training tinystories`: SAEs of several widths on a TinyStories model's residual stream.

Pipeline (`training.lm_inputs` for the model and stories): stories stream in (`training.story_stream`;
every 10th story of a file, or a Hub dataset's validation split, is held out), chunk by chunk through the
model stopped after `blocks.<layer>.hook_resid_post` (`training.streaming`), into a fixed-capacity
shuffling buffer on the training device (`training.shuffle_buffer`), or from an activation cache
(`--activations DIR`, `training.activation_cache`) without the language model. Every (architecture,
width) trains on the same batches (`training.trainer`); rank 0 evaluates each final checkpoint on the
held-out stories (`training.evaluate`). Under `torchrun` every rank streams its own share of the stories
and gradients are all-reduced every step (`training.distributed`).

Checkpoints land in `<out>/<model>/blocks.<layer>.hook_resid_post/<run>/F<d_sae>`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae.checkpoint import sae_folder
from sae.dataclass_cli import parse_dataclass
from sae.layout import CE_LOSS_SCORE, WEIGHTS_FILE
from training.activation_cache import CacheActivations, CacheError
from training.distributed import DEFAULT_TIMEOUT_S, DistContext, RankFailure, init_from_env, launched_world_size
from training.evaluate import EvalConfig, eval_set, evaluate_folders
from training.lm_inputs import ModelDataConfig, TinyStoriesError, device_for, load_model, story_source, stream_inputs
from training.shuffle_buffer import ShufflingBuffer, first_fill_stats
from training.story_stream import validation_stories
from training.trainer import MultiSAETrainer
from training.trainer_config import TrainerConfig, build_specs
from training.trainer_state import common_resumable_step

DESCRIPTION = (
    "Train sparse autoencoders of several widths (and architectures) on the residual stream of a TinyStories "
    "language model, all on the same activation batches streamed through a shuffling buffer (or read from an "
    "activation cache), then evaluate them on held-out stories. Runs data-parallel under torchrun. "
    "Example: python -m training tinystories --preset tinystories-mini --steps 2000"
)
PRESET_EXTRA_RUNS = {"tinystories-33m": ["standard-nosparsity"]}
"""Runs a preset adds to the default --architectures (the seed experiment's plain reconstruction)."""


@dataclass
class RunConfig(ModelDataConfig):
    """Where the data and checkpoints are; TinyStoriesConfig adds the trainer and eval settings."""

    out: Path = Path("checkpoints")
    """Root of the checkpoints tree."""
    activations: Path | None = None
    """Train from this activation cache (python -m training cache-activations) instead of streaming stories
    through the model; the model is then loaded only for the evaluation."""
    buffer_size: int = 1 << 18
    """Activation vectors each process's shuffling buffer holds (x d_model x 4 bytes on --device)."""
    dist_timeout: float = DEFAULT_TIMEOUT_S
    """Under torchrun: seconds a rank waits for the others before the run ends with an error."""
    resume: bool = False
    """Continue from the newest intermediate checkpoint every SAE has (same data order)."""
    overwrite: bool = False
    """Delete intermediate checkpoints of an earlier run in the same folders instead of refusing."""
    evaluate: bool = True
    """Evaluate the final checkpoints (metrics.json, latent_stats.safetensors)."""
    eval_only: bool = False
    """Skip training: evaluate the existing final checkpoints of these widths and architectures."""


@dataclass
class TinyStoriesConfig(EvalConfig, TrainerConfig, RunConfig):
    """Every flag of `python -m training tinystories` (run settings, then trainer, then evaluation)."""


class RunResult(NamedTuple):
    folders: list[Path]
    metrics: list[dict[str, Any]]
    tokens_per_s: float
    """End-to-end throughput (harvest + training): global batch vectors per second (every SAE sees each)."""


class Inputs(NamedTuple):
    """The run's data: a model (None when training from a cache), the chunks, and what checkpoints record."""

    bm: Any
    metadata: dict[str, Any]
    d_model: int
    chunks: Any


def _inputs(cfg: TinyStoriesConfig, dist: DistContext, device: torch.device) -> Inputs:
    if cfg.activations is not None:
        try:
            reader = CacheActivations(cfg.activations, dist.rank, dist.world_size)
        except CacheError as err:
            raise TinyStoriesError(str(err)) from err
        meta = reader.manifest["metadata"]
        if cfg.layer != meta["hook_layer"] and cfg.layer != ModelDataConfig.layer:
            raise TinyStoriesError(f"--layer {cfg.layer} differs from the cache's {meta['hook_name']}")
        return Inputs(None, meta, int(reader.manifest["d_model"]), reader)
    bm, metadata, harvester = stream_inputs(cfg, device, dist.rank, dist.world_size, cfg.progress and dist.is_main)
    return Inputs(bm, metadata, bm.d_model, harvester)


def _trainer_config(cfg: TinyStoriesConfig) -> TrainerConfig:
    trainer_cfg = TrainerConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainerConfig)})
    if trainer_cfg.architectures == TrainerConfig().architectures:
        trainer_cfg.architectures = [*trainer_cfg.architectures, *PRESET_EXTRA_RUNS.get(cfg.preset, [])]
    return trainer_cfg


def _train(cfg: TinyStoriesConfig, trainer_cfg: TrainerConfig, specs, inputs: Inputs, dist: DistContext,
           device: torch.device) -> float:
    """Stream (or read the cache), train every SAE; returns the end-to-end tokens/s."""
    if cfg.batch_size % dist.world_size:
        raise TinyStoriesError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                               f"{dist.world_size} processes")
    local_batch = cfg.batch_size // dist.world_size
    try:
        buffer = ShufflingBuffer(inputs.chunks, cfg.buffer_size, local_batch, seed=cfg.seed + 1009 * dist.rank,
                                 device=device)
    except ValueError as err:
        raise TinyStoriesError(str(err)) from err
    t0 = time.perf_counter()
    resuming = cfg.resume and common_resumable_step([s.folder for s in specs]) > 0
    stats = None if resuming else first_fill_stats(buffer, dist.all_reduce_sum)  # resume restores them
    run_info = {
        "cli": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "metadata": inputs.metadata,
        "data_source": "activation cache" if cfg.activations else "story stream",
        "world_size": dist.world_size,
        "global_batch_size": cfg.batch_size,
        "per_rank_batch_size": local_batch,
        "buffer_size": cfg.buffer_size,
        **({"data_stats_tokens": stats.count} if stats else {}),
    }
    trainer = MultiSAETrainer(trainer_cfg, specs, buffer, scale=stats.scale if stats else 1.0, run_info=run_info,
                              data_mean=stats.mean if stats else None,
                              data_variance=stats.variance if stats else None, dist=dist, device=device)
    start_step = trainer.step
    trainer.train(resume=cfg.resume, overwrite=cfg.overwrite)
    steps_done = trainer_cfg.steps - max(start_step, 0)
    tokens_per_s = steps_done * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
    if dist.is_main:
        print(f"trained {len(specs)} SAEs on {dist.world_size} process(es): {tokens_per_s:,.0f} tokens/s end to end "
              f"(harvest + training; each token through every SAE)")
    return tokens_per_s


def _evaluate(cfg: TinyStoriesConfig, inputs: Inputs, folders: list[Path], device: torch.device) -> list[dict]:
    bm, meta = inputs.bm, inputs.metadata
    if bm is None:  # trained from a cache: the model is needed again only now
        model = cfg.model or meta.get("model_hub_id") or meta["model_path"]
        bm, _, _ = load_model(dataclasses.replace(cfg, model=model, layer=meta["hook_layer"]), device)
    source, dataset_path = story_source(cfg)
    val = validation_stories(source, limit=cfg.max_tokens)
    es = eval_set(bm, val, meta["context_size"], cfg, info={"dataset_path": dataset_path})
    metrics = evaluate_folders(bm, meta["hook_layer"], folders, es, cfg, progress=cfg.progress)
    for folder, m in zip(folders, metrics):
        ce = f" CE score {m[CE_LOSS_SCORE]:.3f}" if CE_LOSS_SCORE in m else ""
        print(f"{folder.relative_to(cfg.out)}: L0 {m['l0']:.1f}, variance explained {m['variance_explained']:.3f}, "
              f"dead {m['frac_dead']:.2f}{ce}")
    return metrics


def run(cfg: TinyStoriesConfig) -> RunResult:
    """Train (unless eval_only) and evaluate; returns the final folders and their metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device_for(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_from_env(device, cfg.dist_timeout)
    try:
        inputs = _inputs(cfg, dist, device)
        trainer_cfg = _trainer_config(cfg)
        hook = inputs.metadata["hook_name"]
        specs = build_specs(trainer_cfg, inputs.d_model,
                            lambda run_name, f: sae_folder(cfg.out, inputs.metadata["model_name"], hook, run_name, f),
                            inputs.metadata)
        folders = [s.folder for s in specs]
        tokens_per_s = 0.0
        if not cfg.eval_only:
            if dist.is_main:
                print(f"{inputs.metadata['model_name']}: d_model={inputs.d_model}, hook {hook}; {len(specs)} SAEs: "
                      + ", ".join(f"{s.run}/F{s.cfg.d_sae}" for s in specs))
            tokens_per_s = _train(cfg, trainer_cfg, specs, inputs, dist, device)
        missing = [f for f in folders if not (f / WEIGHTS_FILE).is_file()]
        if missing:
            raise TinyStoriesError(f"no final checkpoint in {missing[0]}: train first (drop --eval-only)")
        metrics: list[dict[str, Any]] = []
        if (cfg.evaluate or cfg.eval_only) and dist.is_main:
            metrics = _evaluate(cfg, inputs, folders, device)
        return RunResult(folders, metrics, tokens_per_s)
    finally:
        dist.close()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_dataclass(TinyStoriesConfig, argv, prog="python -m training tinystories", description=DESCRIPTION)
    try:
        run(cfg)
    except RankFailure as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except (TinyStoriesError, FileExistsError, ValueError) as err:
        rank = f" (rank of {launched_world_size()})" if launched_world_size() > 1 else ""
        print(f"error{rank}: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
