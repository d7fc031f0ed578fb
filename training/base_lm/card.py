"""The model folder `python -m training base-lm` exports: fp16 weights, tokenizer, log, loss curve, model card.

The model card is a Markdown template (`model_card`) with its two tables built apart.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from sae.checkpoint import write_folder_atomically
from training.base_lm.config import EOT, EXPORT_DTYPE, PROMPT, BaseLMConfig


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
        # fp16 halves the shipped size; held-out loss moved by < 2e-5 nats when measured (lm-eval)
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

    # SAE trees (hook folders) beside the model are the user's work: keep them, and say they are stale
    existing = list(out.iterdir()) if out.is_dir() else []
    sae_trees = tuple(p.name for p in existing if p.is_dir() and not p.name.startswith("."))
    write_folder_atomically(out, write, keep=sae_trees)
    if sae_trees:
        print(
            f"kept {', '.join(sae_trees)} in {out}: those SAEs were trained on the previous weights; "
            "retrain them (python -m training tinystories) before using them with this model",
            file=sys.stderr,
        )


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


def architecture_table(cfg: BaseLMConfig, model, s: dict[str, Any]) -> str:
    """The model card's architecture table."""
    c = model.config
    d_mlp = c.intermediate_size or 4 * c.hidden_size
    return f"""| | |
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
| parameters | {s["parameters"]:,} (stored in fp16; trained in fp32) |"""


def training_table(cfg: BaseLMConfig, s: dict[str, Any]) -> str:
    """The model card's training table: data, schedule, optimizer, compute."""
    minutes = s["train_seconds"] / 60
    budget_note = (
        f"; stopped by the {cfg.time_budget_minutes}-minute time budget before step {cfg.max_steps}"
        if s.get("stopped_by_time_budget")
        else ""
    )
    return f"""| | |
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
| exported weights | step {s["exported_step"]:,} ({"lowest validation loss" if cfg.keep_best else "last step"}) |"""


def model_card(cfg: BaseLMConfig, model, tok, s: dict[str, Any]) -> str:
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

{architecture_table(cfg, model, s)}

## Training

{training_table(cfg, s)}

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

