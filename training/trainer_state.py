"""Per-SAE training state of the language-model trainer, and how it is saved and resumed.

Each SAE of a run owns its module, Adam optimizer, dead-latent counters, RNG and loss curve
(`Member`). An intermediate checkpoint `<folder>/steps/<step>/` holds, beside the SAE folder:
```
trainer_state.json             step, tokens, data-buffer position, RNG, Adam step, trainer config
trainer_state.safetensors      raw (unscaled) parameters, Adam moments, steps-since-fired counters
```
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.architectures import SparseAutoencoder, build_sae
from sae.checkpoint import read_json
from sae.config import SAEConfig
from sae.layout import STEPS_DIR, TRAINING_CONFIG_FILE
from sae.layout import TRAINER_STATE_JSON as STATE_JSON
from sae.layout import TRAINER_STATE_TENSORS as STATE_TENSORS
from training.optim import make_adam
from training.trainer_config import SAESpec, TrainerConfig, init_norm_for, resolved_recipe

STATE_FORMAT = 1

RESUME_FREE_SETTINGS = frozenset({"steps", "checkpoint_every", "keep_optimizer_state", "log_every", "progress",
                                  "widths", "architectures", "lr_decay_fraction"})
"""TrainerConfig fields a resumed run may change (everything else changes the data or the optimisation path)."""


@dataclass
class Member:
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


def member_seed(seed: int, spec: SAESpec) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{spec.run}/{spec.cfg.d_sae}".encode())) % (1 << 62)


def make_member(cfg: TrainerConfig, spec: SAESpec) -> Member:
    sae = build_sae(spec.cfg, seed=cfg.seed)
    init = init_norm_for(cfg, spec.cfg)
    if init != 1.0:
        with torch.no_grad():  # unit rows from build_sae; a unit decoder stays unit, its encoder starts small
            sae.W_enc.mul_(init)
            if spec.cfg.free_decoder and sae._W_dec is not None:
                sae._W_dec.mul_(init)
    sae.train()
    # Our loss is SAELens's / d_in, so are the gradients: epsilon scales with them.
    opt = make_adam(sae.parameters(), cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps / spec.cfg.d_in)
    f = spec.cfg.d_sae
    return Member(spec, sae, opt, torch.Generator().manual_seed(member_seed(cfg.seed, spec)),
                   torch.zeros(f, dtype=torch.long), torch.zeros(f, dtype=torch.long))



def place_member(m: Member, device: torch.device | str) -> Member:
    """`m` with its SAE, counters and RNG on `device` (before the first step: Adam has no state yet)."""
    device = torch.device(device)
    if device.type == "cpu":
        return m
    m.sae.to(device)
    m.steps_since_fired, m.fire_counts = m.steps_since_fired.to(device), m.fire_counts.to(device)
    m.gen = torch.Generator(device).manual_seed(m.gen.initial_seed())
    return m


def fold_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """An untied copy that reads raw activations: trained on s x, so W_enc * s, W_dec / s, b_dec / s.

    A free decoder's row norms n are folded first (W_dec / n, W_enc * n, b_enc * n: same reconstruction,
    unit rows, and the decoder-norm-weighted L1 becomes the plain one)."""
    if scale == 1.0 and not sae.cfg.tied and not sae.cfg.free_decoder:
        return sae
    w = sae.effective_weights()
    if sae.cfg.free_decoder:
        norms = w["W_dec"].norm(dim=-1).clamp_min(1e-12)  # [F]
        w["W_dec"] = w["W_dec"] / norms[:, None]
        w["W_enc"] = w["W_enc"] * norms
        w["b_enc"] = w["b_enc"] * norms
    w["W_enc"] = w["W_enc"] * scale
    w["W_dec"] = w["W_dec"] / scale
    w["b_dec"] = w["b_dec"] / scale
    # A shell (every weight is overwritten) of the plain unit-row SAE that the folded weights are.
    out = build_sae(sae.cfg.replace(tied=False, l1_decoder_norm=False, rescale_acts_by_decoder_norm=False), seed=0)
    out.load_effective_weights(w)
    return out


def state_tensors(m: Member) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for name, p in m.sae.named_parameters():
        tensors[f"param.{name}"] = p.detach().cpu().contiguous().clone()
        state = m.opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{name}"] = state[key].cpu().contiguous().clone()
    tensors["steps_since_fired"] = m.steps_since_fired.cpu().clone()
    return tensors


def adam_step(m: Member) -> float:
    """Adam's step count: the decoder's, which alone keeps stepping in the decoder fine-tuning phase."""
    return max((float(state["step"]) for state in m.opt.state.values() if "step" in state), default=0.0)


def load_member_state(m: Member, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, p in m.sae.named_parameters():
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                # Moments take the parameter's memory layout (W_enc is stored transposed): the fused Adam
                # kernel pairs elements by memory position.
                # The fused kernel keeps its step counter on the parameter's device, the others on the CPU.
                step_device = p.device if m.opt.defaults.get("fused") else "cpu"
                m.opt.state[p] = {
                    "step": torch.tensor(float(meta["adam_step"]), dtype=torch.float32, device=step_device),
                    "exp_avg": torch.empty_like(p).copy_(tensors[f"exp_avg.{name}"]),
                    "exp_avg_sq": torch.empty_like(p).copy_(tensors[f"exp_avg_sq.{name}"]),
                }
    m.steps_since_fired = tensors["steps_since_fired"].to(m.fire_counts.device).clone()
    m.fire_counts.zero_()  # as right after the checkpoint was written (its counts are its sparsity file)
    m.tokens_counted = 0
    m.gen.set_state(torch.tensor(meta["rng_state"], dtype=torch.uint8))


def has_state(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()


def resumable_steps(folder: Path) -> list[int]:
    """Steps with a complete resumable checkpoint under `<folder>/steps/`, ascending."""
    root = folder / STEPS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and has_state(p))


def common_resumable_step(folders: list[Path]) -> int:
    """The newest step every folder has a resumable checkpoint of (0: none)."""
    common = set.intersection(*(set(resumable_steps(f)) for f in folders)) if folders else set()
    return max(common, default=0)




PREDATING_VALUES: dict[str, Any] = {"grad_clip_norm": 0.0, "init_norm": 1.0, "b_dec_init": "mean", "aux_relu": True,
                                    "aux_scale_dead": False, "decoder_finetune_fraction": 0.0}
"""What a checkpoint written before these TrainerConfig fields existed did (adam_eps: see `saved_setting`; the
decoder mode: `saved_recipe`)."""

RESUME_RECIPE_KEYS = ("decoder_norm", "decoder_finetune_fraction")
"""Recipe settings compared as resolved ("auto" / None as today's defaults make them for this SAE) on resume: a
changed default (RECIPE_DEFAULTS, SMALL_F_TOPK) must not switch them mid-run. Init norm and b_dec init only
shape step 0."""


def saved_setting(saved: dict[str, Any], name: str, d_in: int) -> Any:
    """A checkpoint's value of one TrainerConfig field; for fields it predates, the behaviour it was trained with."""
    if name in saved:
        return saved[name]
    if name == "adam_eps":  # the optimizer's epsilon was a fixed 1e-8 on our (per-element) loss scale
        return 1e-8 * d_in
    if name in PREDATING_VALUES:
        return PREDATING_VALUES[name]
    return getattr(TrainerConfig(), name)


def saved_recipe(tc: dict[str, Any], d_in: int) -> dict[str, Any]:
    """The resolved recipe a checkpoint's training_config.json records (older ones: read off its SAE config)."""
    if "recipe" in tc:
        return tc["recipe"]
    flags = tc.get("sae_config", {}).get("metadata", {}).get("sae_training", {})
    free = bool(flags.get("l1_decoder_norm") or flags.get("rescale_acts_by_decoder_norm"))
    out: dict[str, Any] = {"decoder_norm": "free" if free else "unit"}
    frac = saved_setting(tc.get("trainer", {}), "decoder_finetune_fraction", d_in)
    if frac is not None:  # None: resolved by the defaults of its day, not recorded
        out["decoder_finetune_fraction"] = frac
    return out


def check_compatible(cfg: TrainerConfig, saved: dict[str, Any], folder: Path, sae_cfg: SAEConfig) -> None:
    """Settings that change the data or the optimisation path must match the checkpoint's.

    A checkpoint written before a field existed counts as what it did then (`saved_setting`), so resuming it
    with today's defaults is refused with the flags that reproduce it, instead of silently changing recipe;
    RESUME_RECIPE_KEYS are compared as resolved for this SAE (`saved_recipe` against `resolved_recipe`)."""
    d_in, now = sae_cfg.d_in, dataclasses.asdict(cfg)
    diff = {k: (saved_setting(saved, k, d_in), now[k]) for k in now if k not in RESUME_FREE_SETTINGS
            and k not in RESUME_RECIPE_KEYS and saved_setting(saved, k, d_in) != now[k]}
    before, resolved = saved_recipe(read_json(folder / TRAINING_CONFIG_FILE), d_in), resolved_recipe(cfg, sae_cfg)
    diff.update({k: (before[k], resolved[k]) for k in RESUME_RECIPE_KEYS if k in before and before[k] != resolved[k]})
    if diff:
        flags = " ".join(f"--{k.replace('_', '-')} {was}" for k, (was, _) in diff.items())
        raise ValueError(f"cannot resume from {folder}: settings differ from the checkpoint's (was, now): {diff}; "
                         f"resume with: {flags}")
