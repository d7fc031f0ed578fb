"""The data side of a trainer checkpoint: every rank's buffer position (JSON) and contents (tensors).

Rank 0 alone writes: each rank's `state_dict()` and `state_tensors()` (a streaming buffer's held vectors,
the rest of its last chunk, its RNG) are gathered to rank 0, which stores the JSON part in every SAE's
trainer_state.json and the tensors once, in `data_state.safetensors` of the first SAE's step folder
(keys `rank<r>.<name>`). On resume every rank reads its own part back, so each buffer continues exactly
where it stopped, without re-reading the stream before that point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import load_file, save_file
from torch import Tensor

from sae.layout import TRAINER_DATA_STATE as DATA_STATE_FILE
from training.distributed import DistContext


class DataState(NamedTuple):
    json: dict[str, Any]
    """{"world_size": W, "ranks": [state_dict of rank 0, 1, ...]} (or a plain buffer's state_dict)."""
    tensors: dict[str, Tensor]


def gather_data_state(buffer: Any, dist: DistContext) -> DataState | None:
    """Every rank's buffer state, on rank 0 (None on the other ranks). Collective: all ranks call it."""
    tensors = buffer.state_tensors() if hasattr(buffer, "state_tensors") else {}
    gathered = dist.gather_objects((buffer.state_dict(), {k: v.cpu() for k, v in tensors.items()}))
    if gathered is None:
        return None
    if not tensors and dist.world_size == 1:  # a buffer without tensors keeps its plain state format
        return DataState(gathered[0][0], {})
    merged = {f"rank{r}.{k}": v.contiguous() for r, (_, t) in enumerate(gathered) for k, v in t.items()}
    return DataState({"world_size": dist.world_size, "ranks": [s for s, _ in gathered]}, merged)


def write_data_tensors(folder: Path, state: DataState) -> None:
    if state.tensors:
        save_file(state.tensors, str(folder / DATA_STATE_FILE))


def restore_data_state(buffer: Any, dist: DistContext, saved: dict[str, Any], folder: Path) -> None:
    """Load this rank's part of `saved` (trainer_state.json's "buffer") and of `folder`'s tensors."""
    if "ranks" not in saved:
        buffer.load_state_dict(saved)
        return
    if saved["world_size"] != dist.world_size:
        raise ValueError(f"the checkpoint in {folder} was written by {saved['world_size']} processes; resume it with "
                         f"the same number (now {dist.world_size}), or start again with --overwrite")
    path = folder / DATA_STATE_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: the data buffer of this checkpoint cannot be restored")
    prefix = f"rank{dist.rank}."
    tensors = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    buffer.load_state_dict(saved["ranks"][dist.rank], tensors)
