"""Checkpoints of a base-model run: weights and AdamW moments in safetensors, step, RNG and log in JSON."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sae.checkpoint import write_folder_atomically

CHECKPOINT_PREFIX = "step-"
BEST_WEIGHTS = "best.safetensors"
STATE_FILE = "state.json"


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as flat tensors (`state.<param index>.<key>`) plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().contiguous().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})



def save_checkpoint(run_dir: Path, step: int, model, opt, tok, state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file, save_model

    target = run_dir / f"{CHECKPOINT_PREFIX}{step:06d}"

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, groups = optimizer_tensors(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        tok.save_pretrained(tmp / "tokenizer")
        full = dict(state, optimizer_param_groups=groups, torch_rng=encode_rng(torch.get_rng_state()))
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=1))

    write_folder_atomically(target, write, keep=())
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json) of run_dir, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_best(run_dir: Path, model) -> None:
    from safetensors.torch import save_model

    tmp = run_dir / f".best.safetensors.tmp-{os.getpid()}"
    save_model(model, str(tmp))
    os.replace(tmp, run_dir / BEST_WEIGHTS)

