"""The language-model trainer's configuration: TrainerConfig (the CLI's flags), run names and SAE specs.

A run name is an architecture of the registry or a variant of one (`VARIANTS`); every run trains every
width, and `build_specs` turns the config into one `SAESpec` (run, SAEConfig, folder) per SAE.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from sae.architectures import REGISTRY
from sae.config import SAEConfig
from training.schedules import LRSchedule

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("standard", {}),
    "standard-nosparsity": ("standard", {"sparsity_coeff": 0.0}),
    "standard-tied": ("standard", {"tied": True}),
    "topk": ("topk", {}),
    "topk-noauxk": ("topk", {"aux_k": 0}),
    "gated": ("gated", {}),
    "jumprelu": ("jumprelu", {}),
}
"""Run names accepted by `--architectures`: an architecture, or a variant (architecture + overrides)."""

RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "standard": {"decoder_norm": "free", "init_norm": 0.1, "b_dec_init": "mean", "decoder_finetune_fraction": 0.1},
    "topk": {"decoder_norm": "free", "init_norm": 0.03, "b_dec_init": "zeros"},
}
"""Per-architecture `decoder_norm` / `init_norm` / `b_dec_init` behind "auto" / None (others: unit rows, norm 1,
the data mean), measured with bench/bench_quality.py on tinystories-mini, F = 1000 (BENCHMARKS.md, "SAE quality
against SAELens"), held-out variance explained @ L0.
Standard (previous base model, 1,000 steps x 2,048, L1 2): unit rows, init 1, no clip 0.820 @ 48.8; + clip 0.919
@ 28.6 (23% dead); free + clip 0.920 @ 27.9 (18% dead); free + clip + init 0.1 0.923 @ 43.4 (0 dead); free + init
0.1 without clip 0.910 @ 83.1.
TopK (2,500 steps x 4,096, the shipped budget): unit rows, init 1, b_dec mean, AuxK 256 x 1/32 with ReLU 0.9418
(CE score 0.9910); free + init 0.1: 0.9427 (11% dead); + b_dec zeros 0.9476 (11% dead); + SAELens's AuxK (aux_k
128 = d_in / 2, coeff 1, no ReLU, x min(dead / aux_k, 1)): 0.9468, CE score 0.9918, 2.9% dead; without that
min(...) factor: 0.9464, 0.9916, 1.5% dead. Then the initial norm: 0.03 (the default) 0.9484, CE score 0.9918,
KL 0.0576, 1.6% dead (F = d: 0.9398, 0.9908, 0.4% dead; F = 100: 0.9111, 0 dead); 0.3: 0.9422; 0.01: 0.9503,
but at F = d 0.9389, CE 0.9900 (below SAELens). SAELens itself: 0.9468, 0.9909, KL 0.0598, 2.8% dead (F = d:
0.9398, 0.9902, 2.7% dead; F = 100: 0.9095, 0.9849).
Standard's decoder fine-tuning (same budget, L1 2): none 0.8873 @ 31.8 (SAELens at that L0: 0.8880); the last 10%
0.9113 @ 32.1 (SAELens 0.8887), CE score 0.9826 vs 0.9804; the last 20% 0.9140 @ 33.1 (SAELens 0.8907)."""

SMALL_F_TOPK: dict[str, Any] = {"decoder_norm": "unit", "init_norm": 1.0, "b_dec_init": "mean"}
"""RECIPE_DEFAULTS["topk"] overrides for a TopK SAE with few latents per k (k / F >= SMALL_F_TOPK_RATIO), where
unit rows from norm 1 and b_dec = mean beat the free small-norm recipe. Variance explained, unit vs free (same
budget, k = 32, d_in 256, tinystories-mini; BENCHMARKS.md, "TopK at small F"): F = 100 0.9199 vs 0.9111 (SAELens
0.9095), 128 0.9282 vs 0.9187, 160 0.9340 vs 0.9293, 192 0.9356 vs 0.9321; then 224 0.9358 vs 0.9377, 256
0.9366 vs 0.9398."""

SMALL_F_TOPK_RATIO = 0.15
"""k / F at and above which a TopK SAE takes SMALL_F_TOPK: between the measured crossover's 32 / 224 and 32 / 192."""

DEFAULT_SPARSITY = {"standard": 2.0, "gated": 5.0, "jumprelu": 0.5}
"""Default sparsity coefficient x d_in. The library's reconstruction loss is a mean over d_in, so lambda =
5 / d_in is Anthropic's lambda = 5 for a summed loss, on inputs scaled to E||x||^2 = d_in. Standard uses 2:
on tinystories-mini (F = 1000, 2,500 steps) it gave L0 28 at variance explained 0.90, where 5 collapsed
to L0 ~9 at variance explained 0.43."""


@dataclass
class TrainerConfig:
    widths: list[str] = field(default_factory=lambda: ["100", "d-1", "d", "1000"])
    """Latent counts F; `d` is the model width (d_model), e.g. 100 d-1 d 1000 4d 2d+1."""
    architectures: list[str] = field(default_factory=lambda: ["standard", "topk"])
    """Runs: an architecture (standard topk gated jumprelu) or a variant (standard-nosparsity = plain
    reconstruction with sparsity 0, standard-tied, topk-noauxk). Every run trains every width."""
    steps: int = 20_000
    """Optimizer steps; every SAE sees steps x batch_size activation vectors."""
    batch_size: int = 4096
    """Activation vectors per step."""
    lr: float = 4e-4
    """Peak Adam learning rate."""
    lr_warmup_steps: int = 500
    """Linear LR warm-up from 0."""
    lr_decay_fraction: float = 0.2
    """The LR decays linearly to 0 over this last fraction of the steps."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon on SAELens's loss scale (the loss summed over d_in, like grad_clip_norm): the optimizer gets
    adam_eps / d_in, so its updates are those of Adam on the summed loss with this epsilon."""
    sparsity_coeff: float | None = None
    """Sparsity coefficient (L1 for standard/gated, L0 for jumprelu; variants may override it).
    None: DEFAULT_SPARSITY[architecture] / d_in (standard 2 / d_in, gated 5 / d_in, jumprelu's L0 0.5 / d_in)."""
    sparsity_warmup_steps: int = 1000
    """Linear warm-up of the sparsity coefficient from 0."""
    k: int = 32
    """topk: latents kept per token."""
    aux_k: int = 128
    """topk: dead latents in the AuxK loss (0 disables it); SAELens and Gao et al. use d_in / 2."""
    aux_coeff: float = 1.0
    """topk: weight of the AuxK loss (relative to the reconstruction loss)."""
    dead_window: int = 500
    """A latent that has not fired for this many steps is dead (AuxK, resampling, frac_dead)."""
    grad_clip_norm: float = 1.0
    """Clip each SAE's gradient to this global norm before Adam, measured on the loss summed over d_in
    (SAELens's scale, d_in x this trainer's per-element loss), so 1.0 is SAELens's fixed clip; 0: off."""
    decoder_norm: Literal["auto", "unit", "free"] = "auto"
    """unit: decoder rows renormalised to 1 after every step (the gradient along them dropped); free:
    unconstrained decoder with its row norms factored out of the latents (standard: L1 weighted by row norm;
    topk: selection on pre-activations times row norm, SAELens's rescale_acts_by_decoder_norm), folded into
    unit rows in saved checkpoints; auto: RECIPE_DEFAULTS per architecture (TopK with k / F >= 0.15: unit)."""
    init_norm: float | None = None
    """Initial norm of the encoder columns (and of free decoder rows); None: RECIPE_DEFAULTS per architecture
    (TopK with k / F >= 0.15: 1)."""
    b_dec_init: Literal["auto", "mean", "zeros"] = "auto"
    """Initial decoder bias: the mean training activation, or zeros; auto: RECIPE_DEFAULTS per architecture (TopK
    with k / F >= 0.15: mean)."""
    aux_relu: bool = False
    """topk: ReLU the AuxK activations (False: raw pre-activations of the dead latents, as SAELens)."""
    aux_scale_dead: bool = False
    """topk: scale the AuxK loss by min(dead latents / aux_k, 1), as SAELens (off: the full weight however few
    latents are dead, which keeps fewer dead: 1.5% vs 2.9% at F = 1000, 0.8% vs 2.3% at F = d)."""
    decoder_finetune_fraction: float | None = None
    """Over this last fraction of the steps only the decoder weights train, on the reconstruction loss alone
    (encoder and b_dec frozen, so every latent stays as it is): undoes the sparsity term's shrinkage of the
    reconstruction. Not for tied SAEs or free-decoder TopK (their latents depend on the decoder).
    None: RECIPE_DEFAULTS per architecture (0: off), 0 without a sparsity term."""
    resample_every: int = 0
    """Resample dead latents every this many steps (0: never)."""
    resample_method: Literal["simple", "advanced"] = "advanced"
    """simple: random unit directions; advanced: inputs drawn in proportion to their squared error."""
    resample_scale: float = 0.2
    """Encoder norm of a resampled latent: this (simple), or this times the mean alive encoder norm (advanced)."""
    normalize_activations: bool = True
    """Scale inputs to E||x||^2 = d_in while training (folded into the saved weights)."""
    fast: bool = True
    """Use the hand-written standard/topk paths (False: autograd through the library modules)."""
    seed: int = 0
    """Seed of SAE initialisation, data order and resampling."""
    checkpoint_every: int = 5000
    """Write intermediate checkpoints (steps/<step>/) every this many steps (0: never)."""
    keep_optimizer_state: int = 1
    """Keep the resumable state (Adam moments etc.) in only the newest this many intermediate checkpoints."""
    log_every: int = 50
    """Loss-curve row every this many steps (averaged over them)."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class SAESpec:
    """One SAE of the run: the run name (architecture or variant), its config and its final folder."""

    run: str
    cfg: SAEConfig
    folder: Path


def parse_width(spec: str | int, d_model: int) -> int:
    """`"1000"` -> 1000, `"d"` -> d_model, `"d-1"`, `"4d"`, `"2d+1"`."""
    s = str(spec).replace(" ", "").lower()
    m = re.fullmatch(r"(\d+)?(d)?([+-]\d+)?", s)
    if not s or not m or (m.group(1) is None and m.group(2) is None):
        raise ValueError(f"bad width {spec!r}: expected an integer or an expression like d, d-1, 4d, 2d+1")
    if m.group(2):
        value = int(m.group(1) or 1) * d_model + int(m.group(3) or 0)
    elif m.group(3):
        raise ValueError(f"bad width {spec!r}: an offset needs 'd' (e.g. d-1)")
    else:
        value = int(m.group(1))
    if value <= 0:
        raise ValueError(f"width {spec!r} gives F={value} for d={d_model}; F must be positive")
    return value


def recipe_defaults(arch: str, d_sae: int, k: int | None = None) -> dict[str, Any]:
    """What "auto" / None resolve to for this architecture and width (RECIPE_DEFAULTS, SMALL_F_TOPK)."""
    out = dict(RECIPE_DEFAULTS.get(arch, {}))
    if arch == "topk" and k and k / d_sae >= SMALL_F_TOPK_RATIO:
        out.update(SMALL_F_TOPK)
    return out


def decoder_norm_for(cfg: TrainerConfig, arch: str, d_sae: int, k: int | None, tied: bool = False) -> str:
    """"unit" or "free" for this architecture, width and k ("auto" resolved; tied decoders and other
    architectures: unit)."""
    default = recipe_defaults(arch, d_sae, k).get("decoder_norm", "unit")
    mode = cfg.decoder_norm if cfg.decoder_norm != "auto" else default
    if mode == "free" and (arch not in ("standard", "topk") or tied):
        if cfg.decoder_norm == "free":
            raise ValueError(f"--decoder-norm free is implemented for untied standard and topk SAEs, not {arch!r}")
        return "unit"
    return mode


def init_norm_for(cfg: TrainerConfig, sae_cfg: SAEConfig) -> float:
    """Initial encoder-column norm (and free decoder-row norm) of this SAE."""
    if cfg.init_norm is not None:
        if cfg.init_norm <= 0:
            raise ValueError(f"--init-norm must be positive, got {cfg.init_norm}")
        return cfg.init_norm
    return float(recipe_defaults(sae_cfg.architecture, sae_cfg.d_sae, sae_cfg.k).get("init_norm", 1.0))


def b_dec_init_for(cfg: TrainerConfig, sae_cfg: SAEConfig) -> str:
    """"mean" or "zeros" for this SAE ("auto" resolved)."""
    if cfg.b_dec_init != "auto":
        return cfg.b_dec_init
    return recipe_defaults(sae_cfg.architecture, sae_cfg.d_sae, sae_cfg.k).get("b_dec_init", "mean")


def decoder_finetune_fraction_for(cfg: TrainerConfig, sae_cfg: SAEConfig) -> float:
    """`decoder_finetune_fraction` of this SAE, None resolved."""
    frac = cfg.decoder_finetune_fraction
    explicit = frac is not None
    if frac is None:  # without a sparsity term there is no shrinkage to undo
        defaults = recipe_defaults(sae_cfg.architecture, sae_cfg.d_sae, sae_cfg.k)
        frac = float(defaults.get("decoder_finetune_fraction", 0.0))
        frac = frac if sae_cfg.sparsity_coeff else 0.0
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"--decoder-finetune-fraction must be in [0, 1), got {frac}")
    if frac and (sae_cfg.tied or sae_cfg.rescale_acts_by_decoder_norm):
        if explicit:
            raise ValueError("--decoder-finetune-fraction: the latents of a tied SAE or of a free-decoder TopK SAE "
                             "depend on the decoder, so it cannot be fine-tuned alone (use 0, or --decoder-norm unit "
                             "for TopK)")
        return 0.0
    return frac


def decoder_finetune_steps(cfg: TrainerConfig, sae_cfg: SAEConfig) -> int:
    """How many of the last steps train the decoder alone."""
    return int(cfg.steps * decoder_finetune_fraction_for(cfg, sae_cfg))


def resolved_recipe(cfg: TrainerConfig, sae_cfg: SAEConfig) -> dict[str, Any]:
    """The recipe this SAE trains with, every "auto" / None resolved (recorded in training_config.json)."""
    return {"decoder_norm": "free" if sae_cfg.free_decoder else "unit", "init_norm": init_norm_for(cfg, sae_cfg),
            "b_dec_init": b_dec_init_for(cfg, sae_cfg),
            "decoder_finetune_fraction": decoder_finetune_fraction_for(cfg, sae_cfg)}


def sae_config_for(cfg: TrainerConfig, run: str, d_in: int, d_sae: int, metadata: dict[str, Any]) -> SAEConfig:
    """The SAEConfig of one run name at one width."""
    if run not in VARIANTS:
        raise ValueError(f"unknown architecture/variant {run!r}; choose from {sorted(VARIANTS)}")
    arch, overrides = VARIANTS[run]
    assert arch in REGISTRY
    coeff = cfg.sparsity_coeff if cfg.sparsity_coeff is not None else DEFAULT_SPARSITY.get(arch, 0.0) / d_in
    kwargs: dict[str, Any] = {"sparsity_coeff": 0.0 if arch == "topk" else coeff}
    if arch == "topk":
        kwargs.update(k=min(cfg.k, d_sae), aux_k=cfg.aux_k or None, aux_coeff=cfg.aux_coeff, aux_relu=cfg.aux_relu,
                      aux_scale_dead=cfg.aux_scale_dead)
    kwargs.update(overrides)
    free = decoder_norm_for(cfg, arch, d_sae, kwargs.get("k"), bool(kwargs.get("tied"))) == "free"
    kwargs.update(l1_decoder_norm=free and arch == "standard", rescale_acts_by_decoder_norm=free and arch == "topk")
    if arch == "topk" and not kwargs.get("aux_k"):
        kwargs["aux_k"] = None
    return SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, metadata=dict(metadata), **kwargs)


def build_specs(
    cfg: TrainerConfig, d_in: int, folder_for: Callable[[str, int], Path], metadata: dict[str, Any]
) -> list[SAESpec]:
    """Every (run, width) of the config; `folder_for(run, d_sae)` names each final folder."""
    widths = list(dict.fromkeys(parse_width(w, d_in) for w in cfg.widths))
    runs = list(dict.fromkeys(cfg.architectures))
    if not widths or not runs:
        raise ValueError("need at least one width and one architecture")
    return [SAESpec(run, sae_config_for(cfg, run, d_in, f, metadata), Path(folder_for(run, f)))
            for run in runs for f in widths]


def lr_schedule(cfg: TrainerConfig) -> LRSchedule:
    """Linear warm-up, constant, linear decay to 0 over the last `lr_decay_fraction` of the steps."""
    decay_steps = int(cfg.steps * cfg.lr_decay_fraction)
    return LRSchedule(peak=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.lr_warmup_steps,
                      decay="linear" if decay_steps > 0 else "constant", decay_start=cfg.steps - decay_steps)


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """LR of step `step` (0-based)."""
    return lr_schedule(cfg).lr(step)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "tokenizers", "huggingface_hub", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def activation_scale(acts: Tensor, max_rows: int = 100_000) -> float:
    """sqrt(d / mean ||x||^2) over (at most `max_rows` evenly spaced rows of) `acts [n, d]`."""
    step = max(1, len(acts) // max_rows)
    sample = acts[::step].double()
    return float(math.sqrt(acts.shape[1] / sample.pow(2).sum(-1).mean().clamp_min(1e-12)))


