"""SAEConfig: the architecture-level settings of one SAE, and its SAELens v6 `cfg.json` form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Keys SAELens v6 writes at the top level of cfg.json; everything of ours goes under "metadata".
_SAELENS_KEYS = ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                 "reshape_activations")


@dataclass
class SAEConfig:
    architecture: str
    """A key of `sae.architectures.REGISTRY` (standard, gated, jumprelu, topk)."""
    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents F."""
    n_inst: int | None = None
    """Leading instance dimension: n SAEs trained as one batched module (toy models); None for one SAE."""
    sparsity_coeff: float = 0.0
    """Weight of the sparsity term (L1 for standard, L1 on the gate for gated, L0 for jumprelu)."""
    tied: bool = False
    """standard only: decoder is the transposed encoder."""
    k: int | None = None
    """topk only: latents kept per input."""
    aux_k: int | None = None
    """topk only: dead latents used by the AuxK loss (None or 0 disables AuxK)."""
    aux_coeff: float = 1 / 32
    """Weight of the auxiliary loss (AuxK for topk); gated's auxiliary loss always has weight 1."""
    aux_relu: bool = True
    """topk only: ReLU the AuxK activations (False: the dead latents' raw pre-activations, as SAELens)."""
    aux_scale_dead: bool = False
    """topk only: scale the AuxK loss by min(dead latents / aux_k, 1) (SAELens), so a few dead latents
    weigh little."""
    rescale_acts_by_decoder_norm: bool = False
    """topk only: select and decode as if the decoder rows were unit (pre-activations times row norm, rows
    divided by it; SAELens's option of that name), for an unconstrained decoder. Unit rows: no change."""
    l1_decoder_norm: bool = False
    """standard only: weight each latent's L1 term by its decoder row's norm (for an unconstrained decoder;
    Anthropic's April 2024 recipe). With unit decoder rows it changes nothing."""
    ste_epsilon: float = 0.001
    """jumprelu only: width of the rectangle kernel of the straight-through estimators."""
    init_threshold: float = 0.001
    """jumprelu only: initial threshold theta."""
    dtype: str = "float32"
    """Parameter dtype."""
    device: str = "cpu"
    """Device the weights were saved from (informational, as in SAELens)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance: model_name, hook_name, hf_hidden_states_index, prepend_bos, context_size, dataset_path, ..."""

    def __post_init__(self) -> None:
        from sae.architectures import REGISTRY  # the one list of architectures (it imports this module)

        if self.architecture not in REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {tuple(REGISTRY)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture == "topk":
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"topk needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.tied and self.architecture != "standard":
            raise ValueError("tied weights are supported for the standard architecture only")

    @property
    def free_decoder(self) -> bool:
        """Trained with unconstrained decoder rows whose norms are factored out of the latents (folded on save)."""
        return self.l1_decoder_norm or self.rescale_acts_by_decoder_norm

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)

    def to_saelens_dict(self) -> dict[str, Any]:
        """The cfg.json of one (instance-free) SAE, in the exact shape SAELens v6 writes."""
        out: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        extras = {
            "sparsity_coeff": self.sparsity_coeff,
            "tied": self.tied,
            "aux_k": self.aux_k,
            "aux_coeff": self.aux_coeff,
            "aux_relu": self.aux_relu,
            "aux_scale_dead": self.aux_scale_dead,
            "l1_decoder_norm": self.l1_decoder_norm,
            "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm,
            "ste_epsilon": self.ste_epsilon,
            "init_threshold": self.init_threshold,
        }
        out["metadata"] = {**self.metadata, "sae_training": extras}
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = False
        out["architecture"] = self.architecture
        return out

    @classmethod
    def from_saelens_dict(cls, cfg: dict[str, Any]) -> SAEConfig:
        """Inverse of `to_saelens_dict`; also reads folders SAELens itself wrote."""
        missing = [k for k in ("architecture", "d_in", "d_sae") if k not in cfg]
        if missing:
            raise ValueError(f"cfg.json lacks required keys {missing}")
        unsupported = {
            k: cfg[k]
            for k, ok in (("apply_b_dec_to_input", True), ("normalize_activations", "none"),
                          ("reshape_activations", "none"), ("rescale_acts_by_decoder_norm", False))
            if k in cfg and cfg[k] != ok
        }
        if unsupported:
            raise ValueError(f"cfg.json uses settings this library does not implement: {unsupported}")
        metadata = dict(cfg.get("metadata") or {})
        extras = metadata.pop("sae_training", {}) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            architecture=cfg["architecture"],
            d_in=int(cfg["d_in"]),
            d_sae=int(cfg["d_sae"]),
            k=cfg.get("k"),
            dtype=cfg.get("dtype", "float32"),
            device=cfg.get("device", "cpu"),
            metadata=metadata,
            **{k: v for k, v in extras.items() if k in known},
        )
