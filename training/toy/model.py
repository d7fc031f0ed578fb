"""Toy models of superposition (Elhage et al. 2022): the model, its batched sampling, its training and files.

A toy model packs `n_features` sparse features into `d_hidden` dimensions, `n_inst` independent
instances at once: h = W x, x' = ReLU(W^T h + b). The canonical experiment (ARENA's) is 16
instances of 5 features in 2 dimensions, where each instance learns a pentagon.

Speed (see bench/bench_toy.py): ~88% of the inputs hold no feature and are exactly zero, and
identical inputs have identical losses and gradients, so each batch can be drawn compactly
(`sample_hidden_compact`: the inputs holding a feature, plus zero rows weighted by how many empty
inputs they stand for; the weighted loss equals the full batch's exactly, on ~1/7 of the rows), and
batches are drawn many at a time (`BatchStream`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sae.architectures.base import matmul_inst
from sae.checkpoint import CheckpointError, read_json
from sae.layout import TOY_CONFIG_FILE, TOY_MODEL_FILE
from training.optim import make_adam

_SPARSE_SAMPLING_MAX_P = 0.1
"""Above this feature probability batches are sampled densely (one uniform draw per feature)."""


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


