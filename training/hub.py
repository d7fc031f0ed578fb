"""`python -m training push --repo-id USER/NAME PATH [--dry-run OUTDIR]`: a checkpoints tree to the Hub.

The upload is the tree as it is on disk (SAE folders in the SAELens layout, their intermediate step
folders, metrics, latent stats, loss curves, and any base-model folder inside it), minus resumable
trainer state and hidden files, plus a generated model card (`README.md` at the root). `--dry-run`
writes exactly that file set to OUTDIR instead. The token comes from $HF_TOKEN or the login cache and
is never printed. Local files are never modified.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sae import layout
from sae.checkpoint import METRICS_FILE, TRAINING_CONFIG_FILE, CheckpointInfo, list_checkpoints
from sae.hub import hub_endpoint, hub_reachable

EXCLUDED_NAMES = {layout.TRAINER_STATE_JSON, layout.TRAINER_STATE_TENSORS, "__pycache__"}
"""Files and folders never uploaded (resumable optimizer state is large and only useful locally)."""
KNOWN_HUB_MODELS = {"tinystories-33m": "roneneldan/TinyStories-33M"}
DATASET_ID = "roneneldan/TinyStories"
DATASET_LICENSE = "cdla-sharing-1.0"


class PushError(RuntimeError):
    """The push could not be done; the message says why. Local files are untouched."""


class UploadPlan(NamedTuple):
    files: list[tuple[str, Path]]
    """(path in repo, local file), sorted; README.md not included."""
    readme: str
    saes: list[CheckpointInfo]
    """Final SAE checkpoints of the tree."""


def collect_files(root: Path) -> list[tuple[str, Path]]:
    """Every uploadable file under `root` (hidden and EXCLUDED_NAMES parts skipped; a root README.md too)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(p.startswith(".") or p in EXCLUDED_NAMES for p in rel.parts):
            continue
        if rel.as_posix() == "README.md":  # replaced by the generated card
            continue
        out.append((rel.as_posix(), path))
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _hub_model_id(meta: dict[str, Any]) -> str | None:
    if isinstance(meta.get("model_hub_id"), str):
        return meta["model_hub_id"]
    return KNOWN_HUB_MODELS.get(str(meta.get("model_name", "")).lower())


@dataclass
class _Row:
    info: CheckpointInfo
    meta: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    rel: str


def model_card(root: Path, repo_id: str) -> tuple[str, list[CheckpointInfo]]:
    """README.md text for the tree at `root`: front matter, a table of every final SAE, the loss curves."""
    from huggingface_hub import ModelCardData

    infos = list_checkpoints(root)
    finals = [i for i in infos if i.step is None]
    if not finals:
        raise PushError(f"{root} holds no SAE checkpoint (no folder with cfg.json and sae_weights.safetensors)")
    rows = []
    for info in finals:
        meta = _read(info.path / layout.CFG_FILE).get("metadata") or {}
        rows.append(_Row(info, meta, _read(info.path / METRICS_FILE), _read(info.path / TRAINING_CONFIG_FILE),
                         info.path.relative_to(root).as_posix()))
    hub_models = sorted({m for r in rows if (m := _hub_model_id(r.meta))})
    model_names = sorted({r.info.model_name for r in rows})
    hooks = sorted({r.info.hook_name for r in rows})
    data = ModelCardData(
        library_name="saelens",
        license=DATASET_LICENSE,
        base_model=hub_models or None,
        datasets=[DATASET_ID],
        tags=["sparse-autoencoder", "saelens", "interpretability", "tinystories"],
        model_names=model_names,
        hook_names=hooks,
    )
    n_steps = len(infos) - len(finals)
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# Sparse autoencoders on TinyStories language models ({repo_id})", "",
        f"{len(finals)} sparse autoencoders (SAEs) trained on the residual stream of "
        + ", ".join(f"`{m}`" for m in model_names) + " at " + ", ".join(f"`{h}`" for h in hooks)
        + " (TransformerLens hook names; `blocks.L.hook_resid_post` is Hugging Face `hidden_states[L+1]`), "
        "in the SAELens v6 folder format: `<model>/<hook>/<architecture>/F<d_sae>/` holds `cfg.json`, "
        "`sae_weights.safetensors`, `metrics.json`, `training_config.json`, `loss_curves.csv` and "
        "`latent_stats.safetensors` (per-latent firing frequency, histograms and top-activating contexts)."
        + (f" {n_steps} intermediate checkpoints (in all) sit in `steps/<step>/` below their SAEs." if n_steps else ""),
        "",
        "## Checkpoints", "",
        "Metrics on held-out TinyStories stories (every 10th story); CE score = (CE with zeros spliced in - CE "
        "with the SAE) / (CE with zeros - clean CE).", "",
        "| model | hook | run | F | L0 | var. explained | MSE | cos | CE clean | CE with SAE | CE score | KL | "
        "dead | dense | steps | tokens | eval tokens | path |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        m, t = r.metrics, r.training
        lines.append("| " + " | ".join([
            r.info.model_name, f"`{r.info.hook_name}`", r.info.run, str(r.info.d_sae), _fmt(m.get(layout.L0)),
            _fmt(m.get(layout.VARIANCE_EXPLAINED)), _fmt(m.get(layout.MSE)), _fmt(m.get(layout.COSSIM)),
            *[_fmt(m.get(key)) for key in (layout.CE_LOSS_WITHOUT_SAE, layout.CE_LOSS_WITH_SAE, layout.CE_LOSS_SCORE,
                                           layout.KL_DIV_WITH_SAE, layout.FRAC_DEAD, layout.FRAC_DENSE)],
            _fmt(t.get("steps")), _fmt(t.get("tokens_seen")), _fmt(m.get(layout.N_TOKENS)), f"`{r.rel}`",
        ]) + " |")
    plots = sorted({p for r in rows if (p := r.info.path.parent / layout.LOSS_CURVES_PLOT).is_file()})
    if plots:
        lines += ["", "## Loss curves", "",
                  "Reconstruction loss per element (in the training's normalised units), L0 and dead fraction "
                  "against training tokens, one line per width F (`loss_curves.csv` beside each plot, and in each SAE "
                  "folder).", ""]
        for p in plots:
            rel = p.relative_to(root).as_posix()
            lines += [f"### `{p.parent.relative_to(root).as_posix()}`", "", f"![loss curves]({rel})", ""]
    lines += [
        "", "## Usage", "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from sae_lens import SAE",
        "",
        f'root = snapshot_download("{repo_id}")',
        f'sae = SAE.load_from_disk(f"{{root}}/{rows[0].rel}")',
        "```", "",
        "This project's own loader (`sae.checkpoint.load_sae`) reads the same folders. The weights are those the "
        "forward pass uses on raw residual-stream vectors (any training-time input scaling is folded in).", "",
        "## Data and licence", "",
        "Trained on stories of the TinyStories dataset (Eldan & Li 2023, \"TinyStories: How Small Can Language "
        "Models Be and Still Speak Coherent English?\", https://huggingface.co/datasets/roneneldan/TinyStories), "
        "licensed CDLA-Sharing-1.0; these checkpoints, derived from it, are shared under the same licence.", "",
    ]
    return "\n".join(lines), finals


def plan_upload(root: str | Path, repo_id: str) -> UploadPlan:
    root = Path(root)
    if not root.is_dir():
        raise PushError(f"{root} is not a folder")
    readme, finals = model_card(root, repo_id)
    return UploadPlan(collect_files(root), readme, finals)


def write_dry_run(plan: UploadPlan, outdir: str | Path, root: Path) -> Path:
    """Copy exactly the files the upload would contain (and the README) into the new folder `outdir`."""
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()):
        raise PushError(f"--dry-run folder {outdir} exists and is not empty")
    if outdir.resolve().is_relative_to(root.resolve()):
        raise PushError(f"--dry-run folder {outdir} lies inside the tree being pushed")
    outdir.mkdir(parents=True, exist_ok=True)
    for rel, src in plan.files:
        dest = outdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    (outdir / "README.md").write_text(plan.readme)
    return outdir


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def push(plan: UploadPlan, repo_id: str, private: bool = False, timeout: float = 5.0) -> str:
    """Upload the plan as one commit; returns the repo URL. PushError (with the reason) on any failure."""
    from huggingface_hub import CommitOperationAdd, HfApi

    token = _token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    if not hub_reachable(timeout):
        raise PushError(f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached from this machine (offline?)")
    api = HfApi(endpoint=hub_endpoint(), token=token)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(src)) for rel, src in plan.files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.readme.encode()))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, ops, commit_message=f"Upload {len(plan.saes)} SAE checkpoints")
    except Exception as err:  # HTTP, auth, network: report the reason, never the token
        msg = str(err).replace(token, "***")
        raise PushError(f"{type(err).__name__}: {msg}") from None
    return str(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training push",
        description="Upload a checkpoints tree (SAELens-format SAE folders) to the Hugging Face Hub with a model "
        "card. Token: $HF_TOKEN or the `hf auth login` cache.",
    )
    parser.add_argument("path", type=Path, help="root of the checkpoints tree, e.g. checkpoints/")
    parser.add_argument("--repo-id", required=True, help="Hub model repo, USER/NAME")
    parser.add_argument("--dry-run", metavar="OUTDIR", type=Path, default=None,
                        help="write the exact folder that would be uploaded to OUTDIR instead of uploading")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f"--repo-id must look like USER/NAME, got {args.repo_id!r}")
    try:
        plan = plan_upload(args.path, args.repo_id)
        if args.dry_run is not None:
            out = write_dry_run(plan, args.dry_run, args.path)
            print(f"dry run: {len(plan.files) + 1} files ({len(plan.saes)} SAEs) written to {out}")
            return
        print(f"uploading {len(plan.files) + 1} files ({len(plan.saes)} SAEs) to {args.repo_id} ...")
        url = push(plan, args.repo_id, private=args.private)
        print(f"done: {url}")
    except PushError as err:
        print(f"error: push to {args.repo_id} failed: {err}. Local files are untouched.", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
