"""Loads each base model, SAE and latent-stats file once per process (least-recently-used ones dropped)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from explorer.errors import AnalysisError
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel, load_base_model
from sae.checkpoint import CheckpointError, load_sae
from sae.latent_stats import LATENT_STATS_FILE, LatentStats


class StatsLoad(NamedTuple):
    stats: LatentStats | None
    problem: str
    """Why `stats` is None, for the user ('' when it loaded)."""


def default_device() -> str:
    """'cuda' when a GPU is visible (a Space with hardware), else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(n: int) -> int:
    """Set torch's CPU threads for the process (the app: cores / concurrent requests); returns the count."""
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


class ModelCache:
    """Loads each base model, SAE and latent-stats file once; least-recently-used ones are dropped."""

    def __init__(self, max_models: int = 2, max_saes: int = 32, device: str | None = None) -> None:
        self.max_models, self.max_saes = max_models, max_saes
        self.device = device or default_device()
        self._models: OrderedDict[str, BaseModel] = OrderedDict()
        self._saes: OrderedDict[str, SparseAutoencoder] = OrderedDict()
        self._stats: OrderedDict[str, StatsLoad] = OrderedDict()
        self._strings: dict[str, list[str]] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}

    @staticmethod
    def _key(path: str | Path) -> str:
        s = str(path)
        if s.startswith("random:"):
            return s
        p = Path(s).expanduser()
        return str(p.resolve()) if p.exists() else s

    def _get(self, store: OrderedDict, key: str, limit: int, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
            key_lock = self._key_locks.setdefault(f"{id(store)}:{key}", threading.Lock())
        with key_lock:  # concurrent first requests load once
            with self._lock:
                if key in store:
                    store.move_to_end(key)
                    return store[key]
            value = load()
            with self._lock:
                store[key] = value
                while len(store) > limit:
                    store.popitem(last=False)
            return value

    def base_model(self, source: str) -> BaseModel:
        key = self._key(source)

        def load() -> BaseModel:
            try:
                return load_base_model(source if source.startswith("random:") else key, device=self.device)
            except Exception as err:  # any loading failure is shown to the user
                raise AnalysisError(f"Could not load the base model {source!r}: {err}") from err

        return self._get(self._models, key, self.max_models, load)

    def sae(self, folder: str | Path) -> SparseAutoencoder:
        key = self._key(folder)

        def load() -> SparseAutoencoder:
            try:
                return load_sae(key, device=self.device)
            except CheckpointError as err:
                raise AnalysisError(f"Could not load the SAE: {err}") from err

        return self._get(self._saes, key, self.max_saes, load)

    def latent_stats(self, folder: str | Path, d_sae: int | None = None) -> StatsLoad:
        """The held-out statistics saved beside an SAE, or why there are none (missing, corrupt, mismatched)."""
        key = self._key(folder)

        def load() -> StatsLoad:
            try:
                stats = LatentStats.load(key)
            except ValueError as err:
                return StatsLoad(None, f"the statistics file is unreadable: {err}")
            if stats is None:
                return StatsLoad(None, f"this checkpoint has no {LATENT_STATS_FILE} (the training run's evaluation "
                                       "writes it)")
            return StatsLoad(stats, "")

        got = self._get(self._stats, key, self.max_saes, load)
        if got.stats is not None and d_sae is not None and got.stats.d_sae != d_sae:
            return StatsLoad(None, f"{LATENT_STATS_FILE} describes {got.stats.d_sae} latents, but the SAE has {d_sae}")
        return got

    def token_strings(self, bm: BaseModel) -> list[str]:
        """The decoded text of every vocabulary id of a model (computed once per model)."""
        with self._lock:
            cached = self._strings.get(bm.source)
        if cached is not None:
            return cached
        tok = bm.tokenizer
        strings = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
        with self._lock:
            self._strings[bm.source] = strings
        return strings

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._saes.clear()
            self._stats.clear()
            self._strings.clear()
