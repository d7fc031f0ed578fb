"""`python -m training tinystories`: SAEs of several widths on a TinyStories model's residual stream.

Pipeline: load the base model and the stories; hold out every 10th story; harvest the residual at
`blocks.<layer>.hook_resid_post` for every token of the training stories (one story per row, the forward
pass stopped after the hooked block); train every (architecture, width) on the same shuffled batches
(`training.trainer`); evaluate each final checkpoint on the held-out stories (`training.evaluate`).

Presets: `tinystories-mini` (offline: the project's own small GPT-Neo in checkpoints/tinystories-mini and
the local stories sample) and `tinystories-33m` (roneneldan/TinyStories-33M and roneneldan/TinyStories
from the Hugging Face Hub). Checkpoints land in `<out>/<model>/blocks.<layer>.hook_resid_post/<run>/F<d_sae>`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from sae.base_model import BaseModel, BaseModelLoadError, hf_hidden_states_index, hook_name, load_base_model
from sae.checkpoint import sae_folder
from sae.dataclass_cli import parse_dataclass
from sae.hub import hub_reachable
from sae.layout import CE_LOSS_SCORE, WEIGHTS_FILE
from training.activations import ActivationBuffer, TokenBatch, harvest_activations, tokenize_stories
from training.evaluate import EvalConfig, eval_set, evaluate_folders
from training.stories import default_stories_path, load_stories, split_stories
from training.trainer import MultiSAETrainer
from training.trainer_config import TrainerConfig, activation_scale, build_specs

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_33M = "random:../shared/data/tinystories-33m/config.json"
DESCRIPTION = (
    "Train sparse autoencoders of several widths (and architectures) on the residual stream of a TinyStories "
    "language model, all on the same activation batches, then evaluate them on held-out stories. "
    "Example: python -m training tinystories --preset tinystories-mini --steps 2000"
)


class Preset(NamedTuple):
    model: str
    data: str | None
    """None: training.stories.default_stories_path() (the local sample, or $TINYSTORIES_FILE)."""


PRESETS = {
    "tinystories-mini": Preset("checkpoints/tinystories-mini", None),
    "tinystories-33m": Preset("roneneldan/TinyStories-33M", "roneneldan/TinyStories"),
}


@dataclass
class RunConfig:
    """Where the model, data and checkpoints are; TinyStoriesConfig adds the trainer and eval settings."""

    preset: Literal["tinystories-mini", "tinystories-33m"] = "tinystories-mini"
    """tinystories-mini: the offline model checkpoints/tinystories-mini and the local stories sample;
    tinystories-33m: roneneldan/TinyStories-33M and roneneldan/TinyStories from the Hugging Face Hub."""
    model: str | None = None
    """Base model instead of the preset's: a Hub id, a local HF folder, or random:<config.json>."""
    data: str | None = None
    """Stories instead of the preset's: a text file with `<|endoftext|>` separator lines, or a Hub dataset id."""
    layer: int = 1
    """Hooked block: the residual at its output, blocks.<layer>.hook_resid_post (= HF hidden_states[layer+1])."""
    context_size: int = 512
    """Tokens per story row (longer stories are truncated)."""
    max_stories: int | None = None
    """Use only the first this many stories (None: all)."""
    harvest_batch_size: int = 8
    """Stories per forward pass while harvesting activations."""
    out: Path = Path("checkpoints")
    """Root of the checkpoints tree."""
    resume: bool = False
    """Continue from the newest intermediate checkpoint every SAE has (same data order)."""
    overwrite: bool = False
    """Delete intermediate checkpoints of an earlier run in the same folders instead of refusing."""
    evaluate: bool = True
    """Evaluate the final checkpoints (metrics.json, latent_stats.safetensors)."""
    eval_only: bool = False
    """Skip training: evaluate the existing final checkpoints of these widths and architectures."""
    threads: int | None = None
    """torch CPU threads (None: torch's default). On a shared or small CPU machine 1 is often much faster."""


@dataclass
class TinyStoriesConfig(EvalConfig, TrainerConfig, RunConfig):
    """Every flag of `python -m training tinystories` (run settings, then trainer, then evaluation)."""


class RunResult(NamedTuple):
    folders: list[Path]
    metrics: list[dict[str, Any]]
    tokens_per_s: float
    """SAE-training throughput: activation vectors per second per SAE group (all SAEs see each one)."""


class TinyStoriesError(RuntimeError):
    """A user-facing failure (missing model or data, Hub unreachable); the message says what to do."""


def _portable(path: str | Path) -> str:
    """A path as recorded in checkpoints: relative to the repo root when nearby, else the file name only."""
    p = Path(path).resolve()
    rel = os.path.relpath(p, REPO_ROOT)
    return p.name if rel.startswith(os.pardir + os.sep + os.pardir) else rel


def _resolve_model(spec: str) -> str:
    """Preset model folders are relative to the repo root; anything else is used as given."""
    if spec.startswith("random:") or Path(spec).is_absolute() or Path(spec).exists():
        return spec
    candidate = REPO_ROOT / spec
    return str(candidate) if candidate.exists() else spec


def _offline_advice() -> str:
    return (
        "use the offline preset (--preset tinystories-mini), or the TinyStories-33M architecture with random "
        f"weights and a local stories file: --model {OFFLINE_33M} --data <stories file, e.g. "
        f"{_portable(default_stories_path())}>"
    )


def load_model(cfg: TinyStoriesConfig) -> tuple[BaseModel, str, str | None]:
    """The base model, the source recorded in the checkpoints (model_path), and its Hub id if it has one."""
    spec = cfg.model or PRESETS[cfg.preset].model
    source = _resolve_model(spec)
    try:
        bm = load_base_model(source)
    except (BaseModelLoadError, OSError, ValueError) as err:
        local = Path(source).exists() or source.startswith("random:")
        hint = "" if local else f"\nWithout the Hub, {_offline_advice()}."
        raise TinyStoriesError(f"cannot load the base model {spec!r}: {err}{hint}") from err
    if not 0 <= cfg.layer < bm.n_layers:
        raise TinyStoriesError(f"--layer {cfg.layer} is out of range: {bm.name} has blocks 0..{bm.n_layers - 1}")
    local = spec.startswith("random:") or Path(source).exists()
    return bm, (_portable(source) if Path(source).exists() else spec), (None if local else spec)


def load_data(cfg: TinyStoriesConfig) -> tuple[list[str], str]:
    """All stories, and the dataset_path recorded in the checkpoints."""
    data = cfg.data or PRESETS[cfg.preset].data or str(default_stories_path())
    # Hub dataset ids look like "owner/name"; anything else is a local file.
    is_file = Path(data).exists() or data.endswith(".txt") or data.count("/") != 1 or data.startswith((".", "~"))
    if is_file and not Path(data).expanduser().is_file():
        raise TinyStoriesError(f"stories file {data} does not exist (pass --data <text file with `<|endoftext|>` "
                               f"separator lines> or a Hugging Face dataset id)")
    if not is_file and not hub_reachable():
        raise TinyStoriesError(f"cannot load dataset {data!r}: the Hugging Face Hub is unreachable. "
                               f"{_offline_advice()}.")
    try:
        stories = load_stories(data, max_stories=cfg.max_stories)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        raise TinyStoriesError(f"cannot read the stories: {err}") from err
    if len(stories) < 10:
        raise TinyStoriesError(f"{data}: {len(stories)} stories are too few (every 10th is held out; need >= 10)")
    return stories, (_portable(data) if is_file else data)


def harvest(bm: BaseModel, stories: list[str], layer: int, context_size: int, batch_size: int,
            progress: bool = True) -> torch.Tensor:
    """Residual vectors `[n_tokens, d_model]` of every token of `stories` (one story per row).

    Rows are processed longest first and each batch is cut to its longest story, so little compute
    goes to padding; the order is deterministic (the buffer shuffles anyway).
    """
    tokens = tokenize_stories(bm.tokenizer, stories, context_size, pack=False, prepend_bos=bm.prepend_bos)
    lengths = tokens.attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    ids, mask = tokens.input_ids[order], tokens.attention_mask[order]
    chunks = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(ids), batch_size), desc="harvest", unit="batch", disable=not progress):
        width = int(mask[start: start + batch_size].sum(1).max())
        batch = TokenBatch(ids[start: start + batch_size, :width], mask[start: start + batch_size, :width])
        chunks.append(harvest_activations(bm, batch, layer, batch_size, progress=False))
    return torch.cat(chunks)


def run(cfg: TinyStoriesConfig) -> RunResult:
    """Train (unless eval_only) and evaluate; returns the final folders and their metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bm, model_path, hub_id = load_model(cfg)
    stories, dataset_path = load_data(cfg)
    split = split_stories(stories)
    hook = hook_name(cfg.layer)
    context = min(cfg.context_size, bm.context_size)
    metadata = {
        "model_name": bm.name,
        "model_path": model_path,
        **({"model_hub_id": hub_id} if hub_id else {}),
        "hook_name": hook,
        "hook_layer": cfg.layer,
        "hf_hidden_states_index": hf_hidden_states_index(cfg.layer),
        "prepend_bos": bm.prepend_bos,
        "context_size": context,
        "dataset_path": dataset_path,
        "dataset": "TinyStories (Eldan & Li 2023), licence CDLA-Sharing-1.0",
    }
    trainer_cfg = TrainerConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainerConfig)})
    specs = build_specs(trainer_cfg, bm.d_model, lambda run_name, f: sae_folder(cfg.out, bm.name, hook, run_name, f),
                        metadata)
    folders = [s.folder for s in specs]
    tokens_per_s = 0.0
    if not cfg.eval_only:
        print(f"{bm.name}: d_model={bm.d_model}, hook {hook}; {len(split.train)} train / {len(split.val)} "
              f"validation stories; {len(specs)} SAEs: " + ", ".join(f"{s.run}/F{s.cfg.d_sae}" for s in specs))
        acts = harvest(bm, split.train, cfg.layer, context, cfg.harvest_batch_size, cfg.progress)
        if len(acts) < cfg.batch_size:
            raise TinyStoriesError(f"only {len(acts)} training tokens, fewer than one batch of {cfg.batch_size}: "
                                   f"use more stories or a smaller --batch-size")
        buffer = ActivationBuffer(acts, cfg.batch_size, seed=cfg.seed)
        scale = activation_scale(acts)
        run_info = {
            "cli": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
            "metadata": metadata,
            "n_train_stories": len(split.train),
            "n_train_tokens": len(acts),
        }
        mean = acts.mean(0)
        variance = float((acts[:: max(1, len(acts) // 100_000)] - mean).pow(2).sum(-1).mean())
        trainer = MultiSAETrainer(trainer_cfg, specs, buffer, scale=scale, run_info=run_info, data_mean=mean,
                                  data_variance=variance)
        t0 = time.perf_counter()
        start_step = trainer.step
        folders = trainer.train(resume=cfg.resume, overwrite=cfg.overwrite)
        steps_done = trainer_cfg.steps - max(start_step, 0)
        elapsed = time.perf_counter() - t0
        tokens_per_s = steps_done * cfg.batch_size / max(elapsed, 1e-9)
        print(f"trained {len(specs)} SAEs: {tokens_per_s:,.0f} tokens/s (each token through every SAE)")
    missing = [f for f in folders if not (f / WEIGHTS_FILE).is_file()]
    if missing:
        raise TinyStoriesError(f"no final checkpoint in {missing[0]}: train first (drop --eval-only)")
    metrics: list[dict[str, Any]] = []
    if cfg.evaluate or cfg.eval_only:
        es = eval_set(bm, split.val, context, cfg, info={"dataset_path": dataset_path})
        metrics = evaluate_folders(bm, cfg.layer, folders, es, cfg, progress=cfg.progress)
        for folder, m in zip(folders, metrics):
            ce = f" CE score {m[CE_LOSS_SCORE]:.3f}" if CE_LOSS_SCORE in m else ""
            print(f"{folder.relative_to(cfg.out)}: L0 {m['l0']:.1f}, variance explained {m['variance_explained']:.3f}, "
                  f"dead {m['frac_dead']:.2f}{ce}")
    return RunResult(folders, metrics, tokens_per_s)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_dataclass(TinyStoriesConfig, argv, prog="python -m training tinystories", description=DESCRIPTION)
    try:
        run(cfg)
    except (TinyStoriesError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
