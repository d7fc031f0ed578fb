"""Perplexity of a causal LM on held-out stories, per token and in tokenizer-independent units.

`python -m training lm-eval --model DIR [--data FILE ...]` scores the stories that the base-LM and SAE
pipelines hold out (every `val_every`-th story of each file), so models with different tokenizers can
be compared on the same text: per-token perplexity (depends on the tokenizer), bits per UTF-8 byte and
word-level perplexity (total nats / whitespace-separated words) do not.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from sae.dataclass_cli import parse_dataclass


@dataclass(frozen=True)
class HeldOutPerplexity:
    stories: int
    tokens: int
    """Predicted tokens: each story's tokens and the `<|endoftext|>` after it, given `<|endoftext|>` first."""
    bytes: int
    words: int
    mean_loss: float
    """Nats per predicted token."""
    perplexity: float
    """Per token of the model's own tokenizer."""
    bits_per_byte: float
    word_perplexity: float


def encode_quietly(tokenizer, stories: list[str]) -> list[list[int]]:
    """Token ids of each story, without transformers' warning about stories longer than the context."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer(stories, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)


@torch.no_grad()
def held_out_perplexity(model, tokenizer, stories: list[str], max_len: int | None = None) -> HeldOutPerplexity:
    """Score each story on its own, `<|endoftext|>` prepended as context (longer stories are truncated)."""
    was_training = model.training
    model.eval()
    eot = tokenizer.eos_token_id
    max_len = max_len or model.config.max_position_embeddings
    total_nats, total_tokens = 0.0, 0
    encoded = encode_quietly(tokenizer, stories)
    for story_ids in encoded:
        ids = [eot, *story_ids, eot][:max_len]
        x = torch.tensor([ids], device=model.device)
        logits = model(input_ids=x).logits.float()
        nats = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total_nats += nats.item()
        total_tokens += len(ids) - 1
    model.train(was_training)
    n_bytes = sum(len(s.encode("utf-8")) for s in stories)
    n_words = sum(len(s.split()) for s in stories)
    return HeldOutPerplexity(
        stories=len(stories),
        tokens=total_tokens,
        bytes=n_bytes,
        words=n_words,
        mean_loss=total_nats / total_tokens,
        perplexity=math.exp(total_nats / total_tokens),
        bits_per_byte=total_nats / math.log(2) / n_bytes,
        word_perplexity=math.exp(total_nats / n_words),
    )


@dataclass
class LMEvalConfig:
    model: str = "checkpoints/tinystories-mini"
    """A Hugging Face model folder or Hub id."""
    data: list[str] | None = None
    """Stories files; None: the base LM's default sources (both local samples)."""
    val_every: int = 10
    """Score every val_every-th story of each file (the held-out split of training)."""
    all_stories: bool = False
    """Score every story of the files instead of the held-out ones."""


def main(argv: list[str] | None = None) -> None:
    from training.stories import default_base_lm_sources, load_stories, split_stories

    cfg = parse_dataclass(LMEvalConfig, argv, prog="python -m training lm-eval", description=__doc__.split("\n")[0])
    from sae.base_model import load_base_model

    base = load_base_model(cfg.model)
    results = {}
    for source in cfg.data or [str(p) for p in default_base_lm_sources()]:
        stories = load_stories(source)
        stories = stories if cfg.all_stories else split_stories(stories, cfg.val_every).val
        results[source] = dataclasses.asdict(held_out_perplexity(base.model, base.tokenizer, stories))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
