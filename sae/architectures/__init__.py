"""One module per architecture, behind a registry keyed by the SAELens `architecture` string."""

from __future__ import annotations

from sae.architectures.base import SAEOutput, SparseAutoencoder, matmul_inst
from sae.architectures.gated import GatedSAE
from sae.architectures.jumprelu import JumpReLUSAE
from sae.architectures.standard import StandardSAE
from sae.architectures.topk import TopKSAE
from sae.config import SAEConfig

REGISTRY: dict[str, type[SparseAutoencoder]] = {
    "standard": StandardSAE,
    "gated": GatedSAE,
    "jumprelu": JumpReLUSAE,
    "topk": TopKSAE,
}
"""The one list of architectures: every other list (configs, CLIs, defaults) is checked against it by
tests/sae/test_registry.py."""
ARCHITECTURES = tuple(REGISTRY)


def build_sae(cfg: SAEConfig, seed: int | None = None) -> SparseAutoencoder:
    """A freshly initialised SAE of `cfg.architecture`."""
    return REGISTRY[cfg.architecture](cfg, seed=seed)


__all__ = [
    "ARCHITECTURES",
    "REGISTRY",
    "GatedSAE",
    "JumpReLUSAE",
    "SAEOutput",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "build_sae",
    "matmul_inst",
]
