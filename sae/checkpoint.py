"""Checkpoint folders in the SAELens v6 format: save, validate-and-load, list, and fetch from the Hub.

A folder holds `cfg.json`, `sae_weights.safetensors` (the weights the forward pass uses) and
optionally `sparsity.safetensors`, `metrics.json`, `training_config.json` and anything else the
trainer adds (loss curves, top-activating contexts). Weights are read with safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae.architectures import SparseAutoencoder, build_sae
from sae.config import SAEConfig
from sae.layout import CFG_FILE, METRICS_FILE, SPARSITY_FILE, STEPS_DIR, TRAINING_CONFIG_FILE, WEIGHTS_FILE


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, or does not match what was asked for."""


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a saved (instance-free) SAE of this config."""
    d, f = cfg.d_in, cfg.d_sae
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d, f), "W_dec": (f, d), "b_dec": (d,)}
    if cfg.architecture == "gated":
        shapes.update(b_gate=(f,), b_mag=(f,), r_mag=(f,))
    else:
        shapes["b_enc"] = (f,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (f,)
    return shapes


def sae_folder(root: str | Path, model_name: str, hook_name: str, run: str, d_sae: int) -> Path:
    """`<root>/<base-model>/<hook_name>/<run>/F<d_sae>`: DESIGN.md's layout, where `run` is the
    architecture name or a variant of it (e.g. `standard-nosparsity`), so variants never collide."""
    return Path(root) / model_name / hook_name / run / f"F{d_sae}"


def step_folder(folder: str | Path, step: int) -> Path:
    return Path(folder) / STEPS_DIR / f"{step:09d}"


def write_folder_atomically(
    folder: str | Path, write: Callable[[Path], None], keep: tuple[str, ...] = (STEPS_DIR,)
) -> Path:
    """Call `write(tmp)` on a fresh temporary folder, then move it to `folder` in one rename.

    A crash mid-write leaves only a hidden temporary folder, never a half-written checkpoint.
    Entries named in `keep` (the intermediate `steps/`) move over from an existing `folder`.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    moved: list[str] = []
    try:
        write(tmp)
        _usual_permissions(tmp)
        for name in keep:
            if (folder / name).exists() and not (tmp / name).exists():
                os.replace(folder / name, tmp / name)
                moved.append(name)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        for name in moved:  # give kept entries back before the temporary folder goes
            if (tmp / name).exists() and folder.exists():
                os.replace(tmp / name, folder / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _usual_permissions(root: Path) -> None:
    """mkdtemp (and some writers, e.g. via mkstemp) create owner-only entries: give them the umask's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_file_atomically(folder: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write `folder/name` through a temporary file in the same folder and one rename (atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / name


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_sae(
    sae: SparseAutoencoder,
    folder: str | Path,
    *,
    inst: int | None = None,
    metadata: dict[str, Any] | None = None,
    log10_sparsity: Tensor | None = None,
    metrics: dict[str, Any] | None = None,
    training_config: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write one SAE (instance `inst` of a multi-instance module) as a SAELens v6 folder, atomically.

    `log10_sparsity [d_sae]` is the log10 firing frequency; `extra(tmp_folder)` may add files.
    """
    if (inst is None) != (sae.cfg.n_inst is None):
        raise ValueError("pass inst=i exactly when the SAE has an instance dimension")
    cfg = sae.cfg.replace(n_inst=None, tied=False, metadata={**sae.cfg.metadata, **(metadata or {})})
    weights = {k: v.to(getattr(torch, cfg.dtype)).cpu() for k, v in sae.effective_weights(inst).items()}

    def write(tmp: Path) -> None:
        config = cfg.to_saelens_dict()
        config["metadata"]["sae_training"]["tied"] = sae.cfg.tied  # provenance: W_dec is written out
        _write_json(tmp / CFG_FILE, config)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if log10_sparsity is not None:
            save_file({"sparsity": log10_sparsity.detach().float().cpu().contiguous()}, str(tmp / SPARSITY_FILE))
        if metrics is not None:
            _write_json(tmp / METRICS_FILE, metrics)
        if training_config is not None:
            _write_json(tmp / TRAINING_CONFIG_FILE, training_config)
        if extra is not None:
            extra(tmp)

    return write_folder_atomically(folder, write)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, raising CheckpointError that names the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def load_config(folder: str | Path) -> SAEConfig:
    path = Path(folder) / CFG_FILE
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    try:
        cfg = SAEConfig.from_saelens_dict(raw)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from err
    # Tied weights were written out as W_dec: the loaded module is always untied.
    return cfg.replace(tied=False)


def load_weights(folder: str | Path, cfg: SAEConfig) -> dict[str, Tensor]:
    """Read and validate `sae_weights.safetensors` against `cfg` (names, shapes, finite values)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {err}") from err
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a {cfg.architecture} SAE: missing {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, but cfg.json "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {shape}"
            )
        if not weights[name].is_floating_point() or not torch.isfinite(weights[name]).all():
            raise CheckpointError(f"{path}: tensor {name} is not a finite floating-point tensor")
    return weights


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load, validate and return the SAE in `folder` (any SAELens v6 folder of a known architecture)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    cfg = load_config(folder)
    weights = load_weights(folder, cfg)
    dtype = weights["W_enc"].dtype
    sae = build_sae(cfg.replace(dtype=str(dtype).removeprefix("torch.")))
    sae.load_effective_weights(weights)
    return sae.to(device).eval()


def load_log10_sparsity(folder: str | Path) -> Tensor | None:
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["sparsity"]
    except (SafetensorError, OSError, KeyError) as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from err


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoints tree listing knows about one SAE folder without loading its weights."""

    path: Path
    run: str
    """Name of the run folder: the architecture, or e.g. `standard-nosparsity` for a variant."""
    architecture: str
    d_in: int
    d_sae: int
    model_name: str
    hook_name: str
    step: int | None
    """Training step of an intermediate checkpoint (None for the final one)."""

    @property
    def label(self) -> str:
        step = "final" if self.step is None else f"step {self.step}"
        return f"{self.model_name} · {self.hook_name} · {self.run} · F={self.d_sae} · {step}"


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Every SAE folder under `root` (those holding cfg.json and weights), sorted; unreadable ones skipped."""
    infos: list[CheckpointInfo] = []
    for cfg_path in sorted(Path(root).rglob(CFG_FILE)):
        folder = cfg_path.parent
        if not (folder / WEIGHTS_FILE).is_file() or any(p.startswith(".") for p in folder.parts[-6:]):
            continue
        try:
            cfg = load_config(folder)
        except CheckpointError:
            continue
        step = int(folder.name) if folder.parent.name == STEPS_DIR and folder.name.isdigit() else None
        final = folder.parent.parent if step is not None else folder
        infos.append(CheckpointInfo(
            path=folder, run=final.parent.name, architecture=cfg.architecture, d_in=cfg.d_in, d_sae=cfg.d_sae,
            model_name=str(cfg.metadata.get("model_name", "unknown")),
            hook_name=str(cfg.metadata.get("hook_name", "unknown")), step=step,
        ))
    return sorted(infos, key=lambda i: (i.model_name, i.hook_name, i.run, i.d_sae, i.step or 1 << 62))


def download_checkpoints(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch a Hub repo of checkpoint folders and return its local path (same layout as `checkpoints/`)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, cache_dir=cache_dir, etag_timeout=10))
    except Exception as err:  # offline, unknown repo, auth: all end here with the reason
        raise CheckpointError(f"could not download checkpoints from Hub repo {repo_id!r}: {err}") from err
