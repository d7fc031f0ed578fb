"""`python -m training cache-activations`: harvest one pass of the training stories into an activation cache.

Same model / data / hook / context flags as `tinystories`; `--out DIR` receives the shards and the manifest
(`training.activation_cache`). Then `python -m training tinystories --activations DIR` trains any number
of runs from it without the language model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sae.dataclass_cli import parse_dataclass
from training.activation_cache import write_cache
from training.lm_inputs import ModelDataConfig, TinyStoriesError, device_for, stream_inputs

DESCRIPTION = (
    "Run the training stories once through the language model (stopped after the hooked block) and store the "
    "residual of every token in memory-mapped safetensors shards plus a manifest. Example: python -m training "
    "cache-activations --preset tinystories-mini --out activations/mini"
)


@dataclass
class CacheConfig(ModelDataConfig):
    """Every flag of `python -m training cache-activations`."""

    out: Path = Path("activations")
    """Folder of the cache (shards + manifest.json)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Storage dtype of the cached activations (fp32 reproduces a streaming run exactly)."""
    shard_tokens: int = 1 << 20
    """Tokens per shard file (whole harvest chunks; about shard_tokens x d_model x dtype bytes each)."""
    overwrite: bool = False
    """Replace an existing cache in --out."""
    progress: bool = True
    """Show a tqdm progress bar."""


def cache_activations(cfg: CacheConfig) -> dict[str, Any]:
    """Harvest and write the cache; returns its manifest."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bm, metadata, harvester = stream_inputs(cfg, device_for(cfg))
    info = {"metadata": metadata, "model_dtype": cfg.model_dtype, "chunk_stories": cfg.harvest_batch_size,
            "max_stories": cfg.max_stories, **{k: metadata[k] for k in ("model_name", "hook_name", "context_size",
                                                                         "dataset_path")}}
    try:
        manifest = write_cache(cfg.out, (acts for _, acts in harvester.harvested_chunks()), bm.d_model, info,
                               cfg.dtype, cfg.shard_tokens, cfg.overwrite, cfg.progress)
    except FileExistsError as err:
        raise TinyStoriesError(str(err)) from err
    print(f"cached {manifest['n_tokens']:,} tokens of {bm.name} {metadata['hook_name']} in "
          f"{len(manifest['shards'])} shards at {cfg.out}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    cfg = parse_dataclass(CacheConfig, argv, prog="python -m training cache-activations", description=DESCRIPTION)
    try:
        cache_activations(cfg)
    except (TinyStoriesError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
