"""The training loop of tinystories-mini: prepare (or resume) a run, train with evaluation and checkpoints, export."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.base_lm.card import export
from training.base_lm.checkpoints import (
    BEST_WEIGHTS,
    STATE_FILE,
    decode_rng,
    list_checkpoints,
    load_optimizer_tensors,
    save_best,
    save_checkpoint,
)
from training.base_lm.config import EOT, RESUME_FREE_FIELDS, BaseLMConfig, BaseLMError, check_config, config_dict
from training.base_lm.data import PackedData, describe_source, load_split, resolve_data, val_blocks
from training.base_lm.model import build_model, evaluate, fast_attention, lm_loss, lr_at, make_optimizer
from training.base_lm.tokenizer import check_byte_level, encode_stories, train_tokenizer
from training.lm_eval import held_out_perplexity
from training.stories import StorySplit


@dataclass
class _Run:
    """Everything a training session works on: data, model, optimizer and the progress made so far."""

    cfg: BaseLMConfig
    sources: list[str]
    splits: dict[str, StorySplit]
    split: StorySplit
    run_dir: Path
    tok: Any
    data: PackedData
    val: list[torch.Tensor]
    model: Any
    opt: torch.optim.AdamW
    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_loss": math.inf, "step": -1})
    elapsed: float = 0.0
    window: list[float] = field(default_factory=lambda: [0.0, 0])
    """[sum of train losses, steps] since the last evaluation."""

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.context

    def checkpoint(self) -> None:
        epoch, offset = self.data.position(self.step, self.cfg.batch_size)
        state = {
            "step": self.step,
            "data_position": {"epoch": epoch, "block": offset, "blocks_per_epoch": self.data.blocks_per_epoch},
            "tokens_seen": self.step * self.tokens_per_step,
            "train_seconds": self.elapsed,
            "window": list(self.window),
            "log": self.log,
            "best": self.best,
            "config": config_dict(self.cfg),
        }
        save_checkpoint(self.run_dir, self.step, self.model, self.opt, self.tok, state, self.cfg.keep_checkpoints)


def train(cfg: BaseLMConfig) -> dict[str, Any]:
    """Train (or resume) and export; returns a summary dict (also written to the output folder)."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)  # callers (e.g. a test session) keep their own setting


def _train(cfg: BaseLMConfig) -> dict[str, Any]:
    check_config(cfg)
    wall0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = _prepare(cfg)
    stopped = _train_steps(run)
    if stopped == "stop_after":
        return {"stopped_at": run.step}
    return _finish(run, stopped == "budget", wall0)


def _resume_point(cfg: BaseLMConfig, run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (None: start over, deleting the old run's checkpoints) and its state."""
    resume_from = list_checkpoints(run_dir)[-1] if cfg.resume and list_checkpoints(run_dir) else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {run_dir}, starting from scratch", file=sys.stderr)
    if resume_from is None:
        # a fresh run must not mix with (or later resume into) another run's checkpoints
        for old in list_checkpoints(run_dir):
            shutil.rmtree(old)
        (run_dir / BEST_WEIGHTS).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        return None, {}
    saved = json.loads((resume_from / STATE_FILE).read_text())
    changed = {
        k: (saved["config"].get(k), v)
        for k, v in config_dict(cfg).items()
        if k not in RESUME_FREE_FIELDS and saved["config"].get(k) != v
    }
    if changed:
        raise BaseLMError(f"--resume: config differs from the checkpoint in {resume_from}: {changed}")
    return resume_from, saved


def _prepare(cfg: BaseLMConfig) -> _Run:
    from safetensors.torch import load_file, load_model
    from transformers import PreTrainedTokenizerFast

    sources = resolve_data(cfg)
    splits = load_split(sources, cfg)
    split = StorySplit([s for sp in splits.values() for s in sp.train], [s for sp in splits.values() for s in sp.val])
    run_dir = Path(cfg.run_dir)
    resume_from, saved = _resume_point(cfg, run_dir)
    if resume_from is not None:
        tok = PreTrainedTokenizerFast.from_pretrained(resume_from / "tokenizer")
    else:
        tok = train_tokenizer(split.train, cfg.vocab_size, cfg.max_position_embeddings)
    check_byte_level(tok)

    t0 = time.perf_counter()
    data = PackedData(encode_stories(tok, split.train), cfg.context, cfg.seed)
    val = val_blocks(encode_stories(tok, split.val), cfg.context)
    print(
        f"data: {' + '.join(sources)}: {len(split.train)} train stories ({data.tokens_per_epoch:,} tokens, "
        f"{data.blocks_per_epoch} blocks of {cfg.context}), {len(split.val)} val stories "
        f"({sum(len(b) for b in val):,} tokens); vocab {len(tok)}; tokenized in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    model = build_model(cfg, len(tok), tok.convert_tokens_to_ids(EOT))
    opt = make_optimizer(model, cfg)
    run = _Run(cfg, sources, splits, split, run_dir, tok, data, val, model, opt)
    if resume_from is not None:
        load_model(model, str(resume_from / "model.safetensors"))
        load_optimizer_tensors(
            opt, load_file(str(resume_from / "optimizer.safetensors")), saved["optimizer_param_groups"]
        )
        torch.set_rng_state(decode_rng(saved["torch_rng"]))
        run.step, run.log, run.best, run.elapsed = saved["step"], saved["log"], saved["best"], saved["train_seconds"]
        run.window = list(saved.get("window", [0.0, 0]))
        print(f"resumed from {resume_from} at step {run.step}", file=sys.stderr)
    return run


def _one_step(run: _Run) -> tuple[float, float]:
    """One optimizer step; returns (lr, train loss)."""
    cfg = run.cfg
    lr = lr_at(run.step, cfg)
    for group in run.opt.param_groups:
        group["lr"] = lr
    loss = lm_loss(run.model, run.data.batch(run.step, cfg.batch_size), cfg.bf16)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    run.step += 1
    return lr, loss.item()


def _evaluate_and_log(run: _Run, lr: float, bar: Any) -> None:
    cfg = run.cfg
    t_eval = time.perf_counter()
    val_loss = evaluate(run.model, run.val, cfg.batch_size, cfg.bf16)
    run.elapsed += time.perf_counter() - t_eval
    row = {"step": run.step, "tokens": run.step * run.tokens_per_step, "train_loss": run.window[0] / run.window[1],
           "val_loss": val_loss, "lr": lr, "seconds": round(run.elapsed, 1)}  # fmt: skip
    run.log.append(row)
    run.window = [0.0, 0]
    if val_loss < run.best["val_loss"]:
        run.best = {"val_loss": val_loss, "step": run.step}
        if cfg.keep_best:
            save_best(run.run_dir, run.model)
    bar.write(
        f"step {run.step:5d}  train {row['train_loss']:.3f}  val {val_loss:.3f} "
        f"(ppl {math.exp(val_loss):.1f})  lr {lr:.2e}  {run.elapsed / 60:.1f} min"
    )


def _train_steps(run: _Run) -> str:
    """Train to max_steps; returns "done", "stop_after" (as if interrupted) or "budget" (time budget used up)."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    run.model.train()
    session_start = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not cfg.progress, dynamic_ncols=True, desc="base-lm")
    with fast_attention():
        while run.step < cfg.max_steps:
            t_step = time.perf_counter()
            lr, train_loss = _one_step(run)
            run.window = [run.window[0] + train_loss, run.window[1] + 1]
            step_seconds = time.perf_counter() - t_step
            run.elapsed += step_seconds
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{run.tokens_per_step / step_seconds:,.0f}",
                            refresh=False)
            bar.update(1)
            step = run.step
            over_budget = (
                cfg.time_budget_minutes is not None
                and time.perf_counter() - session_start > 60 * cfg.time_budget_minutes
                and step < cfg.max_steps
            )
            if step % cfg.eval_every == 0 or step == cfg.max_steps or over_budget:
                _evaluate_and_log(run, lr, bar)
            if step % cfg.save_every == 0 or step == cfg.max_steps or step == cfg.stop_after or over_budget:
                run.checkpoint()
            if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.max_steps:
                bar.close()
                print(f"stopped after step {step} (--stop-after); continue with --resume", file=sys.stderr)
                return "stop_after"
            if over_budget:
                bar.write(
                    f"time budget of {cfg.time_budget_minutes} min used up at step {step}/{cfg.max_steps}: exporting "
                    f"the best weights so far (finish the schedule later with --resume)"
                )
                bar.close()
                return "budget"
    bar.close()
    return "done"


def _finish(run: _Run, stopped_by_budget: bool, wall0: float) -> dict[str, Any]:
    """Evaluate the last step if needed, pick the weights to export, export them; returns the summary."""
    from safetensors.torch import load_model

    cfg, step, log, best = run.cfg, run.step, run.log, run.best
    if not log or log[-1]["step"] != step:
        with fast_attention():
            log.append({"step": step, "tokens": step * run.tokens_per_step, "train_loss": math.nan,
                        "val_loss": evaluate(run.model, run.val, cfg.batch_size, cfg.bf16), "lr": lr_at(step, cfg),
                        "seconds": round(run.elapsed, 1)})  # fmt: skip
    final_val = log[-1]["val_loss"]
    if cfg.keep_best and (run.run_dir / BEST_WEIGHTS).is_file() and best["step"] != step:
        load_model(run.model, str(run.run_dir / BEST_WEIGHTS))
        export_step = best["step"]
    else:
        export_step = step
    export_val = best["val_loss"] if export_step == best["step"] else final_val
    summary = _summary(run, export_step, export_val, final_val, stopped_by_budget, wall0)
    export(cfg, run.model, run.tok, log, summary)
    print(
        f"exported step {export_step} to {cfg.output_dir}: val loss {export_val:.4f} "
        f"(ppl {math.exp(export_val):.2f}), {summary['parameters']:,} parameters, {run.elapsed / 60:.1f} min",
        file=sys.stderr,
    )
    return summary


def _summary(run: _Run, export_step: int, export_val: float, final_val: float, stopped_by_budget: bool,
             wall0: float) -> dict[str, Any]:
    cfg, step, data = run.cfg, run.step, run.data
    return {
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "steps": step,
        "exported_step": export_step,
        "tokens_seen": step * run.tokens_per_step,
        "tokens_seen_at_export": export_step * run.tokens_per_step,
        "train_tokens_per_epoch": data.tokens_per_epoch,
        "epochs": step * cfg.batch_size / data.blocks_per_epoch,
        "val_tokens": sum(len(b) for b in run.val),
        "train_stories": len(run.split.train),
        "val_stories": len(run.split.val),
        "val_loss": export_val,
        "val_perplexity": math.exp(export_val),
        "final_step_val_loss": final_val,
        "train_seconds": run.elapsed,
        "wall_seconds_this_session": time.perf_counter() - wall0,
        "threads": torch.get_num_threads(),
        "stopped_by_time_budget": stopped_by_budget,
        "data": [describe_source(src) for src in run.sources],
        "held_out": {
            describe_source(src): dataclasses.asdict(held_out_perplexity(run.model, run.tok, sp.val))
            for src, sp in run.splits.items()
        },
    }
