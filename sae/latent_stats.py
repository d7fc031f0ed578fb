"""Per-latent statistics stored beside a checkpoint so the app can explain latents without the model.

`latent_stats.safetensors` in an SAE folder holds, for each of the F latents, its firing
frequency, an activation histogram, and its top-activating contexts on the validation stories
(token windows as ids of the base model's tokenizer, with the activation at every window token).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae.layout import LATENT_STATS_FILE


@dataclass
class LatentStats:
    freq: Tensor
    """[F] fraction of validation tokens on which the latent fires (> 0)."""
    max_act: Tensor
    """[F] largest activation seen."""
    hist_edges: Tensor
    """[n_bins + 1] shared bin edges of the activation histograms (over positive activations)."""
    hist_counts: Tensor
    """[F, n_bins] counts of positive activations per bin."""
    top_acts: Tensor
    """[F, n_top] activation at the centre token of each top context, descending (0 where unused)."""
    top_token_ids: Tensor
    """[F, n_top, window] token ids of each context window (-1 pads windows cut by a story edge)."""
    top_window_acts: Tensor
    """[F, n_top, window] the latent's activation on every token of the window (float16)."""
    top_center: Tensor
    """[F, n_top] index inside the window of the token with activation top_acts."""
    n_tokens: int = 0
    """Validation tokens the statistics were computed on."""

    @property
    def d_sae(self) -> int:
        return int(self.freq.shape[0])

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / LATENT_STATS_FILE
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self) if f.name != "n_tokens"}
        save_file(tensors, str(path), metadata={"n_tokens": str(self.n_tokens)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> LatentStats | None:
        """The stats in `folder`, or None when the folder has none; ValueError naming the file if corrupt."""
        path = Path(folder) / LATENT_STATS_FILE
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                n_tokens = int((fh.metadata() or {}).get("n_tokens", 0))
            stats = cls(**tensors, n_tokens=n_tokens)
        except (SafetensorError, OSError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is corrupt or incomplete: {err}") from err
        return stats

    def validate(self, d_sae: int) -> None:
        if self.d_sae != d_sae:
            raise ValueError(f"latent stats are for {self.d_sae} latents, the SAE has {d_sae}")


def empty_histogram_edges(max_value: float, n_bins: int = 40) -> Tensor:
    """Log-spaced edges from max_value/1e4 to max_value: activations span orders of magnitude."""
    top = max(float(max_value), 1e-6)
    return torch.logspace(torch.log10(torch.tensor(top / 1e4)), torch.log10(torch.tensor(top)), n_bins + 1)
