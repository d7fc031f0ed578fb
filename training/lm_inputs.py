"""The language model and the stories of a run: flags shared by `tinystories` and `cache-activations`.

Presets: `tinystories-mini` (offline: the project's own small GPT-Neo in checkpoints/tinystories-mini and
the local stories sample) and `tinystories-33m` (roneneldan/TinyStories-33M and roneneldan/TinyStories
from the Hugging Face Hub, streamed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sae.base_model import BaseModel, BaseModelLoadError, hf_hidden_states_index, hook_name, load_base_model
from sae.hub import hub_reachable
from training.distributed import resolve_device
from training.stories import default_stories_path
from training.story_stream import StoryChunkStream, StorySource, is_stories_file
from training.streaming import StoryActivations, model_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_33M = "random:../shared/data/tinystories-33m/config.json"


class Preset(NamedTuple):
    model: str
    data: str | None
    """None: training.stories.default_stories_path() (the local sample, or $TINYSTORIES_FILE)."""


PRESETS = {
    "tinystories-mini": Preset("checkpoints/tinystories-mini", None),
    "tinystories-33m": Preset("roneneldan/TinyStories-33M", "roneneldan/TinyStories"),
}


class TinyStoriesError(RuntimeError):
    """A user-facing failure (missing model or data, Hub unreachable); the message says what to do."""


@dataclass
class ModelDataConfig:
    """Which model, hook, stories and device: the flags `tinystories` and `cache-activations` share."""

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
    """Stories per forward pass while harvesting activations (one chunk of the stream)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda (each torchrun rank its own GPU), cuda:N or mps: LM and SAEs."""
    model_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the language model's forward pass (the SAEs always train in fp32)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default). On a shared or small CPU machine 1 is often much faster."""


def portable(path: str | Path) -> str:
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


def offline_advice() -> str:
    return (
        "use the offline preset (--preset tinystories-mini), or the TinyStories-33M architecture with random "
        f"weights and a local stories file: --model {OFFLINE_33M} --data <stories file, e.g. "
        f"{portable(default_stories_path())}>"
    )


def model_spec(cfg: ModelDataConfig) -> str:
    return cfg.model or PRESETS[cfg.preset].model


def load_model(cfg: ModelDataConfig, device: str = "cpu") -> tuple[BaseModel, str, str | None]:
    """The base model, the source recorded in the checkpoints (model_path), and its Hub id if it has one."""
    spec = model_spec(cfg)
    source = _resolve_model(spec)
    try:
        bm = load_base_model(source, device=device)
    except (BaseModelLoadError, OSError, ValueError) as err:
        local = Path(source).exists() or source.startswith("random:")
        hint = "" if local else f"\nWithout the Hub, {offline_advice()}."
        raise TinyStoriesError(f"cannot load the base model {spec!r}: {err}{hint}") from err
    if not 0 <= cfg.layer < bm.n_layers:
        raise TinyStoriesError(f"--layer {cfg.layer} is out of range: {bm.name} has blocks 0..{bm.n_layers - 1}")
    bm.model.to(model_dtype(cfg.model_dtype))
    local = spec.startswith("random:") or Path(source).exists()
    return bm, (portable(source) if Path(source).exists() else spec), (None if local else spec)


def story_source(cfg: ModelDataConfig) -> tuple[StorySource, str]:
    """The stories to stream, and the dataset_path recorded in the checkpoints."""
    data = cfg.data or PRESETS[cfg.preset].data or str(default_stories_path())
    is_file = is_stories_file(data)
    if is_file and not Path(data).expanduser().is_file():
        raise TinyStoriesError(f"stories file {data} does not exist (pass --data <text file with `<|endoftext|>` "
                               f"separator lines> or a Hugging Face dataset id)")
    if not is_file and not hub_reachable():
        raise TinyStoriesError(f"cannot load dataset {data!r}: the Hugging Face Hub is unreachable. "
                               f"{offline_advice()}.")
    if cfg.max_stories is not None and cfg.max_stories < 10:
        raise TinyStoriesError(f"--max-stories {cfg.max_stories} is too few (every 10th story is held out; need >= 10)")
    source = StorySource(str(Path(data).expanduser()) if is_file else data, cfg.max_stories)
    try:  # fail now, not after the model has loaded and the first chunks were harvested
        next(iter(source.read("train")))
    except StopIteration:
        raise TinyStoriesError(f"{data} holds no training stories") from None
    except (UnicodeDecodeError, ValueError, OSError, RuntimeError) as err:
        raise TinyStoriesError(f"cannot read the stories of {data}: {err}") from err
    return source, (portable(data) if is_file else data)


def checkpoint_metadata(bm: BaseModel, model_path: str, hub_id: str | None, layer: int, context: int,
                        dataset_path: str) -> dict[str, Any]:
    """What every SAE checkpoint (and the activation cache manifest) records about its inputs."""
    return {
        "model_name": bm.name,
        "model_path": model_path,
        **({"model_hub_id": hub_id} if hub_id else {}),
        "hook_name": hook_name(layer),
        "hook_layer": layer,
        "hf_hidden_states_index": hf_hidden_states_index(layer),
        "prepend_bos": bm.prepend_bos,
        "context_size": context,
        "dataset_path": dataset_path,
        "dataset": "TinyStories (Eldan & Li 2023), licence CDLA-Sharing-1.0",
    }


def device_for(cfg: ModelDataConfig, local_rank: int = 0):
    """The torch device of this rank, with a clear error for an unavailable one."""
    try:
        return resolve_device(cfg.device, local_rank)
    except ValueError as err:
        raise TinyStoriesError(str(err)) from err


class StreamInputs(NamedTuple):
    bm: BaseModel
    metadata: dict[str, Any]
    """What every checkpoint records about its inputs (checkpoint_metadata)."""
    harvester: StoryActivations
    """This rank's chunks of training stories, through the model."""


def stream_inputs(cfg: ModelDataConfig, device, rank: int = 0, world_size: int = 1,
                  progress: bool = False) -> StreamInputs:
    """Model, stories and the harvesting stream of rank `rank` of `world_size` (`progress`: a harvest bar)."""
    bm, model_path, hub_id = load_model(cfg, device)
    source, dataset_path = story_source(cfg)
    context = min(cfg.context_size, bm.context_size)
    metadata = checkpoint_metadata(bm, model_path, hub_id, cfg.layer, context, dataset_path)
    stream = StoryChunkStream(source, cfg.harvest_batch_size, rank, world_size)
    return StreamInputs(bm, metadata, StoryActivations(bm, stream, cfg.layer, context, progress))
