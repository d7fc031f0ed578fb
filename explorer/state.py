"""The app's state shared by all sessions: catalog, model cache, cosine cache, startup notices, and the
request sequence numbers that keep a late, older result from overwriting a newer one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from explorer.cache import ModelCache
from explorer.catalog import CheckpointCatalog, Entry
from explorer.errors import AnalysisError
from explorer.links import CosineCache
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel

log = logging.getLogger("sae-explorer")

QUERY_KEYS = ("text", "model", "hook", "run", "F", "step", "latent")
"""URL query parameters of a deep link."""


class Sequencer:
    """The newest request number seen per (session, channel): a result whose number is older is stale.

    The browser numbers its requests in the order the user made them, so a page-load analysis that
    reaches the server late still counts as older than the user's first one.
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def begin(self, session: str, channel: str, seq: float | None) -> float:
        """Record a request; returns its number (requests without one count as newest)."""
        with self._lock:
            key = (session, channel)
            current = self._latest.get(key, float("-inf"))
            n = current + 1 if seq is None else float(seq)
            self._latest[key] = max(current, n)
            return n

    def is_latest(self, session: str, channel: str, seq: float) -> bool:
        with self._lock:
            return seq >= self._latest.get((session, channel), float("-inf"))


class Explorer:
    """Everything the handlers share; one per process."""

    def __init__(self, catalog: CheckpointCatalog, notices: list[str], cache: ModelCache | None = None) -> None:
        self.catalog = catalog
        self.notices = list(notices) + [f"Checkpoint {f.path} was skipped: {f.reason}" for f in catalog.failures]
        self.cache = cache or ModelCache()
        self.cosines = CosineCache()
        self.sequencer = Sequencer()

    def load(self, entry: Entry) -> tuple[BaseModel, SparseAutoencoder]:
        bm = self.cache.base_model(self.catalog.base_model_source(entry))
        return bm, self.cache.sae(entry.info.path)

    def entry(self, model: str | None, hook: str | None, run: str | None, f: str | int | None,
              step: str | None) -> Entry:
        """The selected checkpoint, or AnalysisError saying what is missing / unknown."""
        if not model or not hook or not run or not f:
            raise AnalysisError("No checkpoint selected. " + (
                "" if self.catalog.entries else "No language-model checkpoints are available (see the banner above)."))
        try:
            width = int(f)
        except (TypeError, ValueError) as err:
            raise AnalysisError(f"Width F must be a whole number, not {f!r}.") from err
        return self.catalog.find(model, hook, run, width, parse_step(step))

    def warm(self) -> None:
        """Load the default checkpoint in the background, so the first analysis is fast."""
        entry = self.catalog.default()
        if entry is None:
            return

        def run() -> None:
            try:
                bm, _ = self.load(entry)
                self.cache.token_strings(bm)
            except AnalysisError as err:
                log.warning("could not preload %s: %s", entry.info.label, err)

        threading.Thread(target=run, daemon=True).start()

    def banner(self) -> str:
        lines = [f"⚠️ {n}" for n in self.notices]
        if not self.catalog.entries:
            roots = ", ".join(f"`{s.root}`" for s in self.catalog.sources) or "none"
            lines.append(
                "**No language-model SAE checkpoints found** (looked in " + roots + "). Train them with "
                "`python -m training base-lm` and then `python -m training tinystories`, or download trained ones "
                "with `python app.py --hub-repo <user>/<repo>` (or env `SAE_HUB_REPOS`)."
            )
        return "\n\n".join(lines)


def step_choices(steps: list[int | None]) -> list[tuple[str, str]]:
    return [("final", "final") if s is None else (f"step {s:,}", str(s)) for s in steps]


def parse_step(value: str | None) -> int | None:
    if value in (None, "", "final"):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise AnalysisError(f"Training step must be 'final' or a whole number, not {value!r}.") from err


@dataclass
class DeepLink:
    """What a URL's query parameters ask to restore (None: not given)."""

    text: str | None = None
    model: str | None = None
    hook: str | None = None
    run: str | None = None
    f: str | None = None
    step: str | None = None
    latent: int | None = None


def parse_deep_link(params: Mapping[str, str]) -> tuple[DeepLink, list[str]]:
    """A DeepLink from query parameters, and a notice per parameter that could not be used."""
    notices = []
    latent = params.get("latent")
    lat: int | None = None
    if latent not in (None, ""):
        try:
            lat = int(latent)
            if lat < 0:
                raise ValueError
        except ValueError:
            notices.append(f"Link parameter latent={latent!r} is not a latent index; ignored.")
            lat = None
    return DeepLink(params.get("text") or None, params.get("model") or None, params.get("hook") or None,
                    params.get("run") or None, params.get("F") or None, params.get("step") or None, lat), notices
