"""An activation cache on disk: safetensors shards, memory-mapped when read, and a manifest written last.

```
<cache>/shard_00000.safetensors   activations [n, d_model] (storage dtype), chunk_lengths [n_chunks] (int64)
<cache>/manifest.json             model, hook, context size, dataset, dtype, token count, shards + sha256
```
A shard holds whole harvest chunks (`training.streaming`), in stream order; its file appears under its
final name only once completely written (temporary name, fsync, rename), and the manifest, written last
the same way, is what makes a cache valid: an interrupted write leaves no manifest, and a reader
refuses a folder without one, a shard whose size or sha256 differs, or a missing shard.

`CacheActivations` is a ChunkSource (training.shuffle_buffer): rank r of W reads the chunks whose index
is r mod W, as the story stream does, so training from a cache sees what streaming would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from training.shuffle_buffer import ActivationChunk

MANIFEST_FILE = "manifest.json"
CACHE_FORMAT = 1
SHARD_PATTERN = "shard_{:05d}.safetensors"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CacheError(ValueError):
    """The folder is not a complete, intact activation cache; the message says what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, fsync, then rename to `path`: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class CacheWriter:
    """Appends harvest chunks; writes a shard every `shard_tokens` tokens; `finish` writes the manifest."""

    folder: Path
    d_model: int
    dtype: str = "fp32"
    shard_tokens: int = 1 << 20

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown cache dtype {self.dtype!r}: choose from {sorted(STORAGE_DTYPES)}")
        self.folder = Path(self.folder)
        self.shards: list[dict[str, Any]] = []
        self._parts: list[Tensor] = []
        self._lengths: list[int] = []
        self.n_tokens = self.n_chunks = 0

    def start(self, overwrite: bool = False) -> None:
        """Create the folder; refuse a finished cache unless `overwrite`; drop leftovers of an interrupted write."""
        if (self.folder / MANIFEST_FILE).exists() and not overwrite:
            raise FileExistsError(f"{self.folder} already holds an activation cache: pass --overwrite to replace it")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST_FILE).unlink(missing_ok=True)
        for old in [*self.folder.glob("shard_*.safetensors"), *self.folder.glob(".*.partial")]:
            old.unlink()

    def add(self, vectors: Tensor) -> None:
        """Float[Tensor, "n d_model"]: one harvest chunk."""
        if vectors.ndim != 2 or vectors.shape[1] != self.d_model:
            raise ValueError(f"chunk of shape {tuple(vectors.shape)}, expected [n, {self.d_model}]")
        self._parts.append(vectors.detach().to("cpu", STORAGE_DTYPES[self.dtype]))
        self._lengths.append(len(vectors))
        if sum(self._lengths) >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._lengths:
            return
        path = self.folder / SHARD_PATTERN.format(len(self.shards))
        tensors = {"activations": torch.cat(self._parts).contiguous(),
                   "chunk_lengths": torch.tensor(self._lengths, dtype=torch.int64)}
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": str(CACHE_FORMAT)}))
        n = int(tensors["chunk_lengths"].sum())
        self.shards.append({"file": path.name, "n_tokens": n, "n_chunks": len(self._lengths),
                            "first_chunk": self.n_chunks, "bytes": path.stat().st_size, "sha256": _sha256(path)})
        self.n_tokens += n
        self.n_chunks += len(self._lengths)
        self._parts, self._lengths = [], []

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        """Write the last shard and the manifest (`info`: model, hook, context, dataset, ...); returns it."""
        self._flush()
        if not self.n_tokens:
            raise ValueError("no activations to cache")
        manifest = {"format": CACHE_FORMAT, **info, "d_model": self.d_model, "dtype": self.dtype,
                    "n_tokens": self.n_tokens, "n_chunks": self.n_chunks, "shards": self.shards,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        text = json.dumps(manifest, indent=2) + "\n"
        _atomic_write(self.folder / MANIFEST_FILE, lambda tmp: tmp.write_text(text))
        return manifest


def write_cache(folder: Path, chunks: Iterable[Tensor], d_model: int, info: dict[str, Any], dtype: str = "fp32",
                shard_tokens: int = 1 << 20, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Every chunk of `chunks` (Float[Tensor, "n d_model"] each) into a cache at `folder`; returns the manifest."""
    writer = CacheWriter(Path(folder), d_model, dtype, shard_tokens)
    writer.start(overwrite)
    with tqdm(desc="cache", unit="tok", unit_scale=True, disable=not progress) as bar:
        for vectors in chunks:
            writer.add(vectors)
            bar.update(len(vectors))
    return writer.finish(info)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache, after checking that every shard is there with its recorded size."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CacheError(f"activation cache {folder} does not exist: write one with `python -m training "
                         f"cache-activations --out {folder}`")
    if not path.is_file():
        raise CacheError(f"{folder} has no {MANIFEST_FILE}: its write was interrupted or it is not an activation "
                         f"cache. Run `python -m training cache-activations --out {folder} --overwrite` again")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path} is not valid JSON ({err}): write the cache again") from err
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path}: unknown cache format {manifest.get('format')!r} (this version reads {CACHE_FORMAT})")
    for shard in manifest["shards"]:
        shard_path = folder / shard["file"]
        if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
            raise CacheError(f"{shard_path} is missing or has the wrong size: the cache is damaged; write it again")
    return manifest


class CacheActivations:
    """ActivationChunks of a cache for rank `rank` of `world_size`, epoch after epoch (memory-mapped reads)."""

    def __init__(self, folder: str | Path, rank: int = 0, world_size: int = 1, verify: bool = True):
        self.folder, self.rank, self.world_size, self.verify = Path(folder), rank, world_size, verify
        self.manifest = read_manifest(self.folder)
        if self.manifest["n_chunks"] < world_size:
            raise CacheError(f"{self.folder}: {self.manifest['n_chunks']} chunks are too few for {world_size} ranks")
        self.epoch, self.chunk = 0, 0
        self._verified: set[str] = set()

    def _open(self, shard: dict[str, Any]):
        path = self.folder / shard["file"]
        if self.verify and shard["file"] not in self._verified:
            if _sha256(path) != shard["sha256"]:
                raise CacheError(f"{path}: sha256 differs from the manifest's: the shard is corrupt; write the cache "
                                 f"again")
            self._verified.add(shard["file"])
        return safe_open(str(path), framework="pt")

    def __iter__(self) -> Iterator[ActivationChunk]:
        while True:
            for shard in self.manifest["shards"]:
                first, n = shard["first_chunk"], shard["n_chunks"]
                if first + n <= self.chunk:
                    continue
                with self._open(shard) as fh:
                    lengths = fh.get_tensor("chunk_lengths").tolist()
                    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
                    rows = fh.get_slice("activations")  # reads only the requested rows from the mapped file
                    for j in range(self.chunk - first, n):
                        self.chunk = first + j + 1
                        if (first + j) % self.world_size == self.rank:
                            yield ActivationChunk(self.epoch, rows[starts[j]: starts[j + 1]].float())
            self.epoch, self.chunk = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cache", "epoch": self.epoch, "chunk": self.chunk, "rank": self.rank,
                "world_size": self.world_size, "n_tokens": self.manifest["n_tokens"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "cache":
            raise ValueError(f"the checkpoint was trained from {state.get('kind')!r} data, not an activation cache")
        if (state["rank"], state["world_size"], state["n_tokens"]) != (self.rank, self.world_size,
                                                                        self.manifest["n_tokens"]):
            raise ValueError(f"the checkpoint's cache position (rank {state['rank']} of {state['world_size']}, "
                             f"{state['n_tokens']} tokens) does not fit this cache and launch")
        self.epoch, self.chunk = int(state["epoch"]), int(state["chunk"])
