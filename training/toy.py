"""Toy models of superposition (Elhage et al. 2022) and SAEs trained on their hidden activations.

A toy model packs `n_features` sparse features into `d_hidden` dimensions, `n_inst` independent
instances at once: h = W x, x' = ReLU(W^T h + b). The canonical experiment (ARENA's) is 16
instances of 5 features in 2 dimensions, where each instance learns a pentagon. One batched SAE
(`SAEConfig(n_inst=16, d_in=2, d_sae=5)`) then learns all 16 hidden spaces at once; a feature
counts as recovered when some decoder row has cosine > 0.99 with its direction (a column of W).

Speed (see bench/bench_toy.py): ~88% of the inputs hold no feature and are exactly zero, and
identical inputs have identical losses and gradients, so each batch is drawn compactly (the inputs
holding a feature, plus zero rows weighted by how many empty inputs they stand for: the weighted
loss equals the full batch's exactly, on ~1/7 of the rows); batches are drawn many at a time,
firing counts stay on-tensor, nothing calls `.item()` inside the loop, and Adam is the fused kernel.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae.architectures import SparseAutoencoder, build_sae
from sae.architectures.base import matmul_inst
from sae.checkpoint import CheckpointError, read_json, save_sae, write_folder_atomically
from sae.config import ARCHITECTURES, SAEConfig
from sae.metrics import METRICS_VERSION, RECOVERY_THRESHOLD, ReconstructionStats, all_recovered, feature_recovery
from training.optim import constrained_step, make_adam, set_lr
from training.resampling import resample_dead_latents
from training.schedules import LRSchedule, sparsity_coeff_at

RESAMPLE_METHODS = ("none", "simple", "advanced")
MODEL_NAME = "toy-superposition"
HOOK_NAME = "hidden"
TOY_MODEL_FILE = "toy_model.safetensors"
TOY_CONFIG_FILE = "toy_model.json"
RUN_METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "training_config.json"
LOG_FILE = "training_log.csv"
FEATURES_PNG = "features.png"
TRAINING_GIF = "training.gif"
_SPARSE_SAMPLING_MAX_P = 0.1
"""Above this feature probability batches are sampled densely (one uniform draw per feature)."""


# ==================================================================================================
# The toy model
# ==================================================================================================
@dataclass
class ToyModelConfig:
    n_inst: int = 16
    """Independent toy models trained side by side."""
    n_features: int = 5
    """Sparse input features per instance."""
    d_hidden: int = 2
    """Width of the hidden layer the features are squeezed into (2 can be drawn)."""
    feature_probability: list[float] = field(default_factory=lambda: [0.025])
    """Probability that a feature is present: one value for every instance, or one per instance."""
    importance_decay: float = 1.0
    """Feature i has importance decay**i in the toy model's loss (1.0: all equally important)."""
    toy_steps: int = 10_000
    """Adam steps of the toy model's own training."""
    toy_batch_size: int = 1024
    """Inputs per toy-model step."""
    toy_lr: float = 1e-3
    """Toy-model learning rate."""
    toy_seed: int = 0
    """Seed of the toy model's initialisation and data."""

    def __post_init__(self) -> None:
        if len(self.feature_probability) not in (1, self.n_inst):
            raise ValueError(f"feature_probability needs 1 or n_inst={self.n_inst} values, "
                             f"got {len(self.feature_probability)}")
        if not all(0.0 <= p <= 1.0 for p in self.feature_probability):
            raise ValueError(f"feature probabilities must lie in [0, 1], got {self.feature_probability}")


class ToyModel(nn.Module):
    """`n_inst` toy models: W `[inst, d_hidden, n_features]`, b_final `[inst, n_features]`."""

    def __init__(self, cfg: ToyModelConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.toy_seed if seed is None else seed)
        w = torch.empty(cfg.n_inst, cfg.d_hidden, cfg.n_features)
        nn.init.xavier_normal_(w, generator=gen)
        self.W = nn.Parameter(w)
        self.b_final = nn.Parameter(torch.zeros(cfg.n_inst, cfg.n_features))
        p = torch.tensor(cfg.feature_probability, dtype=torch.float32)
        self.register_buffer("feature_probability", p[:, None].expand(cfg.n_inst, cfg.n_features).clone())
        self.register_buffer("importance", cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32))

    def feature_directions(self) -> Tensor:
        """Where each feature lives in the hidden space: `[inst, n_features, d_hidden]`."""
        return self.W.detach().transpose(-1, -2)

    def hidden(self, x: Tensor) -> Tensor:
        """`x [batch, inst, n_features] -> h [batch, inst, d_hidden]`."""
        return torch.einsum("bif,idf->bid", x, self.W)

    def forward(self, x: Tensor) -> Tensor:
        """`x [batch, inst, n_features] -> x' [batch, inst, n_features]`."""
        return torch.relu(torch.einsum("bid,idf->bif", self.hidden(x), self.W) + self.b_final)

    def loss_per_instance(self, x: Tensor, out: Tensor) -> Tensor:
        """Importance-weighted squared error averaged over batch and features `[inst]` (minimised summed)."""
        return (self.importance * (out - x).pow(2)).mean((0, 2))

    # --- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _present(self, numel: int, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Flat indices of present features in `numel` = n * inst * n_features slots, and their magnitudes.

        A Bernoulli(p) process over the flat grid: gaps between successes are Geometric(p), so the cost
        scales with the number of present features. Per-slot probabilities below the maximum are
        reached by thinning (keep with probability p / p_max), which is exact.
        """
        p = self.feature_probability
        p_max = float(p.max())
        if p_max <= 0.0 or numel == 0:
            empty = torch.empty(0, dtype=torch.long, device=p.device)
            return empty, torch.empty(0, device=p.device)
        mean = numel * p_max
        n_draw = int(mean + 6 * math.sqrt(mean) + 64)
        pos = torch.empty(n_draw, dtype=torch.float64, device=p.device).geometric_(p_max, generator=gen).cumsum(0)
        while pos[-1] < numel:  # ran out of draws (astronomically rare at 6 sigma): extend
            more = torch.empty(n_draw, dtype=torch.float64, device=p.device).geometric_(p_max, generator=gen)
            pos = torch.cat([pos, pos[-1] + more.cumsum(0)])
        idx = pos.long() - 1
        idx = idx[idx < numel]
        flat_p = p.flatten()
        if bool((flat_p < p_max).any()):
            u = torch.rand(idx.numel(), generator=gen, device=p.device)
            idx = idx[u * p_max < flat_p[idx % flat_p.numel()]]
        return idx, torch.rand(idx.numel(), generator=gen, device=p.device)

    def _sample_densely(self) -> bool:
        return float(self.feature_probability.max()) > _SPARSE_SAMPLING_MAX_P

    @torch.no_grad()
    def sample_features(self, n: int, batch_size: int, gen: torch.Generator | None = None) -> Tensor:
        """`n` batches of features `[n, batch, inst, n_features]`: each uniform in [0, 1) with probability p, else 0."""
        shape = (n, batch_size, self.cfg.n_inst, self.cfg.n_features)
        p = self.feature_probability
        if self._sample_densely():
            # One draw per slot: u < p marks presence, and u / p given u < p is uniform on [0, 1).
            u = torch.rand(shape, generator=gen, device=p.device)
            return torch.where(u < p, u / p.clamp_min(1e-30), torch.zeros((), device=p.device))
        idx, mag = self._present(math.prod(shape), gen)
        return torch.zeros(math.prod(shape), device=p.device).index_put_((idx,), mag).view(shape)

    @torch.no_grad()
    def sample_hidden(self, n: int, batch_size: int, gen: torch.Generator | None = None) -> Tensor:
        """`n` batches of hidden activations h = W x, `[n, batch, inst, d_hidden]` (what the SAE reads)."""
        cfg = self.cfg
        shape = (n, batch_size, cfg.n_inst, cfg.n_features)
        if self._sample_densely():
            x = self.sample_features(n, batch_size, gen).flatten(0, 1)
            return self.hidden(x).view(n, batch_size, cfg.n_inst, cfg.d_hidden)
        idx, mag = self._present(math.prod(shape), gen)
        rows = idx // cfg.n_features  # flat (n, batch, inst) index
        directions = self.feature_directions()[rows % cfg.n_inst, idx % cfg.n_features]  # [present, d_hidden]
        h = torch.zeros(n * batch_size * cfg.n_inst, cfg.d_hidden, device=self.W.device)
        h.index_add_(0, rows, mag[:, None] * directions)
        return h.view(n, batch_size, cfg.n_inst, cfg.d_hidden)

    @torch.no_grad()
    def sample_hidden_compact(self, n: int, batch_size: int, gen: torch.Generator | None = None) -> CompactBatch:
        """`n` batches of h distributed like `sample_hidden`'s, with the all-zero inputs folded into weighted rows.

        At p = 0.025 about 88% of inputs have no feature at all (h = 0). Identical inputs have identical
        per-example losses and gradients, and a batch's order does not matter, so per instance we draw
        how many inputs have a feature (Binomial(batch, 1 - (1-p)^n_features)), draw just those inputs
        (first present feature by inverse CDF, later ones independently), and let zero rows weighted
        by the remaining count stand for the rest: the weighted batch mean is that of a full batch,
        at ~1/7 of the rows.
        """
        cfg = self.cfg
        n_inst, n_feat, dev = cfg.n_inst, cfg.n_features, self.W.device
        fp = self.feature_probability
        if self._sample_densely() or not bool((fp == fp[:, :1]).all()):
            h = self.sample_hidden(n, batch_size, gen)
            return CompactBatch(h, torch.ones(h.shape[:-1], device=dev))
        p = fp[:, 0].clamp_min(1e-12)  # [inst]
        q = 1 - (1 - p) ** n_feat  # P(an input has a feature)
        counts = torch.binomial(torch.full((n, n_inst), float(batch_size), device=dev), q.expand(n, n_inst),
                                generator=gen)
        width = int(counts.max()) + 1  # >= 1 zero row per instance
        u = torch.rand(n, width, n_inst, generator=gen, device=dev)
        first = (torch.log1p(-u * q) / torch.log1p(-p)).floor_().clamp_(0, n_feat - 1).long()
        u = torch.rand(n, width, n_inst, n_feat, generator=gen, device=dev)
        u.div_(p[:, None])  # given u < p, u / p is uniform on [0, 1): one draw gives presence and magnitude
        x = u.masked_fill_((u >= 1) | (torch.arange(n_feat, device=dev) <= first[..., None]), 0.0)
        x.scatter_(-1, first[..., None], torch.rand(n, width, n_inst, 1, generator=gen, device=dev))
        filled = torch.arange(width, device=dev).view(1, width, 1) < counts[:, None, :]  # [n, width, inst]
        x.mul_(filled[..., None])
        h = matmul_inst(x.view(n * width, n_inst, n_feat), self.W.detach().transpose(-1, -2))
        h = h.view(n, width, n_inst, cfg.d_hidden)
        weight = torch.where(filled, torch.ones((), device=dev), (batch_size - counts[:, None, :])
                             / (width - counts[:, None, :]))
        return CompactBatch(h, weight)


class CompactBatch(NamedTuple):
    h: Tensor
    """Hidden activations `[*n, rows, inst, d_hidden]`: every nonzero input, then zero rows."""
    weight: Tensor
    """How many inputs each row stands for `[*n, rows, inst]`; sums to the batch size per instance."""


class BatchStream:
    """Yields one batch at a time out of chunks of `chunk` batches sampled together (cheaper per batch)."""

    def __init__(self, sample: Callable[[int], Any], chunk: int) -> None:
        self.sample, self.chunk = sample, max(1, chunk)
        self.buf: Any = None
        self.i = 0
        self.size = 0

    def next(self) -> Any:
        if self.buf is None or self.i == self.size:
            self.buf, self.i = self.sample(self.chunk), 0
            self.size = len(self.buf[0]) if isinstance(self.buf, tuple) else self.buf.shape[0]
        self.i += 1
        if isinstance(self.buf, tuple):
            return type(self.buf)(*(t[self.i - 1] for t in self.buf))
        return self.buf[self.i - 1]


def train_toy_model(model: ToyModel, progress: Callable[[int], None] | None = None, chunk: int = 16) -> Tensor:
    """Train the toy model with its config's steps/batch/lr (Adam); returns the loss per 100 steps `[n_logs, inst]`."""
    cfg = model.cfg
    gen = torch.Generator(device=model.W.device).manual_seed(cfg.toy_seed + 1)
    opt = make_adam(model.parameters(), cfg.toy_lr, (0.9, 0.999))
    stream = BatchStream(lambda n: model.sample_features(n, cfg.toy_batch_size, gen), chunk)
    curve = []
    for step in range(cfg.toy_steps):
        x = stream.next()
        out = model(x)
        per_inst = model.loss_per_instance(x, out)
        per_inst.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.toy_steps - 1:
            curve.append(per_inst.detach())
            if progress is not None:
                progress(step)
    return torch.stack(curve) if curve else torch.empty(0, cfg.n_inst)


def save_toy_model(model: ToyModel, folder: str | Path) -> None:
    """Write `toy_model.safetensors` (W, b_final, feature_probability, importance) and `toy_model.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W": model.W, "b_final": model.b_final, "feature_probability": model.feature_probability,
               "importance": model.importance}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / TOY_MODEL_FILE))
    (folder / TOY_CONFIG_FILE).write_text(json.dumps({
        **asdict(model.cfg),
        "tensors": {"W": "[n_inst, d_hidden, n_features]; column f of instance i is feature f's direction",
                    "b_final": "[n_inst, n_features]", "feature_probability": "[n_inst, n_features]",
                    "importance": "[n_features]"},
        "forward": "h = W x; x' = ReLU(W^T h + b_final)",
    }, indent=2) + "\n")


def load_toy_model(folder: str | Path) -> ToyModel:
    """Inverse of `save_toy_model`; raises CheckpointError naming the bad file."""
    folder = Path(folder)
    raw = read_json(folder / TOY_CONFIG_FILE)
    known = {f.name for f in fields(ToyModelConfig)}
    try:
        cfg = ToyModelConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / TOY_CONFIG_FILE}: {err}") from err
    path = folder / TOY_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from err
    model = ToyModel(cfg)
    with torch.no_grad():
        for name in ("W", "b_final", "feature_probability", "importance"):
            target = getattr(model, name)
            if name not in tensors or tensors[name].shape != target.shape:
                raise CheckpointError(f"{path}: tensor {name} missing or not of shape {tuple(target.shape)}")
            target.copy_(tensors[name])
    return model


# ==================================================================================================
# SAE training on the toy model's hidden activations
# ==================================================================================================
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
    dead_frequency: float = 1e-4
    """A latent firing on at most this fraction of the window's inputs counts as dead (0: never fired). A little
    above 0 also catches the nearly dead latents JumpReLU and gated SAEs leave between two features."""
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
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"unknown resample method {self.resample!r}; expected one of {RESAMPLE_METHODS}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
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
            metadata={"model_name": MODEL_NAME, "hook_name": HOOK_NAME, "dataset_path": "synthetic toy features"},
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

    n_inst, n_lat = sae_cfg.n_inst or 1, sae_cfg.d_sae
    log_fired = torch.zeros(n_inst, n_lat, device=device)
    window_fired = torch.zeros(n_inst, n_lat, device=device)
    since_fired = torch.zeros(n_inst, n_lat, device=device)
    log_rows: list[tuple[int, float, dict[str, Tensor], Tensor]] = []
    snaps: list[tuple[int, Tensor, Tensor]] = []
    resample_steps: list[int] = []
    n_resampled: list[Tensor] = []
    last_log = 0
    schedule = cfg.schedule()
    lr_now = schedule.lr(0)

    def snapshot(step: int) -> None:
        snaps.append((step, sae.W_dec.detach().clone(), sae.W_enc.detach().clone()))

    snapshot(0)
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
            log_fired += fired
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
            resample_steps.append(done)
            n_resampled.append(dead.sum(-1))
            window_fired.zero_()
            since_fired.zero_()

        if step % cfg.log_every == 0 or done == cfg.steps:
            losses = {name: v.detach() for name, v in out.losses.items()}
            log_rows.append((step, lr, losses, log_fired / ((done - last_log) * cfg.batch_size)))
            log_fired = torch.zeros_like(log_fired)
            last_log = done
            if progress is not None:
                progress(step, {"loss": float(out.loss.detach()), "lr": lr,
                                "frac_active": float(log_rows[-1][3].mean())})
        if done % cfg.snapshot_every == 0 or done == cfg.steps:
            snapshot(done)

    names = list(log_rows[0][2]) if log_rows else []
    log = ToyTrainLog(
        steps=torch.tensor([r[0] for r in log_rows]),
        lr=torch.tensor([r[1] for r in log_rows]),
        losses={n: torch.stack([r[2][n] for r in log_rows]).cpu() for n in names},
        frac_active=torch.stack([r[3] for r in log_rows]).cpu() if log_rows else torch.empty(0, n_inst, n_lat),
        snapshot_steps=torch.tensor([s[0] for s in snaps]),
        W_dec=torch.stack([s[1] for s in snaps]).cpu(),
        W_enc=torch.stack([s[2] for s in snaps]).cpu(),
        resample_steps=resample_steps,
        n_resampled=torch.stack(n_resampled).cpu() if n_resampled else torch.empty(0, n_inst, dtype=torch.long),
    )
    return ToySAERun(sae.eval(), log)


# ==================================================================================================
# Evaluation and the run folder
# ==================================================================================================
class ToyEval(NamedTuple):
    best_cos: Tensor
    """Best cosine of each true feature with any decoder row `[inst, n_features]`."""
    all_recovered: Tensor
    """Every feature recovered at > RECOVERY_THRESHOLD `[inst]`."""
    frac_dead: Tensor
    """Latents that fired on none of the eval inputs `[inst]`."""
    fire_counts: Tensor
    """Inputs each latent fired on `[inst, d_sae]`."""
    recon: dict[str, Any]
    """ReconstructionStats summary (lists over instances)."""
    n_eval: int
    """Eval inputs per instance."""


@torch.no_grad()
def evaluate_toy_sae(model: ToyModel, sae: SparseAutoencoder, n_batches: int = 16, batch_size: int = 1024,
                     seed: int = 999) -> ToyEval:
    """Feature recovery, dead latents and reconstruction on `n_batches * batch_size` fresh inputs."""
    gen = torch.Generator(device=model.W.device).manual_seed(seed)
    stats = ReconstructionStats()
    for h in model.sample_hidden(n_batches, batch_size, gen):
        out = sae(h)
        stats.update(h, out.reconstruction, out.latents)
    best = feature_recovery(model.feature_directions(), sae.W_dec.detach())
    counts = stats.fire_counts if stats.fire_counts is not None else torch.zeros(1)
    return ToyEval(best, all_recovered(best), (counts == 0).double().mean(-1), counts, stats.summary(),
                   stats.n_tokens)


def run_name(cfg: ToySAEConfig) -> str:
    return f"{cfg.architecture}-{cfg.resample}"


def run_metrics(cfg: ToySAEConfig, ev: ToyEval) -> dict[str, Any]:
    """The run folder's metrics.json: a summary plus one entry per instance."""
    n_inst = ev.best_cos.shape[0]
    per = []
    for i in range(n_inst):
        per.append({
            "inst": i,
            "best_cos": [round(c, 5) for c in ev.best_cos[i].tolist()],
            "n_recovered": int((ev.best_cos[i] > RECOVERY_THRESHOLD).sum()),
            "all_recovered": bool(ev.all_recovered[i]),
            "frac_dead": float(ev.frac_dead[i]),
            **{k: round(v[i], 6) for k, v in ev.recon.items() if isinstance(v, list)},
        })
    return {
        "run": run_name(cfg),
        "architecture": cfg.architecture,
        "resample": cfg.resample,
        "summary": {
            "n_all_recovered": int(ev.all_recovered.sum()),
            "n_inst": n_inst,
            "mean_frac_dead": round(float(ev.frac_dead.mean()), 6),
            "mean_best_cos": round(float(ev.best_cos.mean()), 6),
            "features_recovered": int((ev.best_cos > RECOVERY_THRESHOLD).sum()),
            "features_total": ev.best_cos.numel(),
        },
        "recovery_threshold": RECOVERY_THRESHOLD,
        "eval_inputs_per_instance": ev.n_eval,
        "metrics_version": METRICS_VERSION,
        "instances": per,
    }


def write_log_csv(log: ToyTrainLog, path: str | Path) -> None:
    """One row per (log step, instance): step, inst, lr, loss terms, mean frac_active, frac_active per latent."""
    names = list(log.losses)
    n_lat = log.frac_active.shape[-1]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "inst", "lr", *names, "frac_active", *[f"frac_active_{j}" for j in range(n_lat)]])
        for r, step in enumerate(log.steps.tolist()):
            lr = f"{log.lr[r].item():.4g}"
            for i in range(log.frac_active.shape[1]):
                fa = log.frac_active[r, i]
                w.writerow([step, i, lr, *[f"{log.losses[n][r, i].item():.4g}" for n in names],
                            f"{fa.mean().item():.4g}", *[f"{v:.3g}" for v in fa.tolist()]])


def save_run(folder: str | Path, model: ToyModel, cfg: ToySAEConfig, run: ToySAERun, ev: ToyEval,
             pictures: bool = True) -> Path:
    """Write a run folder atomically: toy model, `inst_XX/` SAELens folders, metrics, log, pictures."""
    metrics = run_metrics(cfg, ev)
    config = {"toy_model": asdict(model.cfg), "sae": asdict(cfg), "resolved_sae_config": {
        k: v for k, v in asdict(run.sae.cfg).items() if k != "metadata"}, "torch_version": torch.__version__,
        "resample_steps": run.log.resample_steps}
    n_inst = run.sae.cfg.n_inst or 1
    log10_sparsity = (ev.fire_counts.double() / max(ev.n_eval, 1) + 1e-10).log10()

    def write(tmp: Path) -> None:
        save_toy_model(model, tmp)
        for i in range(n_inst):
            save_sae(run.sae, tmp / f"inst_{i:02d}", inst=i,
                     metadata={"model_name": MODEL_NAME, "hook_name": HOOK_NAME, "instance": i,
                               "run": run_name(cfg), "toy_model": f"../{TOY_MODEL_FILE}",
                               "n_features": model.cfg.n_features,
                               "feature_probability": [round(v, 6) for v in model.feature_probability[i].tolist()]},
                     log10_sparsity=log10_sparsity[i], metrics=metrics["instances"][i], training_config=config)
        (tmp / RUN_METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        write_log_csv(run.log, tmp / LOG_FILE)
        if pictures and model.cfg.d_hidden == 2:
            from training.toy_plots import animate_training, plot_features

            plot_features(model.feature_directions(), run.sae, ev.best_cos, tmp / FEATURES_PNG,
                          title=f"{run_name(cfg)}: {int(ev.all_recovered.sum())}/{n_inst} instances recover "
                                f"all {model.cfg.n_features} features")
            animate_training(model.feature_directions(), run.log, tmp / TRAINING_GIF, title=run_name(cfg))

    return write_folder_atomically(folder, write)
