"""Latents linked across widths: a latent's best decoder-direction matches in the other SAEs of one run.

For latent i of SAE A and every other width B of the same base model, hook and run, the matches are the
latents j of B with the largest cosine between decoder rows W_dec_A[i] and W_dec_B[j]. The cosine matrix
of a pair of checkpoints is computed once and cached (`CosineCache`). Each match's activations on the
user's text come from one base-model pass shared by every SAE (`link_latent`), so a user sees an F = 100
latent split into several at F = 1000, or find nothing like it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from explorer.analyze import TextAnalysis, compare_saes
from explorer.errors import AnalysisError
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel

CLOSE_COSINE = 0.8
"""A match at least this close, with no second one above SPLIT_COSINE, is a close match."""
SPLIT_COSINE = 0.5
"""Two or more matches at least this close: the latent is split among them."""
RELATED_COSINE = 0.3
"""Below this nothing is alike; between it and CLOSE_COSINE (one match) the latent is spread."""
N_MATCHES = 5
"""Matches listed per width."""

VERDICTS = {
    "close match": "one latent with nearly the same decoder direction",
    "split": "several latents share the direction (feature splitting / merging)",
    "spread": "only partly similar latents: the direction is spread over others",
    "nothing alike": f"no latent with decoder cosine ≥ {RELATED_COSINE}",
}


class Match(NamedTuple):
    latent: int
    cosine: float


@dataclass
class WidthLinks:
    """The matches of one latent in one other SAE."""

    label: str
    """The other checkpoint (e.g. 'F=1000')."""
    d_sae: int
    matches: list[Match]
    verdict: str
    """One of VERDICTS."""
    acts: Tensor
    """[T, len(matches)] each match's activations on the user's text."""


@dataclass
class LinksResult:
    latent: int
    d_sae: int
    analysis: TextAnalysis
    """The selected SAE on the user's text (its latents give the original strip)."""
    widths: list[WidthLinks]

    @property
    def original_acts(self) -> Tensor:
        """[T] the selected latent on the text."""
        return self.analysis.latents[:, self.latent]


def decoder_cosines(a: SparseAutoencoder, b: SparseAutoencoder) -> Tensor:
    """[F_a, F_b] cosine between every decoder row of `a` and every decoder row of `b`."""
    with torch.inference_mode():
        wa = a.W_dec.detach().float().cpu()
        wb = b.W_dec.detach().float().cpu()
        wa = wa / wa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        wb = wb / wb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return wa @ wb.T


class CosineCache:
    """`decoder_cosines` per (checkpoint, checkpoint) pair, least-recently-used pairs dropped."""

    def __init__(self, max_pairs: int = 16) -> None:
        self.max_pairs = max_pairs
        self._store: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0
        """How many matrices were computed (not served from the cache)."""

    def get(self, key_a: str, a: SparseAutoencoder, key_b: str, b: SparseAutoencoder) -> Tensor:
        key = (key_a, key_b)
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                return self._store[key]
        cos = decoder_cosines(a, b)
        with self._lock:
            self.computed += 1
            self._store[key] = cos
            while len(self._store) > self.max_pairs:
                self._store.popitem(last=False)
        return cos


def best_matches(cos_row: Tensor, n: int = N_MATCHES) -> list[Match]:
    """The `n` latents of the other SAE with the largest cosine, best first."""
    k = min(int(n), cos_row.shape[0])
    top = torch.topk(cos_row, k)
    return [Match(int(i), float(v)) for v, i in zip(top.values, top.indices)]


def verdict(matches: Sequence[Match]) -> str:
    """close match / split / spread / nothing alike, from the cosines of the matches (best first)."""
    cosines = [m.cosine for m in matches]
    best = cosines[0] if cosines else 0.0
    strong = sum(c >= SPLIT_COSINE for c in cosines)
    if best >= CLOSE_COSINE and strong < 2:
        return "close match"
    if strong >= 2:
        return "split"
    if best >= RELATED_COSINE:
        return "spread"
    return "nothing alike"


def link_latent(
    bm: BaseModel, sae: SparseAutoencoder, key: str, others: Sequence[tuple[str, str, SparseAutoencoder]],
    layer: str, text: str, latent: int, cache: CosineCache, n: int = N_MATCHES,
) -> LinksResult:
    """`latent` of `sae` (checkpoint `key`) matched in each of `others` = (label, key, sae), with activations
    of every match on `text` (one base-model pass; downstream losses skipped)."""
    latent = int(latent)
    if not 0 <= latent < sae.cfg.d_sae:
        raise AnalysisError(f"Latent {latent} does not exist: this SAE has latents 0..{sae.cfg.d_sae - 1}.")
    saes = [sae, *(o for _, _, o in others)]
    analyses = compare_saes(bm, saes, layer, text, downstream=False)
    widths = []
    for (label, other_key, other), a in zip(others, analyses[1:]):
        matches = best_matches(cache.get(key, sae, other_key, other)[latent], n)
        acts = a.latents[:, [m.latent for m in matches]]
        widths.append(WidthLinks(label, other.cfg.d_sae, matches, verdict(matches), acts))
    return LinksResult(latent, sae.cfg.d_sae, analyses[0], widths)
