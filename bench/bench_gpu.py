"""GPU throughput: harvest and SAE-training tokens/s on one CUDA GPU, against SAELens on the same GPU.

Needs a CUDA GPU (exits with a message otherwise). The model is roneneldan/TinyStories-33M from the Hub
when reachable, else its architecture with random weights (`--model random:<config.json>`: speed does
not depend on the weights). Measured, in this process, on the same GPU:
- harvest: stories -> residual at blocks.<layer>.hook_resid_post, forward stopped after the block
  (`training.streaming.harvest_chunk`), at --model-dtype;
- training: this trainer's SAEs (one standard and one topk SAE of width --width, fast paths) on
  batches already on the GPU;
- SAELens (when `sae-lens` is installed, `make interop` builds such an environment): its
  LanguageModelSAETrainingRunner with the same width, batch and steps, end to end (its own harvest +
  training; TransformerLens model, so the Hub must be reachable).
Appends a section to BENCHMARKS.md (--no-write: print only).

Example: python bench/bench_gpu.py --steps 200 --batch-size 4096 --width 768
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae.base_model import load_base_model  # noqa: E402
from training.stories import default_stories_path, read_stories_file  # noqa: E402
from training.streaming import harvest_chunk, model_dtype  # noqa: E402

OFFLINE_CONFIG = ROOT / ".." / "shared" / "data" / "tinystories-33m" / "config.json"


def _sync() -> None:
    torch.cuda.synchronize()


def bench_harvest(bm, stories: list[str], layer: int, context: int, chunk: int, min_tokens: int) -> float:
    harvest_chunk(bm, stories[:chunk], layer, context)  # warm-up (kernels, allocator)
    _sync()
    t0, tokens, i = time.perf_counter(), 0, 0
    while tokens < min_tokens:
        batch = [stories[(i + j) % len(stories)] for j in range(chunk)]
        tokens += len(harvest_chunk(bm, batch, layer, context))
        i += chunk
    _sync()
    return tokens / (time.perf_counter() - t0)


def bench_training(d_model: int, width: int, steps: int, batch: int, device: torch.device, out: Path) -> float:
    from training.activations import ActivationBuffer
    from training.trainer import MultiSAETrainer
    from training.trainer_config import TrainerConfig, build_specs

    cfg = TrainerConfig(widths=[str(width)], architectures=["standard", "topk"], steps=steps, batch_size=batch,
                        checkpoint_every=0, progress=False, lr_warmup_steps=10, sparsity_warmup_steps=10)
    acts = torch.randn(batch * 8, d_model, device=device)
    specs = build_specs(cfg, d_model, lambda r, f: out / r / f"F{f}", {"model_name": "bench"})
    trainer = MultiSAETrainer(cfg, specs, ActivationBuffer(acts, batch, device=device), device=device)
    _sync()
    t0 = time.perf_counter()
    trainer.train(overwrite=True)
    _sync()
    return steps * batch / (time.perf_counter() - t0)


def bench_saelens(width: int, steps: int, batch: int, layer: int, context: int) -> tuple[float | None, str]:
    """SAELens end to end (harvest + training) tokens/s, or (None, why not)."""
    try:
        import sae_lens
        from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, StandardTrainingSAEConfig
    except ImportError as err:
        return None, f"sae-lens not installed ({err})"
    try:
        cfg = LanguageModelSAERunnerConfig(
            sae=StandardTrainingSAEConfig(d_in=768, d_sae=width, l1_coefficient=5.0),
            model_name="roneneldan/TinyStories-33M", hook_name=f"blocks.{layer}.hook_resid_post",
            dataset_path="roneneldan/TinyStories", is_dataset_tokenized=False, streaming=True,
            context_size=context, train_batch_size_tokens=batch, training_tokens=steps * batch,
            device="cuda", logger=None if not hasattr(sae_lens, "LoggingConfig") else sae_lens.LoggingConfig(
                log_to_wandb=False))
        runner = LanguageModelSAETrainingRunner(cfg)
        _sync()
        t0 = time.perf_counter()
        runner.run()
        _sync()
        return steps * batch / (time.perf_counter() - t0), f"sae-lens {sae_lens.__version__}"
    except Exception as err:  # report, don't hide: the table says why there is no number
        return None, f"SAELens run failed: {type(err).__name__}: {str(err)[:200]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id / folder / random:<config> (default: TinyStories-33M, "
                                                  "else its random-weight architecture)")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--context-size", type=int, default=512)
    p.add_argument("--harvest-batch-size", type=int, default=64, help="stories per forward pass")
    p.add_argument("--model-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"bench_gpu.py needs a CUDA GPU; torch {torch.__version__} sees none on this machine. "
                 f"Run it on a CUDA machine (nothing was measured or written).")
    device = torch.device("cuda:0")
    spec = args.model
    if spec is None:
        try:
            bm = load_base_model("roneneldan/TinyStories-33M", device=device)
            spec = "roneneldan/TinyStories-33M"
        except Exception:
            spec = f"random:{OFFLINE_CONFIG.resolve()}"
    bm = load_base_model(spec, device=device) if spec != "roneneldan/TinyStories-33M" else bm
    bm.model.to(model_dtype(args.model_dtype))
    stories = read_stories_file(default_stories_path())
    harvest = bench_harvest(bm, stories, args.layer, args.context_size, args.harvest_batch_size, 200_000)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train = bench_training(bm.d_model, args.width, args.steps, args.batch_size, device, Path(tmp))
    theirs, note = bench_saelens(args.width, args.steps, args.batch_size, args.layer, args.context_size)
    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"\n## GPU throughput ({gpu})\n",
        f"Command: `python bench/bench_gpu.py --steps {args.steps} --batch-size {args.batch_size} --width {args.width}"
        f" --model-dtype {args.model_dtype}`; model `{spec}`, hook blocks.{args.layer}.hook_resid_post, torch "
        f"{torch.__version__}.\n",
        "| measurement | tokens/s |", "|---|---:|",
        f"| harvest ({args.model_dtype}, {args.harvest_batch_size} stories per pass, stop after the block) | "
        f"{harvest:,.0f} |",
        f"| training, this trainer (standard + topk, F={args.width}, batch {args.batch_size}) | {train:,.0f} |",
        f"| SAELens end to end (harvest + standard SAE training), {note} | "
        f"{'n/a' if theirs is None else f'{theirs:,.0f}'} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with (ROOT / "BENCHMARKS.md").open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
