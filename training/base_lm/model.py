"""The GPT-Neo of tinystories-mini: construction, AdamW, the LR schedule, fast attention, loss, evaluation."""

from __future__ import annotations

import contextlib

import torch

from training.base_lm.config import BaseLMConfig
from training.schedules import LRSchedule


def build_model(cfg: BaseLMConfig, vocab_size: int, eot_id: int):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    if cfg.num_layers % 2:
        attention_types: list = [[["global", "local"], cfg.num_layers // 2], [["global"], 1]]
    else:
        attention_types = [[["global", "local"], cfg.num_layers // 2]]
    if cfg.context > cfg.max_position_embeddings:
        raise ValueError(f"context {cfg.context} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    config = GPTNeoConfig(
        vocab_size=vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_size=cfg.d_model,
        num_layers=cfg.num_layers,
        attention_types=attention_types,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.d_mlp,
        window_size=cfg.window_size,
        activation_function="gelu_new",
        resid_dropout=cfg.dropout,
        embed_dropout=cfg.dropout,
        attention_dropout=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = GPTNeoForCausalLM(config)
    model.generation_config.pad_token_id = eot_id
    return model


def make_optimizer(model: torch.nn.Module, cfg: BaseLMConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)



def lr_at(step: int, cfg: BaseLMConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    schedule = LRSchedule(peak=cfg.lr, total_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, decay="cosine",
                          decay_start=cfg.warmup_steps, min_lr_frac=cfg.min_lr / cfg.lr)
    return schedule.lr(step)


def _sdpa_attn(self, query, key, value, attention_mask=None):
    """GPT-Neo's eager attention (no 1/sqrt(d) scaling, causal or sliding-window mask, fp32 scores) computed
    with `scaled_dot_product_attention`, which never materializes the fp32 score matrix: ~2x faster training
    on CPU. Same function, same parameters; a drop-in for `GPTNeoSelfAttention._attn` (weights not returned)."""
    q_len, k_len = query.size(-2), key.size(-2)
    mask = self.bias[:, :, k_len - q_len : k_len, :k_len]
    if attention_mask is not None:
        mask = attention_mask.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    dropout = self.attn_dropout.p if self.training else 0.0
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, dropout_p=dropout, scale=1.0
    )
    return out.to(value.dtype), None


@contextlib.contextmanager
def fast_attention():
    """Use `_sdpa_attn` in every GPT-Neo attention layer inside the block (training and evaluation only:
    the exported model is a standard GPT-Neo using transformers' own attention)."""
    from transformers.models.gpt_neo import modeling_gpt_neo

    cls = modeling_gpt_neo.GPTNeoSelfAttention
    original = cls._attn
    cls._attn = _sdpa_attn
    try:
        yield
    finally:
        cls._attn = original


def lm_loss(model, ids: torch.Tensor, bf16: bool = False, reduction: str = "mean") -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def evaluate(model, blocks: list[torch.Tensor], batch_size: int, bf16: bool = False) -> float:
    """Mean next-token loss (nats) over the validation blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    full = [b for b in blocks if len(b) == len(blocks[0])]
    rest = [b for b in blocks if len(b) != len(blocks[0]) and len(b) > 1]
    for i in range(0, len(full), batch_size):
        batch = torch.stack(full[i : i + batch_size])
        total += lm_loss(model, batch, bf16, reduction="sum").item()
        count += batch.numel() - batch.size(0)
    for b in rest:
        total += lm_loss(model, b[None], bf16, reduction="sum").item()
        count += len(b) - 1
    model.train(was_training)
    return total / max(1, count)

