"""SAE training on a toy model's hidden activations: one batched SAE learns every instance at once.

`SAEConfig(n_inst=16, d_in=2, d_sae=5)` holds 16 SAEs as one module. Each step draws a compact batch
(`ToyModel.sample_hidden_compact`: the SAE's forward weights each row by how many inputs it stands
for), takes the decoder-constrained Adam step (`training.optim`), and counts firing; every
`resample_every` steps the latents that fired on at most `dead_frequency` of the window's inputs are
resampled (`training.resampling`, the same code as the language-model trainer's). Firing counts stay
on-tensor and nothing calls `.item()` inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from sae.architectures import REGISTRY, SparseAutoencoder, build_sae
from sae.config import SAEConfig
from sae.layout import TOY_HOOK_NAME, TOY_MODEL_NAME
from training import resampling
from training.optim import constrained_step, make_adam, set_lr
from training.resampling import resample_dead_latents
from training.schedules import DECAY_SHAPES, LRSchedule, sparsity_coeff_at
from training.toy.model import BatchStream, ToyModel

RESAMPLE_METHODS = ("none", *resampling.RESAMPLE_METHODS)


ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # L1 coefficient from the ARENA exercise (sum over latents, mean over d_in).
    "standard": {"sparsity_coeff": 0.2},
    # L1 on ReLU(gate); the auxiliary reconstruction keeps the gate path honest.
    "gated": {"sparsity_coeff": 0.2},
    # L0 coefficient. Thresholds and kernel width on the scale of these activations (|h| <~ 1.15): with
    # 1e-3 (the LM default) the thresholds hardly ever see a gradient and the latents fire on empty inputs.
    "jumprelu": {"sparsity_coeff": 0.1, "init_threshold": 0.1, "ste_epsilon": 0.05},
    # One latent per input: at most one feature is present in ~99% of inputs at p = 0.025.
    "topk": {"k": 1},
}
"""Per-architecture values of the SAE settings left at None in ToySAEConfig (canonical experiment)."""


@dataclass
class ToySAEConfig:
    architecture: Literal["standard", "gated", "jumprelu", "topk"] = "standard"
    """SAE architecture."""
    resample: Literal["none", "simple", "advanced"] = "advanced"
    """Dead-latent resampling: none; simple (random unit directions); advanced (inputs drawn by squared loss)."""
    d_sae: int = 5
    """Latents per instance."""
    sparsity_coeff: float | None = None
    """Sparsity weight (L1 standard/gated, L0 jumprelu); None: the architecture's default (ARCH_DEFAULTS)."""
    k: int | None = None
    """topk: latents kept per input; None: default."""
    aux_k: int | None = None
    """topk: dead latents in the AuxK loss (0 or None: off unless the default sets it)."""
    aux_coeff: float | None = None
    """topk: AuxK weight; None: SAEConfig's default 1/32."""
    init_threshold: float | None = None
    """jumprelu: initial threshold; None: default."""
    ste_epsilon: float | None = None
    """jumprelu: straight-through kernel width; None: default."""
    tied: bool = False
    """standard only: decoder is the transposed encoder."""
    steps: int = 20_000
    """SAE optimizer steps."""
    batch_size: int = 1024
    """Hidden vectors per step (per instance)."""
    lr: float = 1e-3
    """Peak learning rate."""
    beta1: float = 0.0
    """Adam beta1 (0: no momentum, as in the ARENA toy exercise)."""
    beta2: float = 0.999
    """Adam beta2."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: constant, or cosine/linear decay to min_lr_frac * lr from decay_start on."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient from 0 over this many steps (0: none)."""
    decay_start: float = 0.0
    """Fraction of the run after which the decay begins (cosine/linear schedules)."""
    min_lr_frac: float = 0.0
    """Final learning rate as a fraction of lr (cosine/linear schedules)."""
    remove_parallel_grad: bool = True
    """Project out the gradient component along each decoder row before the step (else Adam's per-coordinate
    scaling turns the large radial gradient of unit-norm rows into a sideways drift: rows settle ~5° off)."""
    resample_every: int = 2500
    """Resample dead latents every this many steps (never in the last resample_every steps)."""
    resample_window: int = 500
    """Steps before each resampling over which firing is counted to find the dead latents."""
    dead_frequency: float = 1e-3
    """A latent firing on at most this fraction of the window's inputs counts as dead (0: never fired). A little
    above 0 also catches the nearly dead latents JumpReLU and gated SAEs leave between two features; 1e-3
    (a latent per feature fires on ~2.5% of inputs) took JumpReLU from 11 to 16 of 16 instances, 1e-4 missed some."""
    resample_scale: float = 1.0
    """Encoder norm of resampled latents: this times the mean alive encoder norm (advanced) or this (simple).
    ARENA uses 0.5 and Anthropic 0.2; here 1.0 lets a resampled latent compete with the live ones at once."""
    resample_loss_power: float = 1.0
    """advanced: inputs drawn with probability ∝ ||h - h_hat||^(2 * this); 2 is Anthropic's and ARENA's choice,
    which here favours the rare inputs holding two features, i.e. directions between features."""
    reset_optimizer: bool = True
    """After resampling, give resampled latents a typical Adam state (training.resampling.reset_adam_state)."""
    aux_dead_steps: int = 200
    """topk AuxK: a latent counts as dead during training after this many steps without firing."""
    log_every: int = 100
    """Steps between training-log rows."""
    snapshot_every: int = 250
    """Steps between decoder snapshots (frames of the training animation)."""
    chunk: int = 32
    """Batches sampled together (one sampling call per chunk)."""
    eval_batches: int = 16
    """Batches of batch_size inputs in the final evaluation (dead latents, reconstruction)."""
    seed: int = 0
    """Seed of the SAE's initialisation, its data and its resampling."""

    def __post_init__(self) -> None:
        if self.architecture not in REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {tuple(REGISTRY)}")
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"unknown resample method {self.resample!r}; expected one of {RESAMPLE_METHODS}")
        if self.lr_schedule not in DECAY_SHAPES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}")

    def setting(self, name: str) -> Any:
        """A field's value, or the architecture's default when it is None (then SAEConfig's default)."""
        value = getattr(self, name)
        if value is None:
            value = ARCH_DEFAULTS[self.architecture].get(name)
        if value is None:
            value = next((f.default for f in fields(SAEConfig) if f.name == name), None)
        return value

    def sae_config(self, n_inst: int, d_in: int) -> SAEConfig:
        return SAEConfig(
            architecture=self.architecture, d_in=d_in, d_sae=self.d_sae, n_inst=n_inst,
            sparsity_coeff=float(self.setting("sparsity_coeff") or 0.0), tied=self.tied,
            k=self.setting("k") if self.architecture == "topk" else None,
            aux_k=self.setting("aux_k") if self.architecture == "topk" else None,
            aux_coeff=float(self.setting("aux_coeff")), ste_epsilon=float(self.setting("ste_epsilon")),
            init_threshold=float(self.setting("init_threshold")),
            metadata={"model_name": TOY_MODEL_NAME, "hook_name": TOY_HOOK_NAME,
                      "dataset_path": "synthetic toy features"},
        )

    def schedule(self) -> LRSchedule:
        """Linear warm-up, then constant or a cosine/linear decay from decay_start (training.schedules)."""
        start = max(self.warmup_steps, int(self.decay_start * self.steps))
        return LRSchedule(peak=self.lr, total_steps=self.steps, warmup_steps=self.warmup_steps,
                          decay=self.lr_schedule, decay_start=start, min_lr_frac=self.min_lr_frac)


class ToyTrainLog(NamedTuple):
    steps: Tensor
    """Step of each log row `[n_logs]`."""
    lr: Tensor
    """Learning rate at each log row `[n_logs]`."""
    losses: dict[str, Tensor]
    """loss term -> `[n_logs, inst]` (L_reconstruction, L_sparsity, L_aux as the SAE reports them)."""
    frac_active: Tensor
    """Fraction of inputs each latent fired on since the previous row `[n_logs, inst, d_sae]`."""
    snapshot_steps: Tensor
    """Steps of the decoder snapshots `[n_snaps]`."""
    W_dec: Tensor
    """Decoder snapshots `[n_snaps, inst, d_sae, d_in]`."""
    W_enc: Tensor
    """Encoder snapshots `[n_snaps, inst, d_in, d_sae]`."""
    resample_steps: list[int]
    """Steps after which dead latents were resampled."""
    n_resampled: Tensor
    """Latents resampled per instance at each of those steps `[n_resamples, inst]`."""


class ToySAERun(NamedTuple):
    sae: SparseAutoencoder
    log: ToyTrainLog


class _Recorder:
    """Collects what becomes the ToyTrainLog: log rows, decoder snapshots, resampling events."""

    def __init__(self, n_inst: int, n_lat: int, device: torch.device) -> None:
        self.n_inst, self.n_lat = n_inst, n_lat
        self.fired = torch.zeros(n_inst, n_lat, device=device)  # since the last log row
        self.rows: list[tuple[int, float, dict[str, Tensor], Tensor]] = []
        self.snaps: list[tuple[int, Tensor, Tensor]] = []
        self.resample_steps: list[int] = []
        self.n_resampled: list[Tensor] = []
        self.last_log = 0

    def snapshot(self, step: int, sae: SparseAutoencoder) -> None:
        self.snaps.append((step, sae.W_dec.detach().clone(), sae.W_enc.detach().clone()))

    def log_row(self, step: int, lr: float, losses: dict[str, Tensor], batch_size: int) -> Tensor:
        """Append a row for `step`; returns its firing fractions `[inst, d_sae]`."""
        frac = self.fired / ((step + 1 - self.last_log) * batch_size)
        self.rows.append((step, lr, {name: v.detach() for name, v in losses.items()}, frac))
        self.fired = torch.zeros_like(self.fired)
        self.last_log = step + 1
        return frac

    def finish(self) -> ToyTrainLog:
        rows, snaps = self.rows, self.snaps
        names = list(rows[0][2]) if rows else []
        return ToyTrainLog(
            steps=torch.tensor([r[0] for r in rows]),
            lr=torch.tensor([r[1] for r in rows]),
            losses={n: torch.stack([r[2][n] for r in rows]).cpu() for n in names},
            frac_active=torch.stack([r[3] for r in rows]).cpu() if rows else torch.empty(0, self.n_inst, self.n_lat),
            snapshot_steps=torch.tensor([s[0] for s in snaps]),
            W_dec=torch.stack([s[1] for s in snaps]).cpu(),
            W_enc=torch.stack([s[2] for s in snaps]).cpu(),
            resample_steps=self.resample_steps,
            n_resampled=(torch.stack(self.n_resampled).cpu() if self.n_resampled
                         else torch.empty(0, self.n_inst, dtype=torch.long)),
        )


def train_toy_sae(
    model: ToyModel,
    cfg: ToySAEConfig,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> ToySAERun:
    """Train one batched SAE on all of `model`'s instances at once; `progress(step, stats)` at each log row."""
    device = model.W.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    sae_cfg = cfg.sae_config(model.cfg.n_inst, model.cfg.d_hidden)
    sae = build_sae(sae_cfg, seed=cfg.seed).to(device)
    opt = make_adam(sae.parameters(), cfg.lr, (cfg.beta1, cfg.beta2))
    stream = BatchStream(lambda n: model.sample_hidden_compact(n, cfg.batch_size, gen), cfg.chunk)
    use_aux = sae_cfg.architecture == "topk" and bool(sae_cfg.aux_k)
    rec = _Recorder(sae_cfg.n_inst or 1, sae_cfg.d_sae, device)
    window_fired = torch.zeros_like(rec.fired)  # over the window before each resampling
    since_fired = torch.zeros_like(rec.fired)  # steps since each latent last fired (AuxK's dead latents)
    schedule = cfg.schedule()
    lr_now = schedule.lr(0)
    rec.snapshot(0, sae)
    for step in range(cfg.steps):
        lr = schedule.lr(step)
        if lr != lr_now:
            set_lr(opt, lr)
            lr_now = lr
        h, weight = stream.next()
        dead_mask = since_fired >= cfg.aux_dead_steps if use_aux else None
        coeff = sparsity_coeff_at(sae_cfg.sparsity_coeff, step, cfg.sparsity_warmup_steps)
        out = sae(h, dead_mask, sparsity_coeff=coeff, weight=weight, batch_size=cfg.batch_size)
        out.loss.backward()
        constrained_step(sae, opt, cfg.remove_parallel_grad)
        opt.zero_grad(set_to_none=True)

        with torch.no_grad():
            fired = ((out.latents > 0) * weight[..., None]).sum(0)  # inputs each latent fired on [inst, d_sae]
            rec.fired += fired
            if step % cfg.resample_every >= cfg.resample_every - cfg.resample_window:
                window_fired += fired
            if use_aux:
                since_fired = torch.where(fired > 0, torch.zeros_like(since_fired), since_fired + 1)

        done = step + 1
        if cfg.resample != "none" and done % cfg.resample_every == 0 and done <= cfg.steps - cfg.resample_every:
            dead = window_fired <= cfg.dead_frequency * cfg.resample_window * cfg.batch_size
            h_new, w_new = stream.next() if cfg.resample == "advanced" else (None, None)
            dead = resample_dead_latents(sae, dead, cfg.resample, x=h_new, weight=w_new, scale=cfg.resample_scale,
                                         gen=gen, loss_power=cfg.resample_loss_power,
                                         opt=opt if cfg.reset_optimizer else None)
            rec.resample_steps.append(done)
            rec.n_resampled.append(dead.sum(-1))
            window_fired.zero_()
            since_fired.zero_()

        if step % cfg.log_every == 0 or done == cfg.steps:
            frac = rec.log_row(step, lr, out.losses, cfg.batch_size)
            if progress is not None:
                progress(step, {"loss": float(out.loss.detach()), "lr": lr, "frac_active": float(frac.mean())})
        if done % cfg.snapshot_every == 0 or done == cfg.steps:
            rec.snapshot(done, sae)
    return ToySAERun(sae.eval(), rec.finish())
