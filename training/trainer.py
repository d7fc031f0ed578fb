"""Train several SAEs (widths x architectures) on one stream of activation batches.

Every SAE owns its module, Adam optimizer, dead-latent counters, RNG and loss curve; the SAEs share
only the input batch, so an SAE trained in a group ends bit-identical to the same SAE trained alone.
Standard and TopK SAEs take the hand-written paths of `training.fast_paths`; the others autograd.

Per step and SAE: loss + gradients, drop the decoder-parallel gradient, Adam, renormalise decoder rows,
update the steps-since-fired counters (dead latents feed TopK's AuxK and optional resampling).
Schedules: linear LR warm-up, constant, linear decay to 0 over the last `lr_decay_fraction`; linear
sparsity-coefficient warm-up from 0.

Activations are scaled by one constant so that E||x||^2 = d_in while training (so default
coefficients transfer across models); the constant is folded into every saved checkpoint, which
therefore reads raw activations (SAELens `normalize_activations: none`).

Layout (`sae_folder` of sae/checkpoint.py):
```
<run folder>/F<d_sae>/                      final SAE folder + loss_curves.csv + training_config.json
<run folder>/F<d_sae>/steps/<step>/         intermediate SAE folder, plus (newest only by default)
    trainer_state.json                      step, tokens, data-buffer position, RNG, schedule, config
    trainer_state.safetensors               raw (unscaled) parameters, Adam moments, dead counters
<run folder>/loss_curves.{csv,png}          every width of the run: the "four regimes" picture
```
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import platform
import re
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from sae.architectures import SparseAutoencoder, build_sae
from sae.checkpoint import STEPS_DIR, TRAINING_CONFIG_FILE, save_sae, step_folder
from sae.config import ARCHITECTURES, SAEConfig
from training.fast_paths import StepLosses, has_fast_path, loss_and_grads

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CURVES_FILE = "loss_curves.csv"
CURVES_PLOT = "loss_curves.png"
STATE_FORMAT = 1
CURVE_COLUMNS = ("step", "tokens", "lr", "sparsity_coeff", "loss", "mse", "variance_explained", "sparsity_loss",
                 "aux_loss", "l0", "frac_dead")

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
    "standard": {"decoder_norm": "free", "init_norm": 0.1},
    "topk": {"decoder_norm": "unit", "init_norm": 1.0},
}
"""Per-architecture `decoder_norm` / `init_norm` behind "auto" / None (others: unit rows, norm 1), measured
with bench/bench_quality.py (BENCHMARKS.md, "SAE quality against SAELens")."""

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
    sparsity_coeff: float | None = None
    """Sparsity coefficient (L1 for standard/gated, L0 for jumprelu; variants may override it).
    None: DEFAULT_SPARSITY[architecture] / d_in (standard 2 / d_in, gated 5 / d_in, jumprelu's L0 0.5 / d_in)."""
    sparsity_warmup_steps: int = 1000
    """Linear warm-up of the sparsity coefficient from 0."""
    k: int = 32
    """topk: latents kept per token."""
    aux_k: int = 256
    """topk: dead latents in the AuxK loss (0 disables it)."""
    aux_coeff: float = 1 / 32
    """topk: weight of the AuxK loss."""
    dead_window: int = 500
    """A latent that has not fired for this many steps is dead (AuxK, resampling, frac_dead)."""
    grad_clip_norm: float = 1.0
    """Clip each SAE's gradient to this global norm before Adam, measured on the loss summed over d_in
    (SAELens's scale, d_in x this trainer's per-element loss), so 1.0 is SAELens's fixed clip; 0: off."""
    decoder_norm: Literal["auto", "unit", "free"] = "auto"
    """unit: decoder rows renormalised to 1 after every step (the gradient along them dropped); free:
    unconstrained decoder with the L1 term weighted by decoder-row norm (standard only; rows folded to unit
    norm in saved checkpoints); auto: RECIPE_DEFAULTS per architecture."""
    init_norm: float | None = None
    """Initial norm of the encoder columns (and of free decoder rows); None: RECIPE_DEFAULTS per architecture."""
    b_dec_init: Literal["mean", "zeros"] = "mean"
    """Initial decoder bias: the mean training activation, or zeros."""
    aux_relu: bool = True
    """topk: ReLU the AuxK activations (False: raw pre-activations of the dead latents, as SAELens)."""
    aux_scale_dead: bool = False
    """topk: scale the AuxK loss by min(dead latents / aux_k, 1), as SAELens."""
    resample_every: int = 0
    """Resample dead latents every this many steps (0: never)."""
    resample_method: Literal["simple", "advanced"] = "advanced"
    """simple: random unit directions; advanced: inputs drawn in proportion to their squared error."""
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


class BatchSource(Protocol):
    """What the trainer needs from a data buffer (training.activations.ActivationBuffer)."""

    def next_batch(self) -> Tensor: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, int]) -> None: ...


# ------------------------------------------------------------------------------------------- config


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


def decoder_norm_for(cfg: TrainerConfig, arch: str, tied: bool = False) -> str:
    """"unit" or "free" for this architecture ("auto" resolved; tied and non-standard decoders are unit)."""
    mode = cfg.decoder_norm if cfg.decoder_norm != "auto" else RECIPE_DEFAULTS.get(arch, {}).get("decoder_norm", "unit")
    if mode == "free" and (arch != "standard" or tied):
        if cfg.decoder_norm == "free":
            raise ValueError(f"--decoder-norm free is implemented for the untied standard SAE only, not {arch!r}")
        return "unit"
    return mode


def init_norm_for(cfg: TrainerConfig, arch: str) -> float:
    if cfg.init_norm is not None:
        if cfg.init_norm <= 0:
            raise ValueError(f"--init-norm must be positive, got {cfg.init_norm}")
        return cfg.init_norm
    return float(RECIPE_DEFAULTS.get(arch, {}).get("init_norm", 1.0))


def sae_config_for(cfg: TrainerConfig, run: str, d_in: int, d_sae: int, metadata: dict[str, Any]) -> SAEConfig:
    """The SAEConfig of one run name at one width."""
    if run not in VARIANTS:
        raise ValueError(f"unknown architecture/variant {run!r}; choose from {sorted(VARIANTS)}")
    arch, overrides = VARIANTS[run]
    assert arch in ARCHITECTURES
    coeff = cfg.sparsity_coeff if cfg.sparsity_coeff is not None else DEFAULT_SPARSITY.get(arch, 0.0) / d_in
    kwargs: dict[str, Any] = {"sparsity_coeff": 0.0 if arch == "topk" else coeff}
    if arch == "topk":
        kwargs.update(k=min(cfg.k, d_sae), aux_k=cfg.aux_k or None, aux_coeff=cfg.aux_coeff, aux_relu=cfg.aux_relu,
                      aux_scale_dead=cfg.aux_scale_dead)
    kwargs.update(overrides)
    kwargs["l1_decoder_norm"] = decoder_norm_for(cfg, arch, bool(kwargs.get("tied"))) == "free"
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


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """LR of step `step` (0-based): linear warm-up, constant, linear decay to 0."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    decay_steps = int(cfg.steps * cfg.lr_decay_fraction)
    decay = 1.0 if decay_steps <= 0 else min(1.0, (cfg.steps - step) / decay_steps)
    return cfg.lr * warm * max(decay, 0.0)


def sparsity_at(cfg: TrainerConfig, base: float, step: int) -> float:
    if cfg.sparsity_warmup_steps <= 0:
        return base
    return base * min(1.0, (step + 1) / cfg.sparsity_warmup_steps)


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


# ------------------------------------------------------------------------------------------- members


@dataclass
class _Member:
    spec: SAESpec
    sae: SparseAutoencoder
    opt: torch.optim.Adam
    gen: torch.Generator
    steps_since_fired: Tensor
    fire_counts: Tensor
    """[F] firing counts since the last checkpoint (log10 of their frequency -> sparsity.safetensors)."""
    tokens_counted: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    acc: dict[str, float] = field(default_factory=dict)
    acc_n: int = 0

    @property
    def label(self) -> str:
        return f"{self.spec.run}/F{self.spec.cfg.d_sae}"


def _member_seed(seed: int, spec: SAESpec) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{spec.run}/{spec.cfg.d_sae}".encode())) % (1 << 62)


def _make_member(cfg: TrainerConfig, spec: SAESpec) -> _Member:
    sae = build_sae(spec.cfg, seed=cfg.seed)
    init = init_norm_for(cfg, spec.cfg.architecture)
    if init != 1.0:
        with torch.no_grad():  # unit rows from build_sae; a unit decoder stays unit, its encoder starts small
            sae.W_enc.mul_(init)
            if spec.cfg.l1_decoder_norm and sae._W_dec is not None:
                sae._W_dec.mul_(init)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    f = spec.cfg.d_sae
    return _Member(spec, sae, opt, torch.Generator().manual_seed(_member_seed(cfg.seed, spec)),
                   torch.zeros(f, dtype=torch.long), torch.zeros(f, dtype=torch.long))


@torch.no_grad()
def _resample(cfg: TrainerConfig, m: _Member, x: Tensor, dead: Tensor) -> int:
    """Re-initialise the dead latents of `m` (Bricken et al. 2023); returns how many."""
    n_dead = int(dead.sum())
    if not n_dead:
        return 0
    sae, d_in = m.sae, m.spec.cfg.d_in
    if cfg.resample_method == "simple":
        dirs = torch.randn(n_dead, d_in, generator=m.gen, dtype=x.dtype)
        enc_norm: float | Tensor = 1.0
    else:
        err = (sae(x).reconstruction - x).pow(2).sum(-1)
        probs = err / err.sum() if float(err.sum()) > 0 else torch.full_like(err, 1 / len(err))
        pick = torch.multinomial(probs, n_dead, replacement=True, generator=m.gen)
        dirs = x[pick] - sae.b_dec
        alive = ~dead
        enc_norms = sae.W_enc.norm(dim=0)
        enc_norm = 0.2 * (enc_norms[alive].mean() if bool(alive.any()) else torch.tensor(1.0))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    full = torch.zeros(m.spec.cfg.d_sae, d_in, dtype=x.dtype)
    full[dead] = dirs.to(x.dtype)
    sae.reinit_latents_(dead, full, enc_norm)
    # Fresh Adam moments for the resampled latents: their old history points elsewhere.
    latent_params = {"W_enc": -1, "_W_dec": 0, **{name: 0 for name in sae.latent_bias_names()},
                     "log_threshold": 0, "b_enc": 0}
    for name, p in sae.named_parameters():
        state = m.opt.state.get(p, {})
        if name not in latent_params:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(latent_params[name] % state[key].ndim, dead.nonzero().squeeze(1), 0.0)
    m.steps_since_fired[dead] = 0
    return n_dead


# ------------------------------------------------------------------------------------------- checkpoints


def _fold_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """An untied copy that reads raw activations: trained on s x, so W_enc * s, W_dec / s, b_dec / s.

    A free decoder's row norms n are folded first (W_dec / n, W_enc * n, b_enc * n: same reconstruction,
    unit rows, and the decoder-norm-weighted L1 becomes the plain one)."""
    if scale == 1.0 and not sae.cfg.tied and not sae.cfg.l1_decoder_norm:
        return sae
    w = sae.effective_weights()
    if sae.cfg.l1_decoder_norm:
        norms = w["W_dec"].norm(dim=-1).clamp_min(1e-12)  # [F]
        w["W_dec"] = w["W_dec"] / norms[:, None]
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
    w["W_enc"] = w["W_enc"] * scale
    w["W_dec"] = w["W_dec"] / scale
    w["b_dec"] = w["b_dec"] / scale
    out = build_sae(sae.cfg.replace(tied=False), seed=0)  # a shell: every weight is overwritten
    out.load_effective_weights(w)
    return out


def _write_curve_csv(path: Path, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    extra = extra or {}
    cols = [*extra, *CURVE_COLUMNS]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({**extra, **{c: row.get(c, "") for c in CURVE_COLUMNS}})


def read_curve_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a loss_curves.csv (numeric columns as floats)."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, val in row.items():
            try:
                parsed[key] = int(val) if key in ("step", "tokens", "d_sae") else float(val)
            except (TypeError, ValueError):
                parsed[key] = val
        out.append(parsed)
    return out


def _state_tensors(m: _Member) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for name, p in m.sae.named_parameters():
        tensors[f"param.{name}"] = p.detach().contiguous().clone()
        state = m.opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{name}"] = state[key].contiguous().clone()
    tensors["steps_since_fired"] = m.steps_since_fired.clone()
    return tensors


def _adam_step(m: _Member) -> float:
    for state in m.opt.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _load_member_state(m: _Member, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, p in m.sae.named_parameters():
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                # Moments take the parameter's memory layout (W_enc is stored transposed): the fused Adam
                # kernel pairs elements by memory position.
                m.opt.state[p] = {
                    "step": torch.tensor(float(meta["adam_step"]), dtype=torch.float32),
                    "exp_avg": torch.empty_like(p).copy_(tensors[f"exp_avg.{name}"]),
                    "exp_avg_sq": torch.empty_like(p).copy_(tensors[f"exp_avg_sq.{name}"]),
                }
    m.steps_since_fired = tensors["steps_since_fired"].clone()
    m.fire_counts.zero_()  # as right after the checkpoint was written (its counts are its sparsity file)
    m.tokens_counted = 0
    m.gen.set_state(torch.tensor(meta["rng_state"], dtype=torch.uint8))


def _has_state(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()


def resumable_steps(folder: Path) -> list[int]:
    """Steps with a complete resumable checkpoint under `<folder>/steps/`, ascending."""
    root = folder / STEPS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and _has_state(p))


# ------------------------------------------------------------------------------------------- trainer


class MultiSAETrainer:
    """Trains `specs` on batches from `buffer`; see the module docstring."""

    def __init__(
        self,
        cfg: TrainerConfig,
        specs: Sequence[SAESpec],
        buffer: BatchSource,
        scale: float = 1.0,
        run_info: dict[str, Any] | None = None,
        data_mean: Tensor | None = None,
        data_variance: float | None = None,
    ) -> None:
        """`scale`: activation_scale(acts) (used when cfg.normalize_activations); `data_mean [d_in]`: the mean
        activation (raw units), the initial b_dec of every SAE (None: zeros); `data_variance`: E||x - mean||^2
        (raw units), the denominator of the logged variance explained (None: each batch's own)."""
        if cfg.steps <= 0 or cfg.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        folders = [str(s.folder) for s in specs]
        if len(set(folders)) != len(folders):
            raise ValueError("two SAEs would share a folder: widths or architectures repeat")
        self.cfg, self.specs, self.buffer = cfg, list(specs), buffer
        self.scale = float(scale) if cfg.normalize_activations else 1.0
        self.run_info = dict(run_info or {})
        self.members = [_make_member(cfg, s) for s in self.specs]
        if data_mean is not None and cfg.b_dec_init == "mean":
            with torch.no_grad():
                for m in self.members:
                    m.sae.b_dec.copy_(data_mean.to(m.sae.b_dec.dtype) * self.scale)
        self.token_variance = None if data_variance is None else float(data_variance) * self.scale**2
        self.step = 0
        self.started = time.time()

    # -- one step ---------------------------------------------------------------------------------
    def _train_step(self, x: Tensor) -> None:
        cfg, step = self.cfg, self.step
        lr = lr_at(cfg, step)
        if self.token_variance is not None:
            total_var = self.token_variance * x.shape[0]
        else:
            total_var = float((x - x.mean(0)).pow(2).sum()) or 1.0
        for m in self.members:
            dead = m.steps_since_fired >= cfg.dead_window
            coeff = sparsity_at(cfg, m.spec.cfg.sparsity_coeff, step)
            out: StepLosses = loss_and_grads(m.sae, x, coeff, dead, fast=cfg.fast)
            unit_decoder = not m.spec.cfg.l1_decoder_norm
            if unit_decoder:
                m.sae.remove_parallel_decoder_grad_()
            if cfg.grad_clip_norm > 0:  # our loss is SAELens's / d_in, and so is the gradient
                torch.nn.utils.clip_grad_norm_(m.sae.parameters(), cfg.grad_clip_norm / m.spec.cfg.d_in, foreach=True)
            for group in m.opt.param_groups:
                group["lr"] = lr
            m.opt.step()
            if unit_decoder:
                m.sae.normalize_decoder_()
            fired = out.fire_counts > 0
            m.steps_since_fired += 1
            m.steps_since_fired[fired] = 0
            m.fire_counts += out.fire_counts
            m.tokens_counted += x.shape[0]
            mse = float(out.mse)
            row = {"loss": float(out.loss), "mse": mse, "variance_explained": 1 - mse * x.numel() / total_var,
                   "sparsity_loss": float(out.sparsity), "aux_loss": float(out.aux),
                   "l0": float(out.fire_counts.sum()) / x.shape[0]}
            for key, val in row.items():
                m.acc[key] = m.acc.get(key, 0.0) + val
            m.acc_n += 1
            m.acc["lr"], m.acc["sparsity_coeff"] = lr, coeff
        self.step += 1
        if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step < cfg.steps:
            for m in self.members:
                _resample(cfg, m, x, m.steps_since_fired >= cfg.dead_window)

    def _flush_log(self) -> None:
        for m in self.members:
            if not m.acc_n:
                continue
            row = {k: v / m.acc_n for k, v in m.acc.items() if k not in ("lr", "sparsity_coeff")}
            row.update(step=self.step, tokens=self.step * self.cfg.batch_size, lr=m.acc["lr"],
                       sparsity_coeff=m.acc["sparsity_coeff"],
                       frac_dead=float((m.steps_since_fired >= self.cfg.dead_window).double().mean()))
            m.curve.append(row)
            m.acc, m.acc_n = {}, 0

    # -- checkpoints ------------------------------------------------------------------------------
    def _training_config(self, m: _Member, completed: bool) -> dict[str, Any]:
        return {
            "run": m.spec.run,
            "architecture": m.spec.cfg.architecture,
            "d_in": m.spec.cfg.d_in,
            "d_sae": m.spec.cfg.d_sae,
            "seed": self.cfg.seed,
            "steps": self.step,
            "total_steps": self.cfg.steps,
            "tokens_seen": self.step * self.cfg.batch_size,
            "completed": completed,
            "activation_scale": self.scale,
            "activation_scale_note": "inputs were multiplied by this while training; the saved weights fold it in",
            "fast_path": bool(self.cfg.fast and has_fast_path(m.sae)),
            "sae_config": m.spec.cfg.to_saelens_dict(),
            "trainer": dataclasses.asdict(self.cfg),
            **self.run_info,
            "library_versions": library_versions(),
            "wall_time_s": round(time.time() - self.started, 1),
        }

    def _save_member(self, m: _Member, folder: Path, with_state: bool, completed: bool) -> Path:
        freq = m.fire_counts.double() / max(m.tokens_counted, 1)
        meta = {
            "format": STATE_FORMAT,
            "step": self.step,
            "tokens_seen": self.step * self.cfg.batch_size,
            "buffer": self.buffer.state_dict(),
            "activation_scale": self.scale,
            "adam_step": _adam_step(m),
            "rng_state": m.gen.get_state().tolist(),
            "run": m.spec.run,
            "d_sae": m.spec.cfg.d_sae,
            "trainer": dataclasses.asdict(self.cfg),
        }
        tensors = _state_tensors(m) if with_state else None
        training_config = self._training_config(m, completed)

        def extra(tmp: Path) -> None:
            _write_curve_csv(tmp / CURVES_FILE, m.curve)
            if tensors is not None:
                save_file(tensors, str(tmp / STATE_TENSORS))
                (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")

        return save_sae(_fold_scale(m.sae, self.scale), folder, log10_sparsity=torch.log10(freq + 1e-10).float(),
                        training_config=training_config, extra=extra)

    def save_checkpoint(self) -> None:
        """Intermediate checkpoint of every SAE at the current step (each folder written atomically)."""
        self._flush_log()
        for m in self.members:
            self._save_member(m, step_folder(m.spec.folder, self.step), with_state=True, completed=False)
        for m in self.members:  # the new state is on disk: older ones are not needed to resume
            m.fire_counts.zero_()
            m.tokens_counted = 0
            keep = max(self.cfg.keep_optimizer_state, 1)
            for old in resumable_steps(m.spec.folder)[:-keep]:
                for name in (STATE_TENSORS, STATE_JSON):
                    (step_folder(m.spec.folder, old) / name).unlink(missing_ok=True)

    def resume(self) -> int:
        """Load the newest step that every SAE has a resumable checkpoint of; returns it (0: none)."""
        common = set.intersection(*(set(resumable_steps(m.spec.folder)) for m in self.members))
        if not common:
            return 0
        step = max(common)
        for m in self.members:
            folder = step_folder(m.spec.folder, step)
            meta = json.loads((folder / STATE_JSON).read_text())
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{folder / STATE_JSON}: unknown trainer-state format {meta.get('format')}")
            _check_compatible(self.cfg, meta["trainer"], folder)
            _load_member_state(m, load_file(str(folder / STATE_TENSORS)), meta)
            m.curve = [r for r in read_curve_csv(folder / CURVES_FILE) if r["step"] <= step]
            self.scale = float(meta["activation_scale"])
        self.buffer.load_state_dict(meta["buffer"])
        self.step = step
        return step

    def completed(self) -> bool:
        """Every final folder holds a finished run of this many steps."""
        for m in self.members:
            path = m.spec.folder / TRAINING_CONFIG_FILE
            try:
                tc = json.loads(path.read_text())
            except (OSError, ValueError):
                return False
            if not (tc.get("completed") and tc.get("steps") == self.cfg.steps):
                return False
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False, stop_at: int | None = None) -> list[Path]:
        """Train to `cfg.steps` and write the final folders; returns them.

        `resume`: continue from the newest common intermediate checkpoint. Without it, existing step
        checkpoints are an error unless `overwrite` (which deletes them). `stop_at`: return after this
        step without writing final folders, as if killed (tests, time-boxed sessions).
        """
        cfg = self.cfg
        if resume and self.completed():
            print(f"all {len(self.members)} SAEs already finished {cfg.steps:,} steps: nothing to resume")
            return [m.spec.folder for m in self.members]
        if resume:
            start = self.resume()
            if start:
                print(f"resuming all {len(self.members)} SAEs from step {start:,}")
            else:
                print("no complete intermediate checkpoint to resume from: starting from step 0")
        else:
            existing = [m.spec.folder / STEPS_DIR for m in self.members if (m.spec.folder / STEPS_DIR).exists()]
            if existing and not overwrite:
                raise FileExistsError(
                    f"{existing[0]} holds checkpoints of an earlier run: pass --resume to continue it or "
                    f"--overwrite to start again"
                )
            for path in existing:
                shutil.rmtree(path)
        bar = tqdm(total=cfg.steps * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok",
                   unit_scale=True, disable=not cfg.progress, desc=f"{len(self.members)} SAEs", smoothing=0.1,
                   dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                x = self.buffer.next_batch()
                if self.scale != 1.0:
                    x = x * self.scale
                self._train_step(x.to(self.members[0].sae.W_enc.dtype))
                bar.update(cfg.batch_size)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._flush_log()
                    bar.set_postfix_str(self._postfix(), refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if stop_at is not None and self.step >= stop_at and self.step < cfg.steps:
                    return []
        finally:
            bar.close()
        self._flush_log()
        finals = [self._save_member(m, m.spec.folder, with_state=False, completed=True) for m in self.members]
        write_run_curves(self.specs, [m.curve for m in self.members])
        return finals

    def _postfix(self) -> str:
        last = [m.curve[-1] for m in self.members if m.curve]
        if not last:
            return ""
        mean_loss = sum(r["loss"] for r in last) / len(last)
        l0 = "/".join(f"{r['l0']:.0f}" for r in last)
        return f"loss={mean_loss:.4g} L0={l0}"


def _check_compatible(cfg: TrainerConfig, saved: dict[str, Any], folder: Path) -> None:
    """Settings that change the data or the optimisation path must match the checkpoint's."""
    free = {"steps", "checkpoint_every", "keep_optimizer_state", "log_every", "progress", "widths", "architectures",
            "lr_decay_fraction"}
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in free and saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"cannot resume from {folder}: settings differ from the checkpoint's (was, now): {diff}")


# ------------------------------------------------------------------------------------------- curves


def write_run_curves(specs: Sequence[SAESpec], curves: Sequence[list[dict[str, float]]]) -> list[Path]:
    """Per run folder: loss_curves.csv (all widths, long format) and loss_curves.png (one line per F)."""
    by_run: dict[Path, list[tuple[SAESpec, list[dict[str, float]]]]] = {}
    for spec, curve in zip(specs, curves):
        by_run.setdefault(spec.folder.parent, []).append((spec, curve))
    written = []
    for run_dir, items in by_run.items():
        rows = [{"d_sae": s.cfg.d_sae, **r} for s, c in items for r in c]
        cols = ["run", "d_sae", *CURVE_COLUMNS]
        with (run_dir / CURVES_FILE).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            for r in rows:
                writer.writerow({"run": items[0][0].run, **{c: r.get(c, "") for c in cols[1:]}})
        written.append(plot_curves(run_dir / CURVES_PLOT, items[0][0].run, [(s.cfg.d_sae, c) for s, c in items],
                                   d_in=items[0][0].cfg.d_in))
    return written


def plot_curves(path: Path, title: str, curves: Sequence[tuple[int, list[dict[str, float]]]], d_in: int) -> Path:
    """Reconstruction loss, L0 and dead fraction against tokens, one line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for d_sae, rows in sorted(curves):
        if not rows:
            continue
        tokens = [r["tokens"] for r in rows]
        regime = "F < d" if d_sae < d_in else "F = d" if d_sae == d_in else "F > d"
        label = f"F={d_sae} ({regime})"
        axes[0].plot(tokens, [max(r["mse"], 1e-12) for r in rows], label=label)
        axes[1].plot(tokens, [r["l0"] for r in rows], label=label)
        axes[2].plot(tokens, [r["frac_dead"] for r in rows], label=label)
    axes[0].set(yscale="log", ylabel="reconstruction loss per element (normalised units)")
    axes[1].set(yscale="log", ylabel="L0 (latents firing per token)")
    axes[2].set(ylabel="fraction of dead latents")
    for ax in axes:
        ax.set(xlabel="training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{title}: d_in = {d_in}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "CURVES_FILE",
    "RECIPE_DEFAULTS",
    "TRAINING_CONFIG_FILE",
    "VARIANTS",
    "BatchSource",
    "MultiSAETrainer",
    "SAESpec",
    "TrainerConfig",
    "activation_scale",
    "build_specs",
    "library_versions",
    "lr_at",
    "parse_width",
    "read_curve_csv",
    "resumable_steps",
    "sae_config_for",
]
