"""Train `tinystories-mini`: a small GPT-Neo and its own byte-level BPE tokenizer, on TinyStories.

`python -m training base-lm [--help]`. The pipeline:

1. read the stories (`training.stories`), hold out every 10th one for validation;
2. train a byte-level BPE tokenizer (vocab ~4k, `<|endoftext|>` as BOS/EOS/PAD) on the train stories;
3. tokenize each story, append `<|endoftext|>`, and pack the stream into blocks of `--context` tokens
   (re-shuffled story order every epoch, fixed by the seed);
4. train a GPT-Neo (TinyStories-33M's layout, scaled down) with AdamW, linear warm-up and cosine decay,
   evaluating the held-out stories every `--eval-every` steps and keeping the weights with the best
   validation loss;
5. every `--save-every` steps write the training state (weights and AdamW moments in safetensors, the
   step, RNG and data position in JSON) atomically to `--run-dir`; `--resume` continues from the latest;
6. export a standard Hugging Face folder (config, safetensors weights, tokenizer) with a model card,
   `train_log.csv` and a loss curve to `--output-dir`.

Everything is deterministic given the seed (and the number of CPU threads).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae.dataclass_cli import parse_dataclass
from training.lm_eval import held_out_perplexity
from training.stories import (
    STORY_SEPARATOR,
    StorySplit,
    default_base_lm_sources,
    load_stories,
    split_stories,
)

EOT = STORY_SEPARATOR
PROMPT = "Once upon a time"
CHECKPOINT_PREFIX = "step-"
EXPORT_DTYPE = torch.float16

DESCRIPTION = (
    "Train tinystories-mini: a byte-level BPE tokenizer and a small GPT-Neo on TinyStories, "
    "with periodic atomic checkpoints (--resume) and a Hugging Face model folder as output."
)


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


# --------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(stories: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer trained on `stories`, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError("vocab_size must be at least 257 (256 bytes + <|endoftext|>)")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(stories, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tok


def check_byte_level(tok) -> None:
    """Any Unicode text must round-trip through the tokenizer without unknown tokens."""
    for text in ("Lily saw a 🐶 and said “你好!” — café. <|endoftext|>", "\t\n  x  \u200b"):
        ids = tok.encode(text)
        back = tok.decode(ids)
        if back != text:
            raise AssertionError(f"tokenizer does not round-trip {text!r}: got {back!r}")


def encode_stories(tok, stories: list[str]) -> list[list[int]]:
    """Token ids of each story followed by `<|endoftext|>`."""
    from transformers.utils import logging as hf_logging

    eot = tok.convert_tokens_to_ids(EOT)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # stories longer than model_max_length are fine: they are packed
    try:
        encoded = tok(stories, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    return [[*ids, eot] for ids in encoded]


# --------------------------------------------------------------------------------------------------
# data


class PackedData:
    """An endless stream of packed training blocks: epoch e packs the stories in an order fixed by (seed, e).

    The total token count is the same every epoch, so every epoch has `blocks_per_epoch` blocks and the
    data position is a function of the step alone: step s reads global blocks s*B ... s*B+B-1.
    """

    def __init__(self, encoded: list[list[int]], context: int, seed: int):
        self.encoded = encoded
        self.context = context
        self.seed = seed
        self.tokens_per_epoch = sum(len(ids) for ids in encoded)
        self.blocks_per_epoch = self.tokens_per_epoch // context
        if self.blocks_per_epoch < 1:
            raise BaseLMError(
                f"the training stories hold {self.tokens_per_epoch} tokens, fewer than one block of "
                f"context={context}: use more stories or a smaller --context"
            )
        self._epoch = -1
        self._blocks: torch.Tensor | None = None

    def epoch_blocks(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.encoded), generator=gen).tolist()
            stream = [t for i in order for t in self.encoded[i]]
            n = self.blocks_per_epoch * self.context
            self._blocks = torch.tensor(stream[:n], dtype=torch.long).view(-1, self.context)
            self._epoch = epoch
        assert self._blocks is not None
        return self._blocks

    def position(self, step: int, batch_size: int) -> tuple[int, int]:
        """(epoch, block index within the epoch) of the first block read at `step`."""
        g = step * batch_size
        return g // self.blocks_per_epoch, g % self.blocks_per_epoch

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rows = []
        for g in range(step * batch_size, (step + 1) * batch_size):
            epoch, j = divmod(g, self.blocks_per_epoch)
            rows.append(self.epoch_blocks(epoch)[j])
        return torch.stack(rows)


def val_blocks(encoded: list[list[int]], context: int) -> list[torch.Tensor]:
    """The validation stories in order, packed into blocks of `context` tokens (the last one shorter)."""
    stream = [t for ids in encoded for t in ids]
    return [torch.tensor(stream[i : i + context], dtype=torch.long) for i in range(0, len(stream), context)]


# --------------------------------------------------------------------------------------------------
# model and optimization


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
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


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


# --------------------------------------------------------------------------------------------------
# checkpoints


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state as flat tensors (`state.<param index>.<key>`) plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().contiguous().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _atomic_dir(target: Path, write) -> None:
    """Write a directory with `write(tmp_dir)` into a temporary sibling, then rename it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkdtemp (and some writers) create owner-only files: give them the usual permissions
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, model, opt, tok, state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file, save_model

    target = run_dir / f"{CHECKPOINT_PREFIX}{step:06d}"

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, groups = optimizer_tensors(opt)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        tok.save_pretrained(tmp / "tokenizer")
        full = dict(state, optimizer_param_groups=groups, torch_rng=_encode_rng(torch.get_rng_state()))
        (tmp / "state.json").write_text(json.dumps(full, indent=1))

    _atomic_dir(target, write)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json) of run_dir, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_best(run_dir: Path, model) -> None:
    from safetensors.torch import save_model

    tmp = run_dir / f".best.safetensors.tmp-{os.getpid()}"
    save_model(model, str(tmp))
    os.replace(tmp, run_dir / "best.safetensors")


def config_dict(cfg: BaseLMConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


# --------------------------------------------------------------------------------------------------
# training


class BaseLMError(Exception):
    """A bad input (missing data file, inconsistent config): reported without a traceback."""


def resolve_data(cfg: BaseLMConfig) -> list[str]:
    return [str(d) for d in cfg.data] if cfg.data else [str(p) for p in default_base_lm_sources()]


def load_split(sources: list[str], cfg: BaseLMConfig) -> dict[str, StorySplit]:
    """Each source's train / held-out split (every val_every-th story of each source is held out)."""
    splits = {}
    for source in sources:
        try:
            stories = load_stories(source, max_stories=cfg.max_stories)
            splits[source] = split_stories(stories, cfg.val_every)
        except (OSError, RuntimeError, ValueError) as err:
            raise BaseLMError(str(err)) from err
        if not splits[source].val:
            raise BaseLMError(f"{source}: need at least {cfg.val_every} stories to hold out validation ones")
    return splits


def describe_source(source: str) -> str:
    """The data source as recorded in the outputs: local files relative to the working directory."""
    if Path(source).exists():
        try:
            return os.path.relpath(source)
        except ValueError:
            return Path(source).name
    return source


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


def train(cfg: BaseLMConfig) -> dict[str, Any]:
    """Train (or resume) and export; returns a summary dict (also written to the output folder)."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)  # callers (e.g. a test session) keep their own setting


def _train(cfg: BaseLMConfig) -> dict[str, Any]:
    from safetensors.torch import load_file, load_model
    from tqdm.auto import tqdm
    from transformers import PreTrainedTokenizerFast

    check_config(cfg)
    wall0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sources = resolve_data(cfg)
    splits = load_split(sources, cfg)
    split = StorySplit([s for sp in splits.values() for s in sp.train], [s for sp in splits.values() for s in sp.val])
    data_source = " + ".join(sources)

    run_dir = Path(cfg.run_dir)
    resume_from = list_checkpoints(run_dir)[-1] if cfg.resume and list_checkpoints(run_dir) else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch", file=sys.stderr)
    if resume_from is None:
        # a fresh run must not mix with (or later resume into) another run's checkpoints
        for old in list_checkpoints(run_dir):
            shutil.rmtree(old)
        (run_dir / "best.safetensors").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = json.loads((resume_from / "state.json").read_text())
        changed = {
            k: (saved["config"].get(k), v)
            for k, v in config_dict(cfg).items()
            if k not in RESUME_FREE_FIELDS and saved["config"].get(k) != v
        }
        if changed:
            raise BaseLMError(f"--resume: config differs from the checkpoint in {resume_from}: {changed}")
        tok = PreTrainedTokenizerFast.from_pretrained(resume_from / "tokenizer")
    else:
        tok = train_tokenizer(split.train, cfg.vocab_size, cfg.max_position_embeddings)
    check_byte_level(tok)
    eot_id = tok.convert_tokens_to_ids(EOT)

    t0 = time.perf_counter()
    data = PackedData(encode_stories(tok, split.train), cfg.context, cfg.seed)
    val = val_blocks(encode_stories(tok, split.val), cfg.context)
    val_tokens = sum(len(b) for b in val)
    print(
        f"data: {data_source}: {len(split.train)} train stories ({data.tokens_per_epoch:,} tokens, "
        f"{data.blocks_per_epoch} blocks of {cfg.context}), {len(split.val)} val stories ({val_tokens:,} tokens); "
        f"vocab {len(tok)}; tokenized in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    model = build_model(cfg, len(tok), eot_id)
    opt = make_optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())

    step = 0
    log: list[dict[str, Any]] = []
    best = {"val_loss": math.inf, "step": -1}
    elapsed = 0.0
    if resume_from is not None:
        load_model(model, str(resume_from / "model.safetensors"))
        load_optimizer_tensors(
            opt, load_file(str(resume_from / "optimizer.safetensors")), saved["optimizer_param_groups"]
        )
        torch.set_rng_state(_decode_rng(saved["torch_rng"]))
        step, log, best, elapsed = saved["step"], saved["log"], saved["best"], saved["train_seconds"]
        print(f"resumed from {resume_from} at step {step}", file=sys.stderr)

    model.train()
    tokens_per_step = cfg.batch_size * cfg.context
    window_loss, window_steps = saved.get("window", [0.0, 0]) if saved else (0.0, 0)
    stopped_by_budget = False
    session_start = time.perf_counter()

    def checkpoint() -> None:
        epoch, offset = data.position(step, cfg.batch_size)
        state = {
            "step": step,
            "data_position": {"epoch": epoch, "block": offset, "blocks_per_epoch": data.blocks_per_epoch},
            "tokens_seen": step * tokens_per_step,
            "train_seconds": elapsed,
            "window": [window_loss, window_steps],
            "log": log,
            "best": best,
            "config": config_dict(cfg),
        }
        save_checkpoint(run_dir, step, model, opt, tok, state, cfg.keep_checkpoints)

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress, dynamic_ncols=True, desc="base-lm")
    with fast_attention():
        while step < cfg.max_steps:
            t_step = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = data.batch(step, cfg.batch_size)
            loss = lm_loss(model, batch, cfg.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            train_loss = loss.item()
            window_loss += train_loss
            window_steps += 1
            step_seconds = time.perf_counter() - t_step
            elapsed += step_seconds
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / step_seconds:,.0f}", refresh=False)
            bar.update(1)

            over_budget = (
                cfg.time_budget_minutes is not None
                and time.perf_counter() - session_start > 60 * cfg.time_budget_minutes
                and step < cfg.max_steps
            )
            if step % cfg.eval_every == 0 or step == cfg.max_steps or over_budget:
                t_eval = time.perf_counter()
                val_loss = evaluate(model, val, cfg.batch_size, cfg.bf16)
                elapsed += time.perf_counter() - t_eval
                row = {"step": step, "tokens": step * tokens_per_step, "train_loss": window_loss / window_steps,
                       "val_loss": val_loss, "lr": lr, "seconds": round(elapsed, 1)}  # fmt: skip
                log.append(row)
                window_loss, window_steps = 0.0, 0
                if val_loss < best["val_loss"]:
                    best = {"val_loss": val_loss, "step": step}
                    if cfg.keep_best:
                        save_best(run_dir, model)
                bar.write(
                    f"step {step:5d}  train {row['train_loss']:.3f}  val {val_loss:.3f} "
                    f"(ppl {math.exp(val_loss):.1f})  lr {lr:.2e}  {elapsed / 60:.1f} min"
                )
            if step % cfg.save_every == 0 or step == cfg.max_steps or step == cfg.stop_after or over_budget:
                checkpoint()
            if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.max_steps:
                bar.close()
                print(f"stopped after step {step} (--stop-after); continue with --resume", file=sys.stderr)
                return {"stopped_at": step}
            if over_budget:
                stopped_by_budget = True
                bar.write(
                    f"time budget of {cfg.time_budget_minutes} min used up at step {step}/{cfg.max_steps}: exporting "
                    f"the best weights so far (finish the schedule later with --resume)"
                )
                break
    bar.close()

    if not log or log[-1]["step"] != step:
        with fast_attention():
            log.append({"step": step, "tokens": step * tokens_per_step, "train_loss": math.nan,
                        "val_loss": evaluate(model, val, cfg.batch_size, cfg.bf16), "lr": lr_at(step, cfg),
                        "seconds": round(elapsed, 1)})  # fmt: skip
    final_val = log[-1]["val_loss"]
    if cfg.keep_best and (run_dir / "best.safetensors").is_file() and best["step"] != step:
        load_model(model, str(run_dir / "best.safetensors"))
        export_step = best["step"]
    else:
        export_step = step
    export_val = best["val_loss"] if export_step == best["step"] else final_val
    summary = {
        "parameters": n_params,
        "steps": step,
        "exported_step": export_step,
        "tokens_seen": step * tokens_per_step,
        "tokens_seen_at_export": export_step * tokens_per_step,
        "train_tokens_per_epoch": data.tokens_per_epoch,
        "epochs": step * cfg.batch_size / data.blocks_per_epoch,
        "val_tokens": val_tokens,
        "train_stories": len(split.train),
        "val_stories": len(split.val),
        "val_loss": export_val,
        "val_perplexity": math.exp(export_val),
        "final_step_val_loss": final_val,
        "train_seconds": elapsed,
        "wall_seconds_this_session": time.perf_counter() - wall0,
        "threads": torch.get_num_threads(),
        "stopped_by_time_budget": stopped_by_budget,
        "data": [describe_source(src) for src in sources],
        "held_out": {
            describe_source(src): dataclasses.asdict(held_out_perplexity(model, tok, sp.val))
            for src, sp in splits.items()
        },
    }
    export(cfg, model, tok, log, summary)
    print(
        f"exported step {export_step} to {cfg.output_dir}: val loss {export_val:.4f} "
        f"(ppl {math.exp(export_val):.2f}), {n_params:,} parameters, {elapsed / 60:.1f} min",
        file=sys.stderr,
    )
    return summary


# --------------------------------------------------------------------------------------------------
# export


def continuations(model, tok, max_new_tokens: int, seed: int) -> dict[str, list[str]]:
    """Greedy and sampled continuations of PROMPT (sampling seeded, so the card is reproducible)."""
    model.eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    eot = tok.convert_tokens_to_ids(EOT)
    common = {"max_new_tokens": max_new_tokens, "pad_token_id": eot, "eos_token_id": eot}
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **common)
        torch.manual_seed(seed)
        many = ids.repeat(3, 1)
        sampled = model.generate(
            many, attention_mask=torch.ones_like(many), do_sample=True, temperature=0.8, top_k=50, top_p=1.0, **common
        )

    def text(row: torch.Tensor) -> str:
        return tok.decode(row, skip_special_tokens=True).strip()

    return {"greedy": [text(greedy[0])], "sampled": [text(r) for r in sampled]}


def export(cfg: BaseLMConfig, model, tok, log: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    out = Path(cfg.output_dir)
    samples = continuations(model, tok, cfg.sample_tokens, cfg.seed)
    summary = dict(summary, samples=samples)

    def write(tmp: Path) -> None:
        # fp16 halves the shipped size; held-out loss moves by < 1e-4 nats (measured, see the model card)
        model.to(EXPORT_DTYPE).save_pretrained(tmp)
        model.float()
        tok.save_pretrained(tmp)
        with open(tmp / "train_log.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "tokens", "train_loss", "val_loss", "lr", "seconds"])
            for r in log:
                w.writerow([r["step"], r["tokens"], f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}",
                            f"{r['lr']:.3e}", r["seconds"]])  # fmt: skip
        plot_losses(log, tmp / "loss_curve.png", summary["exported_step"])
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        notes = Path(cfg.card_notes).read_text() if cfg.card_notes else ""
        (tmp / "README.md").write_text(model_card(cfg, model, tok, summary) + notes)

    _atomic_dir(out, write)


def plot_losses(log: list[dict[str, Any]], path: Path, best_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["train_loss"] for r in log], label="train (mean since last eval)")
    ax.plot(steps, [r["val_loss"] for r in log], label="validation", marker=".")
    if best_step in steps:
        ax.axvline(best_step, color="gray", linestyle=":", label=f"exported (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("tinystories-mini")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(cfg: BaseLMConfig, model, tok, s: dict[str, Any]) -> str:
    c = model.config
    d_mlp = c.intermediate_size or 4 * c.hidden_size
    minutes = s["train_seconds"] / 60
    budget_note = (
        f"; stopped by the {cfg.time_budget_minutes}-minute time budget before step {cfg.max_steps}"
        if s.get("stopped_by_time_budget")
        else ""
    )
    sampled = "\n".join(f"{i + 1}. {_quote(t)}" for i, t in enumerate(s["samples"]["sampled"]))
    return f"""---
license: cdla-sharing-1.0
datasets:
- roneneldan/TinyStories
library_name: transformers
pipeline_tag: text-generation
language:
- en
tags:
- gpt_neo
- tinystories
---

# tinystories-mini

A small GPT-Neo language model and its own byte-level BPE tokenizer, trained from scratch on CPU on a
sample of TinyStories. It exists so that this project's sparse-autoencoder pipeline and demo app have a
base model that is built offline and end to end by `python -m training base-lm`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("checkpoints/tinystories-mini")
model = AutoModelForCausalLM.from_pretrained("checkpoints/tinystories-mini")
```

## Architecture

| | |
| --- | --- |
| type | GPT-Neo (`GPTNeoForCausalLM`), TinyStories-33M's layout scaled down |
| d_model | {c.hidden_size} |
| blocks | {c.num_layers}, attention {" / ".join(c.attention_layers)} |
| heads | {c.num_heads} (head size {c.hidden_size // c.num_heads}) |
| MLP | {d_mlp} (gelu_new) |
| local attention window | {c.window_size} |
| max positions | {c.max_position_embeddings} (trained on sequences of {cfg.context}) |
| vocabulary | {c.vocab_size} (byte-level BPE, `<|endoftext|>` = id {c.eos_token_id} is BOS/EOS/PAD) |
| embeddings | tied input/output |
| parameters | {s["parameters"]:,} (stored in fp16; trained in fp32) |

## Training

| | |
| --- | --- |
| data | {s["train_stories"]:,} train stories of {" and ".join(f"`{Path(d).name}`" for d in s["data"])}; \
every {cfg.val_every}th story of each ({s["val_stories"]}, {s["val_tokens"]:,} tokens) held out for validation |
| tokens per epoch | {s["train_tokens_per_epoch"]:,} (each story followed by `<|endoftext|>`, packed into blocks \
of {cfg.context}, story order reshuffled every epoch) |
| steps | {s["steps"]:,} × {cfg.batch_size} sequences × {cfg.context} tokens = {s["tokens_seen"]:,} tokens \
({s["epochs"]:.1f} epochs) |
| optimizer | AdamW (lr {cfg.lr:g}, betas ({cfg.beta1}, {cfg.beta2}), weight decay {cfg.weight_decay}), \
{cfg.warmup_steps} warm-up steps, cosine decay to {cfg.min_lr:g}, grad clip {cfg.grad_clip}, dropout {cfg.dropout} |
| tokenizer | byte-level BPE trained on the train stories only (vocab {cfg.vocab_size}); \
any Unicode text encodes without unknown tokens |
| compute | {minutes:.1f} minutes on {s["threads"]} CPU thread{"s" if s["threads"] != 1 else ""}\
{", bf16 autocast" if cfg.bf16 else ", fp32"}; seed {cfg.seed}{budget_note} |
| exported weights | step {s["exported_step"]:,} ({"lowest validation loss" if cfg.keep_best else "last step"}) |

**Validation loss {s["val_loss"]:.3f} nats/token, perplexity {s["val_perplexity"]:.2f}** on the held-out
stories (per token of this tokenizer; not comparable with GPT-2-tokenized numbers).
The loss after the last step was {s["final_step_val_loss"]:.3f}. `train_log.csv` and `loss_curve.png` hold
the curves; `training_summary.json` the numbers.

Reproduce: `python -m training base-lm` (defaults; add `--resume` after an interruption).

### Held-out stories, per source

Each held-out story scored on its own after `<|endoftext|>` (`python -m training lm-eval`). Bits per byte
and word-level perplexity (nats per whitespace-separated word) compare across tokenizers.

| held-out stories of | stories | tokens | perplexity / token | bits / byte | word perplexity |
| --- | ---: | ---: | ---: | ---: | ---: |
{held_out_rows(s)}

## Samples

Prompt: "{PROMPT}", {cfg.sample_tokens} new tokens at most.

Greedy:

{_quote(s["samples"]["greedy"][0])}

Sampled (temperature 0.8, top-k 50, seed {cfg.seed}):

{sampled}

## Limitations

A tiny model trained for minutes on a CPU, on {s["tokens_seen"] / 1e6:.1f}M tokens ({s["epochs"]:.1f} passes over a
{s["train_tokens_per_epoch"] / 1e3:.0f}k-token sample): it writes simple, often incoherent children's stories and
nothing else. It is meant for interpretability experiments, not for use as a language model.

## Attribution

Trained on TinyStories (Eldan & Li 2023), CDLA-Sharing-1.0
(`roneneldan/TinyStories`, https://arxiv.org/abs/2305.07759).
"""


def held_out_rows(s: dict[str, Any]) -> str:
    return "\n".join(
        f"| `{Path(src).name}` | {h['stories']} | {h['tokens']:,} | {h['perplexity']:.2f} | {h['bits_per_byte']:.3f} "
        f"| {h['word_perplexity']:.1f} |"
        for src, h in s.get("held_out", {}).items()
    )


def _quote(text: str) -> str:
    return "> " + text.replace("\n", "\n> ")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_dataclass(BaseLMConfig, argv, prog="python -m training base-lm", description=DESCRIPTION)
    try:
        train(cfg)
    except BaseLMError as err:
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
