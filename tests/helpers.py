"""Test helpers shared across folders: tiny random GPT-Neo model folders, toy models in a known state."""

import math
from pathlib import Path

import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from sae.base_model import gpt2_tokenizer
from training.toy.model import ToyModel, ToyModelConfig


def save_tiny_gpt_neo(folder: Path, hidden: int = 32, layers: int = 4, positions: int = 128, **config) -> Path:
    """A random GPT-Neo (alternating global/local attention) with the real GPT-2 tokenizer, saved as an HF folder."""
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=4,
                       max_position_embeddings=positions, attention_types=[[["global", "local"], layers // 2]],
                       window_size=16, intermediate_size=64, **config)  # fmt: skip
    GPTNeoForCausalLM(cfg).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def pentagon_model(n_inst: int = 4, p: float = 0.025) -> ToyModel:
    """A toy model whose features already form regular pentagons (what training converges to)."""
    model = ToyModel(ToyModelConfig(n_inst=n_inst, feature_probability=[p]))
    angles = torch.arange(5) * 2 * math.pi / 5 + torch.rand(n_inst, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.W.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 1.15)
    return model
