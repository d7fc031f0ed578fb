"""The checkpoints the explorer offers: language-model SAEs and toy-model folders under local roots and Hub repos.

`CheckpointCatalog` answers the cascading choices (model -> hook -> run -> width -> step) and where each
SAE's base model lives; `fetch_hub_sources` downloads Hub repos without letting an unreachable Hub block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from safetensors import safe_open

from explorer.errors import AnalysisError
from sae import layout
from sae.checkpoint import (
    CFG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointInfo,
    download_checkpoints,
    expected_shapes,
    list_checkpoints,
    load_config,
    read_json,
)

TOY_MODEL_NAME = "toy-superposition"
"""`metadata.model_name` of toy-model SAEs: never offered as language-model checkpoints."""
KNOWN_HUB_IDS = {"tinystories-33m": "roneneldan/TinyStories-33M"}
"""Folder-style model names whose Hugging Face Hub id is known."""
MODEL_SOURCE_KEYS = ("model_path", "model_source", "model_name_or_path", "base_model", "hf_model_id", "model_id")
"""cfg.json metadata keys that may say where the base model lives (first found wins)."""


class Failure(NamedTuple):
    path: Path
    reason: str


def probe_checkpoint(folder: Path) -> str:
    """Why an SAE folder cannot load ('' if its config and its weights' header look right), without
    reading the tensors: a truncated or foreign weights file fails here, at startup, not on first use."""
    try:
        cfg = load_config(folder)
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except CheckpointError as err:
        return str(err)
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        return f"{folder / WEIGHTS_FILE} is corrupt or not a safetensors file: {err}"
    for name, shape in expected_shapes(cfg).items():
        if shapes.get(name) != shape:
            return (f"{folder / WEIGHTS_FILE}: tensor {name} has shape {shapes.get(name)}, but cfg.json "
                    f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {shape}")
    return ""


def unlisted_folders(root: Path, listed: set[Path]) -> list[Failure]:
    """Folders holding a cfg.json that `list_checkpoints` skipped (unreadable config or no weights)."""
    out = []
    for cfg_path in sorted(root.rglob(CFG_FILE)):
        folder = cfg_path.parent
        if folder in listed or "toy" in folder.relative_to(root).parts[:1] or any(
            p.startswith(".") for p in folder.relative_to(root).parts
        ):
            continue
        problem = probe_checkpoint(folder)
        if problem and not (folder / "config.json").is_file():  # a base-model folder is not an SAE
            out.append(Failure(folder, problem))
    return out


@dataclass(frozen=True)
class Source:
    root: Path
    label: str
    """'local' or the Hub repo id."""


@dataclass(frozen=True)
class Entry:
    info: CheckpointInfo
    source: Source
    model_key: str
    """The model's name in the app (the model name, suffixed with the source when two sources share it)."""


class CheckpointCatalog:
    """The language-model SAE checkpoints and toy-model folders under some roots."""

    def __init__(self, sources: Sequence[Source], base_models: dict[str, str] | None = None) -> None:
        self.sources = list(sources)
        self.base_models = dict(base_models or {})
        """model_name -> base model source, overriding the lookup of `base_model_source`."""
        self.entries: list[Entry] = []
        self.toy_folders: list[Path] = []
        self.failures: list[Failure] = []
        """Checkpoint folders that cannot be offered, and why."""
        owner: dict[str, Source] = {}
        for src in self.sources:
            if not src.root.is_dir():
                continue
            for info in list_checkpoints(src.root):
                if info.model_name == TOY_MODEL_NAME or "toy" in info.path.relative_to(src.root).parts[:1]:
                    continue
                problem = probe_checkpoint(info.path)
                if problem:
                    self.failures.append(Failure(info.path, problem))
                    continue
                key = info.model_name
                if owner.setdefault(key, src) != src:
                    key = f"{info.model_name} [{src.label}]"
                self.entries.append(Entry(info, src, key))
            seen = {e.info.path for e in self.entries} | {f.path for f in self.failures}
            self.failures += unlisted_folders(src.root, seen)
            toy_root = src.root / "toy"
            if toy_root.is_dir():
                for d in sorted(toy_root.iterdir()):
                    if d.is_dir() and not d.name.startswith(".") and any(
                        (d / f).is_file() for f in (layout.TOY_CONFIG_FILE, METRICS_FILE, layout.TOY_FEATURES_PLOT)
                    ):
                        self.toy_folders.append(d)

    # -- cascading choices
    def models(self) -> list[str]:
        return list(dict.fromkeys(e.model_key for e in self.entries))

    def hooks(self, model: str) -> list[str]:
        return list(dict.fromkeys(e.info.hook_name for e in self.entries if e.model_key == model))

    def runs(self, model: str, hook: str) -> list[str]:
        return sorted({e.info.run for e in self.entries if e.model_key == model and e.info.hook_name == hook})

    def widths(self, model: str, hook: str, run: str) -> list[int]:
        return sorted({e.info.d_sae for e in self._sel(model, hook, run)})

    def steps(self, model: str, hook: str, run: str, d_sae: int) -> list[int | None]:
        steps = {e.info.step for e in self._sel(model, hook, run) if e.info.d_sae == d_sae}
        return sorted(steps, key=lambda s: (s is None, s or 0))

    def _sel(self, model: str, hook: str, run: str) -> list[Entry]:
        return [e for e in self.entries if e.model_key == model and e.info.hook_name == hook and e.info.run == run]

    def find(self, model: str, hook: str, run: str, d_sae: int | str, step: int | None) -> Entry:
        for e in self._sel(model, hook, run):
            if e.info.d_sae == int(d_sae) and e.info.step == step:
                return e
        raise AnalysisError(f"No checkpoint {model} / {hook} / {run} / F={d_sae} / step {step or 'final'}.")

    def finals(self, model: str, hook: str) -> list[Entry]:
        """Every final checkpoint of one model and hook: the compare tab's rows."""
        return [e for e in self.entries if e.model_key == model and e.info.hook_name == hook and e.info.step is None]

    def default(self) -> Entry | None:
        """A sensible first checkpoint: tinystories-mini if present, run 'standard' if present, widest F."""
        if not self.entries:
            return None
        finals = [e for e in self.entries if e.info.step is None] or self.entries

        def score(e: Entry) -> tuple:
            return (e.info.model_name != "tinystories-mini", e.info.run != "standard", -e.info.d_sae)

        return min(finals, key=score)

    def base_model_source(self, entry: Entry) -> str:
        """Where to load the base model an SAE was trained on: the metadata, the folder beside it, or the Hub."""
        info = entry.info
        if info.model_name in self.base_models:
            return self.base_models[info.model_name]
        final = info.path.parent.parent if info.step is not None else info.path
        model_dir = final.parent.parent.parent  # <root>/<model>/<hook>/<run>/F<d>
        if (model_dir / "config.json").is_file():
            return str(model_dir)
        meta = _read_metadata(info.path)
        for key in MODEL_SOURCE_KEYS:
            val = meta.get(key)
            if isinstance(val, str) and val:
                p = Path(val)
                if not p.is_absolute():
                    for base in (entry.source.root, entry.source.root.parent):
                        if (base / p / "config.json").is_file():
                            return str(base / p)
                if p.is_dir() or "/" in val or val.startswith("random:"):
                    return val
        name = info.model_name
        if (entry.source.root / name / "config.json").is_file():
            return str(entry.source.root / name)
        return KNOWN_HUB_IDS.get(name.lower(), name)


def fetch_hub_sources(repo_ids: Sequence[str], timeout: float = 20.0) -> tuple[list[Source], list[str]]:
    """Download Hub repos of checkpoint folders in parallel, giving up on each after `timeout` seconds.

    Returns the sources that arrived and one notice per repo that did not (offline, unknown repo, timeout),
    so an unreachable Hub never blocks the local checkpoints.
    """
    results: dict[str, Path | str] = {}

    def fetch(repo: str) -> None:
        try:
            results[repo] = download_checkpoints(repo)
        except Exception as err:  # any failure becomes a notice
            results[repo] = str(err)

    threads = [threading.Thread(target=fetch, args=(r,), daemon=True) for r in repo_ids]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    sources, notices = [], []
    for repo in repo_ids:
        got = results.get(repo)
        if isinstance(got, Path):
            sources.append(Source(got, repo))
        elif got is None:
            notices.append(f"Hub repo {repo!r}: no answer within {timeout:.0f} s (offline?); skipped.")
        else:
            first = got.splitlines()[0] if got else "unknown error"
            notices.append(f"Hub repo {repo!r} skipped: {first[:300]}")
    return sources, notices


def _read_metadata(folder: Path) -> dict[str, Any]:
    try:
        raw = read_json(folder / layout.CFG_FILE)
    except CheckpointError:
        return {}
    return dict(raw.get("metadata") or {}) if isinstance(raw, dict) else {}


def read_metrics(folder: str | Path) -> dict[str, Any] | None:
    """metrics.json of a checkpoint or toy folder, or None if absent/unreadable."""
    try:
        data = read_json(Path(folder) / METRICS_FILE)
    except CheckpointError:
        return None
    return data if isinstance(data, dict) else None


def lookup_metric(d: dict[str, Any] | None, key: str) -> Any:
    """A metric from metrics.json: top level, or one level down (e.g. under "eval")."""
    if not d:
        return None
    if key in d:
        return d[key]
    for v in d.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None
