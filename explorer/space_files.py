"""Which files a Hugging Face Space of the app needs: the app's import graph and the checkpoints it serves.

The code is found by following the imports of the entry point through the project's own packages
(so a new module of `explorer/` or `sae/` ships as soon as the app imports it, and nothing the app does
not import ships at all: no training code, tests or benchmarks). The checkpoints are what the app's own
catalog (`explorer.catalog`) offers: every SAE folder it lists (intermediate `steps/` included), the
files `transformers` loads from the base-model folder of each, and what the toy tab shows of each toy
folder. Model cards, training logs, plots of training runs and resumable trainer state stay behind.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from sae import layout

APP_FILE = "app.py"
CHECKPOINTS_DIR = "checkpoints"
NEVER_SHIPPED_PACKAGES = ("training", "tests", "bench")
"""Project packages the app must not import (DESIGN: the app imports `sae/` and `explorer/` only)."""
RUN_STATE_PREFIXES = ("trainer_state",)
"""Resumable optimizer state inside an SAE folder: large, and only useful to resume training."""
BASE_MODEL_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.*", "*.safetensors",
    "*.safetensors.index.json",
)  # fmt: skip
"""Files `from_pretrained` reads from a Hugging Face model folder (its card and training logs are not read)."""
TOY_SHOWN = (
    layout.TOY_FEATURES_PLOT, layout.TOY_TRAINING_GIF, layout.METRICS_FILE,
    layout.TOY_CONFIG_FILE, layout.TOY_MODEL_FILE,
)
"""What the toy tab finds and shows of a toy folder (the per-instance SAEs and logs are not read)."""


class DeployError(RuntimeError):
    """The Space cannot be built or uploaded; the message says why. Local files are untouched."""


class ImportGraph(NamedTuple):
    modules: list[Path]
    """Project files the entry point imports, directly or not (itself first), package `__init__.py`s included."""
    data_files: list[Path]
    """Non-Python files inside the imported packages (CSS, JS, templates)."""
    third_party: list[str]
    """Top-level names of the non-project, non-standard-library modules imported, sorted."""


class SpaceFiles(NamedTuple):
    files: list[tuple[str, Path]]
    """(path in the Space, local file), sorted by path; the generated README and requirements not included."""
    third_party: list[str]
    """Top-level module names the shipped code imports from installed distributions."""
    n_saes: int
    """SAE checkpoint folders shipped (intermediate steps included)."""


# ---------------------------------------------------------------------------------------- code


def _local_roots(root: Path) -> set[str]:
    """Top-level names importable from the project root: packages (folders with __init__.py) and modules."""
    names = {p.parent.name for p in root.glob("*/__init__.py")}
    names |= {p.stem for p in root.glob("*.py")}
    return names


def _resolve(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported_names(path: Path, root: Path) -> Iterable[str]:
    """Every dotted module name `path` imports (at any depth: lazy and guarded imports count too).

    `from a import b` yields `a` and `a.b` (b may be a submodule); `importlib.resources.files("pkg")`
    yields `pkg`, since the package's data is then needed as surely as an import.
    """
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError) as err:
        raise DeployError(f"cannot parse {path}: {err}") from err
    package = _module_name(root, path) if path.name == "__init__.py" else _module_name(root, path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - node.level + 1] if node.level > 1 else parts
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base:
                yield base
            yield from (f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*")
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "files"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
        ):  # fmt: skip
            yield node.args[0].value


def _package_data(package_dir: Path) -> list[Path]:
    """Non-Python files of one package folder, recursing into sub-folders that are not packages themselves."""
    out = []
    for p in sorted(package_dir.iterdir()):
        if p.name.startswith(".") or p.name == "__pycache__":
            continue
        if p.is_dir() and not (p / "__init__.py").is_file():
            out += _package_data(p)
        elif p.is_file() and p.suffix not in (".py", ".pyc"):
            out.append(p)
    return out


def import_graph(root: Path, entry: str = APP_FILE) -> ImportGraph:
    """The project files reachable from `root/entry` through imports, and the third-party modules they use."""
    root = root.resolve()
    start = root / entry
    if not start.is_file():
        raise DeployError(f"{start} does not exist: not the project root?")
    local = _local_roots(root)
    seen: dict[Path, None] = {start: None}
    todo = [start]
    third: set[str] = set()
    while todo:
        path = todo.pop()
        for dotted in _imported_names(path, root):
            top = dotted.partition(".")[0]
            if top not in local:
                if top not in sys.stdlib_module_names and top != "__future__":
                    third.add(top)
                continue
            if top in NEVER_SHIPPED_PACKAGES:
                raise DeployError(f"{path.relative_to(root)} imports {dotted}: the app must not depend on {top}/")
            parts = dotted.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way are imported too
                mod = _resolve(root, ".".join(parts[:i]))
                if mod is not None and mod not in seen:
                    seen[mod] = None
                    todo.append(mod)
    modules = list(seen)
    package_dirs = sorted({m.parent for m in modules if m.name == "__init__.py"})
    data = [f for d in package_dirs for f in _package_data(d)]
    return ImportGraph([modules[0], *sorted(modules[1:])], data, sorted(third))


# ---------------------------------------------------------------------------------------- checkpoints


def _base_model_files(source: str, ckpt_root: Path) -> set[Path]:
    """The files to ship for one base-model source of the catalog: none for a Hub id (the Space downloads it)."""
    folder = Path(source)
    if source.startswith("random:") or not folder.is_dir():
        if Path(source.removeprefix("random:")).exists():
            raise DeployError(f"an SAE's base model {source} lies outside {ckpt_root}: the Space would not have it")
        return set()
    if not folder.resolve().is_relative_to(ckpt_root):
        raise DeployError(f"an SAE's base model {folder} lies outside {ckpt_root}: the Space would not have it")
    return {f for f in folder.iterdir() if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in BASE_MODEL_PATTERNS)}


def served_checkpoint_files(ckpt_root: Path) -> tuple[list[Path], int]:
    """(the files under `ckpt_root` the app's catalog serves, number of SAE checkpoints among them)."""
    from explorer.catalog import CheckpointCatalog, Source

    ckpt_root = ckpt_root.resolve()
    catalog = CheckpointCatalog([Source(ckpt_root, "local")])
    files: set[Path] = set()
    for entry in catalog.entries:  # final and intermediate-step SAE folders alike: the app offers both
        files |= {f for f in entry.info.path.iterdir()
                  if f.is_file() and not f.name.startswith((".", *RUN_STATE_PREFIXES))}
    for source in sorted({catalog.base_model_source(e) for e in catalog.entries}):
        files |= _base_model_files(source, ckpt_root)
    for folder in catalog.toy_folders:
        files |= {folder / n for n in TOY_SHOWN if (folder / n).is_file()}
    return sorted(files), len(catalog.entries)


def space_files(root: Path, entry: str = APP_FILE) -> SpaceFiles:
    """Everything the Space needs from the project at `root`, each file with its path in the Space."""
    root = root.resolve()
    graph = import_graph(root, entry)
    ckpt_root = root / CHECKPOINTS_DIR
    ckpts, n_saes = served_checkpoint_files(ckpt_root) if ckpt_root.is_dir() else ([], 0)
    if not n_saes:
        raise DeployError(f"{ckpt_root} holds no SAE checkpoint: the Space would have nothing to serve")
    local = [*graph.modules, *graph.data_files, *ckpts]
    files = sorted((p.relative_to(root).as_posix(), p) for p in dict.fromkeys(local))
    return SpaceFiles(files, graph.third_party, n_saes)
