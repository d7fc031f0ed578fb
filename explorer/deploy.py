"""`python -m explorer deploy --repo-id USER/NAME`: create or update the app's Hugging Face Space.

Uploads exactly what the Space needs (see `explorer.space_files`: the app, the project modules it
imports, the checkpoints it serves, `.gitattributes`) plus a generated README (the Space's front
matter) and requirements.txt (see `explorer.space_card`), as one commit that also removes files of
an earlier upload the Space no longer needs. `--dry-run DIR` writes that folder instead. The token
comes from $HF_TOKEN or the `hf auth login` cache and is never printed; an unreachable Hub fails in
seconds. Local files are never modified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from explorer.space_card import (
    CheckpointSummary,
    front_matter,
    read_front_matter,
    requirements,
    space_readme,
)
from explorer.space_files import CHECKPOINTS_DIR, DeployError, space_files
from sae.dataclass_cli import add_dataclass_arguments
from sae.hub import hub_endpoint, hub_reachable

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GITATTRIBUTES = ".gitattributes"
README = "README.md"
REQUIREMENTS = "requirements.txt"
HUB_REPOS_VARIABLE = "SAE_HUB_REPOS"
"""The environment variable the app reads its extra Hub checkpoint repos from."""
DESCRIPTION = (
    "Create or update a Hugging Face Space running the SAE explorer, uploading exactly the files it needs "
    "(the app, the modules it imports, the checkpoints it serves) with a generated README (front matter) and "
    "requirements.txt. Token: $HF_TOKEN or the `hf auth login` cache."
)


@dataclass
class DeployConfig:
    repo_id: str
    """The Space, USER/NAME (created if it does not exist)."""
    dry_run: Path | None = None
    """Write the exact folder that would be uploaded to this new (or empty) folder instead of uploading."""
    private: bool = False
    """Create the Space as private."""
    hardware: str | None = None
    """Space hardware, e.g. cpu-basic, cpu-upgrade, zero-a10g (ZeroGPU), t4-small; it also picks the torch build in
    requirements.txt (CPU wheels unless a GPU is chosen). None: a new Space gets cpu-basic, an existing one keeps
    its hardware."""
    hub_sae_repo: str | None = None
    """Also serve the SAEs of this Hub model repo (preloaded at build time through `preload_from_hub`)."""
    hub_timeout: float = 5.0
    """Seconds to wait for the Hub to answer before giving up (offline machines fail fast)."""


class SpacePlan(NamedTuple):
    files: list[tuple[str, Path]]
    """(path in the Space, local file) for the copied files, sorted."""
    generated: dict[str, str]
    """Path in the Space -> text, for the generated files (README.md, requirements.txt)."""
    n_saes: int
    unresolved_imports: list[str]
    """Modules the code imports that nothing installed here provides (optional imports; not pinned)."""

    def paths(self) -> list[str]:
        return sorted([*(rel for rel, _ in self.files), *self.generated])

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.files) + sum(len(t.encode()) for t in self.generated.values())


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DeployError(f"--repo-id must look like USER/NAME, got {repo_id!r}")


def check_hardware(hardware: str | None) -> None:
    from huggingface_hub import SpaceHardware

    flavors = [h.value for h in SpaceHardware]
    if hardware is not None and hardware not in flavors:
        raise DeployError(f"unknown --hardware {hardware!r}; Space hardware is one of {', '.join(flavors)}")


def plan_space(cfg: DeployConfig, root: Path = PROJECT_ROOT) -> SpacePlan:
    """What the Space gets from the project at `root`, without touching the Hub."""
    check_repo_id(cfg.repo_id)
    if cfg.hub_sae_repo:
        check_repo_id(cfg.hub_sae_repo)
    check_hardware(cfg.hardware)
    found = space_files(root)
    files = list(found.files)
    if (root / GITATTRIBUTES).is_file():  # keeps a `git clone` of the Space routing binaries through LFS / Xet
        files.append((GITATTRIBUTES, root / GITATTRIBUTES))
    ckpts = [p for rel, p in files if rel.startswith(CHECKPOINTS_DIR + "/")]
    summary = CheckpointSummary(found.n_saes, len(ckpts), sum(p.stat().st_size for p in ckpts))
    meta = front_matter(read_front_matter(root / README), cfg.hardware, cfg.hub_sae_repo)
    reqs, unresolved = requirements(found.third_party, cfg.hardware)
    generated = {README: space_readme(meta, summary, cfg.hub_sae_repo), REQUIREMENTS: reqs}
    clash = [rel for rel, _ in files if rel in generated]
    if clash:
        raise DeployError(f"{clash} would be both copied and generated")
    return SpacePlan(sorted(files), generated, found.n_saes, unresolved)


def write_folder(plan: SpacePlan, outdir: Path, root: Path = PROJECT_ROOT) -> Path:
    """Write exactly the Space's files into `outdir`, which must be new or empty and outside the project."""
    from tqdm.auto import tqdm

    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise DeployError(f"{outdir} exists and is not an empty folder")
    if outdir.resolve().is_relative_to(root.resolve()):
        raise DeployError(f"{outdir} lies inside the project: the Space's files would be copied into themselves")
    outdir.mkdir(parents=True, exist_ok=True)
    for rel, src in tqdm(plan.files, desc="copying the Space's files", unit="file", leave=False):
        dest = outdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    for rel, text in plan.generated.items():
        (outdir / rel).write_text(text)
    return outdir


def hub_token() -> str:
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise DeployError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return token


def upload(plan: SpacePlan, cfg: DeployConfig, root: Path = PROJECT_ROOT) -> str:
    """Create or update the Space with exactly the plan's files; returns its URL. DeployError on failure."""
    from huggingface_hub import HfApi

    token = hub_token()
    if not hub_reachable(cfg.hub_timeout):
        raise DeployError(f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached from this machine (offline?)")
    api = HfApi(endpoint=hub_endpoint(), token=token)
    try:
        with tempfile.TemporaryDirectory(prefix="space-") as tmp:
            folder = write_folder(plan, Path(tmp) / "space", root)
            url = api.create_repo(cfg.repo_id, repo_type="space", space_sdk="gradio", private=cfg.private,
                                  exist_ok=True, space_hardware=cfg.hardware)
            api.upload_folder(repo_id=cfg.repo_id, repo_type="space", folder_path=folder, delete_patterns="*",
                              commit_message=f"Deploy the SAE explorer ({plan.n_saes} SAE checkpoints)")
        if cfg.hub_sae_repo:
            api.add_space_variable(cfg.repo_id, HUB_REPOS_VARIABLE, cfg.hub_sae_repo)
    except DeployError:
        raise
    except Exception as err:  # HTTP, auth, network: say why, never show the token
        raise DeployError(f"{type(err).__name__}: {str(err).replace(token, '***')}") from None
    if cfg.hardware:
        try:
            api.request_space_hardware(cfg.repo_id, cfg.hardware)
        except Exception as err:  # e.g. ZeroGPU without a PRO plan: the Space runs, on its current hardware
            print(f"warning: the Space is uploaded, but hardware {cfg.hardware} could not be set: "
                  f"{str(err).replace(token, '***')}", file=sys.stderr)
    return str(url)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DeployConfig)


def run(cfg: DeployConfig, root: Path = PROJECT_ROOT) -> None:
    """The command: plan, then write the dry-run folder or upload; exits 1 with the reason on failure."""
    try:
        plan = plan_space(cfg, root)
        for module in plan.unresolved_imports:
            print(f"note: `{module}` is imported but not installed here (an optional import?), so requirements.txt "
                  "does not list it",
                  file=sys.stderr)
        what = f"{len(plan.paths())} files, {plan.total_bytes() / 1e6:.1f} MB, {plan.n_saes} SAE checkpoints"
        if cfg.dry_run is not None:
            out = write_folder(plan, cfg.dry_run, root)
            print(f"dry run: {what} written to {out}")
            return
        print(f"uploading {what} to the Space {cfg.repo_id} ...")
        print(f"done: {upload(plan, cfg, root)}")
    except DeployError as err:
        print(f"error: deploying to {cfg.repo_id} failed: {err}. Local files are untouched.", file=sys.stderr)
        raise SystemExit(1) from None
