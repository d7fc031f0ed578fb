"""Interventions on the user's text: ablate, clamp or steer one SAE latent at the hook, and see what changes.

The edit acts on the residual at the hook and keeps the SAE's reconstruction error: ablating or clamping
latent i changes the residual by (new - old activation) x W_dec[i]; steering adds `value` x W_dec[i].
It applies to every token, or only to chosen positions of the text. `intervene` reports the per-token
next-token CE before / after, the top predictions at one position before / after, and continuations of
the text generated with and without the edit (greedy, or sampling with one seed for both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from explorer.analyze import check_compatible, clean_text, model_lock, tokenize_text
from explorer.errors import AnalysisError
from sae.architectures import SparseAutoencoder
from sae.base_model import BaseModel, residual_at
from sae.metrics import next_token_ce_from_logp, next_token_logp
from sae.splice import clean_pass, spliced_logits

OPERATIONS = ("ablate", "clamp", "steer")
"""ablate: set the latent to 0; clamp: set it to `value`; steer: add `value` x its decoder direction."""
MAX_NEW_TOKENS = 64
N_TOP = 8
"""Next-token predictions listed before / after."""


@dataclass(frozen=True)
class Intervention:
    latent: int
    op: str = "ablate"
    """One of OPERATIONS."""
    value: float = 0.0
    """The clamp value, or the steering multiple of the decoder direction (unused by ablate)."""
    positions: tuple[int, ...] | None = None
    """Token positions to edit; None: every token (including generated ones)."""


class Prediction(NamedTuple):
    token: str
    prob: float


@dataclass
class InterventionResult:
    token_texts: list[str]
    """Exact text of each token of the text."""
    tokens: list[str]
    """Display form of each token of the text."""
    ce_before: Tensor
    """[T] next-token CE of token t from tokens < t, clean (NaN at t = 0)."""
    ce_after: Tensor
    """[T] the same with the intervention."""
    position: int
    """Where the predictions are read (they predict token position + 1)."""
    top_before: list[Prediction]
    top_after: list[Prediction]
    continuation_before: str
    continuation_after: str
    latent_acts: Tensor
    """[T] the latent's activation on the text before the edit."""
    edited: list[int]
    """Positions of the text the edit touched."""

    @property
    def ce_change(self) -> Tensor:
        """[T] CE after - before (NaN at t = 0)."""
        return self.ce_after - self.ce_before


def validate(iv: Intervention, sae: SparseAutoencoder, n_tokens: int) -> None:
    """AnalysisError for an operation, latent or position that does not exist."""
    if iv.op not in OPERATIONS:
        raise AnalysisError(f"Unknown operation {iv.op!r}: choose one of {', '.join(OPERATIONS)}.")
    if not 0 <= int(iv.latent) < sae.cfg.d_sae:
        raise AnalysisError(f"Latent {iv.latent} does not exist: this SAE has latents 0..{sae.cfg.d_sae - 1}.")
    bad = [p for p in iv.positions or () if not 0 <= p < n_tokens]
    if bad:
        raise AnalysisError(f"Token position(s) {bad} are outside the text (0..{n_tokens - 1}).")


def edit_residual(sae: SparseAutoencoder, x: Tensor, iv: Intervention, n_text: int | None = None) -> Tensor:
    """Float[Tensor, "seq d"] -> the same with the intervention applied (positions >= n_text count as
    generated: edited only when `iv.positions` is None)."""
    p = next(sae.parameters())
    direction = sae.W_dec[int(iv.latent)].detach().to(device=x.device, dtype=x.dtype)
    where = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if iv.positions is None:
        where[:] = True
    else:
        where[[q for q in iv.positions if q < x.shape[0]]] = True
    with torch.inference_mode():
        if iv.op == "steer":
            coef = torch.full((x.shape[0],), float(iv.value), device=x.device, dtype=x.dtype)
        else:
            old = sae.encode(x.to(device=p.device, dtype=p.dtype))[:, int(iv.latent)].to(x.device, x.dtype)
            new = torch.zeros_like(old) if iv.op == "ablate" else torch.full_like(old, float(iv.value))
            coef = new - old
        return x + (coef * where)[:, None] * direction


def _generate(bm: BaseModel, ids: Tensor, n_new: int, edit: Callable[[Tensor], Tensor] | None, layer: int,
              seed: int | None) -> list[int]:
    """Up to `n_new` token ids after `ids` [T] (greedy when seed is None), the edit applied at each step."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    cur = ids[None]
    out: list[int] = []
    for _ in range(n_new):
        resid = residual_at(bm, cur, None, layer)
        rep = edit(resid[0])[None] if edit is not None else resid
        logits = spliced_logits(bm, cur, None, layer, rep)[0, -1].float().cpu()
        if gen is None:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
        cur = torch.cat([cur, torch.tensor([[nxt]], device=cur.device)], 1)
    return out


def _top(logits_row: Tensor, bm: BaseModel, strings: Sequence[str] | None, n: int = N_TOP) -> list[Prediction]:
    probs = torch.softmax(logits_row.float(), -1)
    top = torch.topk(probs, min(n, probs.shape[0]))
    def label(i: int) -> str:
        return strings[i] if strings is not None and i < len(strings) else bm.tokenizer.decode([i])
    return [Prediction(label(int(i)), float(v)) for v, i in zip(top.values, top.indices)]


def intervene(
    bm: BaseModel, sae: SparseAutoencoder, layer: int | str, text: str, iv: Intervention, position: int | None = None,
    n_new: int = 32, seed: int | None = None, token_strings: Sequence[str] | None = None,
) -> InterventionResult:
    """Apply `iv` to `text` at the hook; `position` (default: the last token) is where predictions are read;
    `n_new` (<= MAX_NEW_TOKENS) tokens are generated greedily, or sampled with `seed`."""
    from explorer.analyze import visible

    idx = check_compatible(bm, sae, layer)
    text, _ = clean_text(text)
    ids_list, pieces, _, _ = tokenize_text(bm, text)
    validate(iv, sae, len(ids_list))
    n_new = max(0, min(int(n_new), MAX_NEW_TOKENS, bm.context_size - len(ids_list)))
    pos = len(ids_list) - 1 if position is None else int(position)
    if not 0 <= pos < len(ids_list):
        raise AnalysisError(f"Position {pos} is outside the text (0..{len(ids_list) - 1}).")
    ids = torch.tensor(ids_list, dtype=torch.long)
    with model_lock(bm):
        clean = clean_pass(bm, ids[None], None, idx)
        x = clean.residual[0]
        edited_x = edit_residual(sae, x, iv)
        after = spliced_logits(bm, ids[None], None, idx, edited_x[None], clean.template)
        p = next(sae.parameters())
        with torch.inference_mode():
            acts = sae.encode(x.to(device=p.device, dtype=p.dtype))[:, int(iv.latent)].float().cpu()

        def edit(h: Tensor) -> Tensor:
            return edit_residual(sae, h, iv)

        cont_before = _generate(bm, ids, n_new, None, idx, seed)
        cont_after = _generate(bm, ids, n_new, edit, idx, seed)
    nan = torch.full((1,), float("nan"))
    ce_b = torch.cat([nan, next_token_ce_from_logp(next_token_logp(clean.logits), ids[None])[0].float().cpu()])
    ce_a = torch.cat([nan, next_token_ce_from_logp(next_token_logp(after), ids[None])[0].float().cpu()])
    decode = bm.tokenizer.decode
    return InterventionResult(
        token_texts=pieces, tokens=[visible(q) if q else "◦" for q in pieces], ce_before=ce_b, ce_after=ce_a,
        position=pos,
        top_before=_top(clean.logits[0, pos], bm, token_strings), top_after=_top(after[0, pos], bm, token_strings),
        continuation_before=decode(cont_before), continuation_after=decode(cont_after), latent_acts=acts,
        edited=list(range(len(ids_list))) if iv.positions is None else sorted(set(iv.positions)),
    )
