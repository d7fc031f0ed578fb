"""The configuration of `python -m training base-lm` (its flags) and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.stories import STORY_SEPARATOR

EOT = STORY_SEPARATOR
PROMPT = "Once upon a time"
EXPORT_DTYPE = torch.float16

DESCRIPTION = (
    "Train tinystories-mini: a byte-level BPE tokenizer and a small GPT-Neo on TinyStories, "
    "with periodic atomic checkpoints (--resume) and a Hugging Face model folder as output."
)


class BaseLMError(Exception):
    """A bad input (missing data file, inconsistent config): reported without a traceback."""


@dataclass
class BaseLMConfig:
    data: list[str] | None = None
    """Stories: one or more UTF-8 text files whose stories are separated by `<|endoftext|>` lines, or Hugging
    Face dataset ids; every val_every-th story of each is held out. None: the local samples
    ../shared/data/tinystories/{train,validation}_sample.txt (or $TINYSTORIES_FILE alone)."""
    max_stories: int | None = None
    """Use only the first this many stories (None: all)."""
    val_every: int = 10
    """Every val_every-th story is held out for validation (the same split as the SAE pipeline)."""
    output_dir: Path = Path("checkpoints/tinystories-mini")
    """Where the final Hugging Face model folder (weights, tokenizer, model card, log, plot) is written."""
    run_dir: Path = Path("runs/base-lm")
    """Where the training state is checkpointed (resume from here). A run without --resume starts over and
    deletes the checkpoints it finds there."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir (the config must match the checkpoint's)."""

    vocab_size: int = 4096
    """Target vocabulary size of the byte-level BPE tokenizer (256 bytes + `<|endoftext|>` + merges)."""
    d_model: int = 256
    """Hidden size of the model."""
    num_layers: int = 4
    """Number of transformer blocks; attention alternates global/local as in TinyStories-33M."""
    num_heads: int = 8
    """Attention heads per block (d_model must be divisible by it)."""
    d_mlp: int | None = None
    """MLP hidden size (None: 4 * d_model)."""
    window_size: int = 256
    """Sliding-window length of the local-attention blocks."""
    max_position_embeddings: int = 512
    """Longest sequence the model accepts (learned absolute position embeddings)."""
    dropout: float = 0.0
    """Dropout on the embeddings and residual branches during training (attention-probability dropout stays
    0, which keeps the fast attention kernel). 0: within the CPU budget the model underfits (train loss ~ val
    loss), and a probe run learned faster without dropout."""

    context: int = 512
    """Training sequence length: packed blocks of this many tokens (<= max_position_embeddings)."""
    batch_size: int = 4
    """Sequences per optimizer step."""
    max_steps: int = 3000
    """Optimizer steps in total (the cosine schedule decays to min_lr at this step)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases, LayerNorms and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0: no clipping)."""
    bf16: bool = True
    """Run the linear layers under bfloat16 autocast (faster on CPUs with AVX512-BF16; weights stay fp32)."""
    seed: int = 0
    """Seed of the tokenizer-independent randomness: initialization, data order, dropout."""
    threads: int | None = 1
    """torch CPU threads (None: torch's default). One thread is the robust choice on a small shared machine:
    two threads on two busy cores run several times slower. Bit-exact resume needs the same number."""

    eval_every: int = 100
    """Evaluate the validation stories every this many steps (and at the last step)."""
    save_every: int = 100
    """Checkpoint the training state every this many steps (and at the last step)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep in run_dir."""
    keep_best: bool = True
    """Export the weights with the lowest validation loss (else: those of the last step)."""
    time_budget_minutes: float | None = 90.0
    """Stop early (checkpoint, then export the best weights so far) when the training loop of this session
    has run this long, e.g. on a busy machine (None: no limit). Runs that finish within it are deterministic."""
    stop_after: int | None = None
    """Stop after this step as if interrupted, leaving a checkpoint and no output (for tests/demos)."""
    sample_tokens: int = 100
    """Tokens generated for each continuation in the model card."""
    progress: bool = True
    """Show a tqdm progress bar."""
    card_notes: Path | None = None
    """A Markdown file appended to the model card (e.g. the comparison of the candidate recipes)."""


# Fields that may differ between a run and its resumption.
RESUME_FREE_FIELDS = {
    "resume", "stop_after", "progress", "output_dir", "run_dir", "threads", "eval_every", "save_every",
    "keep_checkpoints", "sample_tokens", "time_budget_minutes", "card_notes",
}  # fmt: skip



def check_config(cfg: BaseLMConfig) -> None:
    problems = []
    if cfg.d_model % cfg.num_heads:
        problems.append(f"d_model {cfg.d_model} is not divisible by num_heads {cfg.num_heads}")
    if cfg.context > cfg.max_position_embeddings:
        problems.append(f"context {cfg.context} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if cfg.context < 2:
        problems.append("context must be at least 2")
    if cfg.vocab_size < 257:
        problems.append("vocab_size must be at least 257 (256 bytes + <|endoftext|>)")
    for name in ("batch_size", "max_steps", "eval_every", "save_every", "num_layers"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be positive")
    if problems:
        raise BaseLMError("; ".join(problems))



def config_dict(cfg: BaseLMConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}

