"""Next-token cross-entropy and KL with activations spliced in at a hook: the one place they are computed.

`splice_losses` runs one batch clean (which also yields the hook's residual), with each replacement
spliced in, and with zeros spliced in, and returns per-position CE / KL; `DownstreamLosses` and
`downstream_losses` are its means. The evaluation (`training/evaluate.py`) accumulates the per-position
values over its batches; the explorer shows them per token.

Two shortcuts keep the spliced passes cheap, both exact (tests compare them with full passes):
- The blocks up to the hook never run on a spliced pass: their output is replaced anyway, so each of them
  returns the replacement directly (`skip_to_hook`), and only the blocks after the hook and the
  unembedding compute.
- Zeros at the hook make every position's residual identical from there on, so attention mixes identical
  values and every position's logits are the same: the ablation runs on one position and is broadcast.

Shapes follow jaxtyping, e.g. Float[Tensor, "batch seq vocab"].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae.base_model import BaseModel, _forward, _hidden, _layer_index
from sae.metrics import kl_div_from_logp, next_token_ce_from_logp, next_token_logp

DEFAULT_SPLICE_BUDGET = 64_000_000
"""Most logits (batch x seq x vocab) per spliced forward pass: replacements are stacked along the batch."""


def next_token_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Bool[Tensor, "batch seq-1"]: positions whose next token is a real (unpadded) prediction target."""
    if attention_mask is None:
        return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    m = attention_mask.bool()
    return m[:, 1:] & m[:, :-1]


def next_token_losses(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Float[Tensor, "batch seq-1"]: cross-entropy of predicting token t+1 at t; 0 where masked."""
    ce = next_token_ce_from_logp(next_token_logp(logits), input_ids.to(logits.device))
    return ce * next_token_mask(input_ids, attention_mask).to(ce.device)


# ---------------------------------------------------------------------------------------- passes


class CleanPass(NamedTuple):
    logits: Tensor
    """[batch, seq, vocab] of the unmodified model."""
    residual: Tensor
    """[batch, seq, d_model] at the hook."""
    template: Any
    """The hooked block's raw output: its structure lets `skip_to_hook` imitate the block."""


def clean_pass(bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int | str) -> CleanPass:
    """Clean logits and the hook's residual from one full forward pass."""
    idx = _layer_index(bm, layer)
    captured: list[Any] = []
    handle = bm.blocks[idx].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.inference_mode():
            logits = _forward(bm, input_ids, attention_mask).logits
    finally:
        handle.remove()
    return CleanPass(logits, _hidden(captured[0]).clone(), captured[0])


@contextlib.contextmanager
def skip_to_hook(bm: BaseModel, layer: int | str, replacement: Tensor, template: Any = None) -> Iterator[None]:
    """While active, blocks 0..layer do not compute: each returns `replacement` (in the structure of
    `template`, the hooked block's output: a tensor or a tuple whose first item is the hidden state; None:
    found by a one-token pass)."""
    idx = _layer_index(bm, layer)
    if template is None:  # learn the block's output structure from a one-token pass
        template = clean_pass(bm, torch.zeros(1, 1, dtype=torch.long), None, idx).template
    rest = tuple(template[1:]) if isinstance(template, (tuple, list)) else None

    def skipped(*args, **kwargs):
        return replacement if rest is None else (replacement, *rest)

    blocks = [bm.blocks[i] for i in range(idx + 1)]
    for block in blocks:
        block.forward = skipped  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def spliced_logits(
    bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int | str, replacement: Tensor,
    template: Any = None,
) -> Tensor:
    """Float[Tensor, "batch seq vocab"]: logits with the hook's output replaced; the blocks before it skipped."""
    if replacement.shape[:2] != input_ids.shape:
        raise ValueError(f"replacement shape {tuple(replacement.shape)} does not fit ids {tuple(input_ids.shape)}")
    dtype = next(bm.model.parameters()).dtype
    rep = replacement.to(device=bm.device, dtype=dtype)
    with skip_to_hook(bm, layer, rep, template), torch.inference_mode():
        return _forward(bm, input_ids, attention_mask).logits


def zero_ablation_logits(bm: BaseModel, input_ids: Tensor, layer: int | str, template: Any = None) -> Tensor:
    """Float[Tensor, "batch seq vocab"]: logits with zeros spliced in at the hook, computed on one position."""
    one = input_ids[:1, :1]
    zeros = torch.zeros(1, 1, bm.d_model)
    row = spliced_logits(bm, one, None, layer, zeros, template)  # [1, 1, vocab]
    return row.expand(input_ids.shape[0], input_ids.shape[1], row.shape[-1])


# ---------------------------------------------------------------------------------------- losses


@dataclass
class SpliceLosses:
    """Per-position next-token losses of one batch; position t predicts token t+1."""

    mask: Tensor
    """Bool [batch, seq-1]: real prediction targets (the others are 0 below)."""
    ce_clean: Tensor
    """[batch, seq-1] CE of the unmodified model."""
    ce_ablation: Tensor
    """[batch, seq-1] CE with zeros spliced in at the hook."""
    ce_spliced: list[Tensor]
    """Per replacement: [batch, seq-1] CE with it spliced in."""
    kl_spliced: list[Tensor]
    """Per replacement: [batch, seq-1] KL(clean || spliced)."""
    residual: Tensor
    """[batch, seq, d] the clean residual at the hook."""

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def mean(self, i: int = 0) -> DownstreamLosses:
        """Means over the real positions, for replacement i."""
        n = max(self.n_tokens, 1)
        return DownstreamLosses(float(self.ce_clean.sum() / n), float(self.ce_spliced[i].sum() / n),
                                float(self.ce_ablation.sum() / n), float(self.kl_spliced[i].sum() / n), self.n_tokens)


class DownstreamLosses(NamedTuple):
    ce_clean: float
    ce_spliced: float
    ce_ablation: float
    """zeros spliced in"""
    kl_spliced: float
    """KL(clean || spliced), mean over the same next-token positions"""
    n_tokens: int


Replacements = Sequence[Tensor] | Callable[[Tensor], Sequence[Tensor]]


def splice_losses(
    bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int | str, replacements: Replacements,
    budget: int = DEFAULT_SPLICE_BUDGET, clean: CleanPass | None = None,
) -> SpliceLosses:
    """Per-position CE clean / with zeros / with each replacement, and KL(clean || replacement).

    `replacements` are Float[Tensor, "batch seq d_model"], or a function from the clean residual to them
    (e.g. SAE reconstructions), which saves a separate pass to the hook. `clean`: the batch's `clean_pass`
    when the caller already ran it.
    """
    idx = _layer_index(bm, layer)
    clean, resid, template = clean or clean_pass(bm, input_ids, attention_mask, idx)
    with torch.inference_mode():
        reps = list(replacements(resid) if callable(replacements) else replacements)
    mask = next_token_mask(input_ids, attention_mask).to(clean.device)
    ids = input_ids.to(clean.device)
    logp_clean = next_token_logp(clean)
    maskf = mask.float()

    def ce(logp: Tensor) -> Tensor:
        return next_token_ce_from_logp(logp, ids) * maskf

    ablated = zero_ablation_logits(bm, input_ids, idx, template)
    ce_spliced, kl_spliced = [], []
    per_call = max(1, budget // max(clean.numel(), 1))
    b = input_ids.shape[0]
    for start in range(0, len(reps), per_call):
        chunk = reps[start : start + per_call]
        n = len(chunk)
        mask_n = None if attention_mask is None else attention_mask.repeat(n, 1)
        logits = spliced_logits(bm, input_ids.repeat(n, 1), mask_n, idx, torch.cat(chunk), template)
        for lg in logits.split(b):
            logp = next_token_logp(lg)
            ce_spliced.append(ce(logp))
            kl_spliced.append(kl_div_from_logp(logp_clean, logp) * maskf)
        del logits
    return SpliceLosses(mask, ce(logp_clean), ce(next_token_logp(ablated)), ce_spliced, kl_spliced, resid)


def downstream_losses(
    bm: BaseModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int | str,
    replacement: Tensor | Callable[[Tensor], Tensor],
) -> DownstreamLosses:
    """Mean CE clean / spliced / zero-ablated and KL(clean || spliced) on one batch (`splice_losses`' means)."""
    reps = (lambda x: [replacement(x)]) if callable(replacement) else [replacement]
    return splice_losses(bm, input_ids, attention_mask, layer, reps).mean(0)
