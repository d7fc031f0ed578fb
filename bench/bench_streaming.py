"""Streaming SAE training: peak memory against data size (before / after), throughput, 1 vs 2 processes.

Parts (each prints a markdown table; run from the repo root):
- memory: peak RSS of a 20-step `python -m training tinystories` run (tinystories-mini, evaluation off)
  over the first 250 stories and over 8 copies of the local sample, with the code before streaming
  (the `base-session` git tag, extracted to a temporary folder) and with this checkout's code.
- throughput: end-to-end streaming training (harvest + train) against harvest alone and training alone
  (the same SAEs on vectors already in memory), tokens per second, in this process.
- processes: the same end-to-end run on 1 and on 2 CPU processes (torchrun, gloo), global batch fixed.

Example: python bench/bench_streaming.py --part memory --part throughput --part processes
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.stories import default_stories_path  # noqa: E402

MINI = ROOT / "checkpoints" / "tinystories-mini"


def peak_rss_gb(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(peak resident memory in GB, wall seconds) of one child process (os.wait4: that child alone)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024**2, time.perf_counter() - t0


def _train_cmd(data: Path, out: Path, max_stories: int | None, steps: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "training", "tinystories", "--model", str(MINI), "--data", str(data), "--out",
           str(out), "--steps", str(steps), "--evaluate", "false", "--progress", "false", "--threads", "1",
           "--overwrite", *extra]
    return cmd + (["--max-stories", str(max_stories)] if max_stories else [])


def part_memory(tmp: Path, sizes: list[str], include_old_8x: bool, codes: list[str]) -> None:
    sample = default_stories_path()
    big = tmp / "sample_x8.txt"
    big.write_text(sample.read_text(encoding="utf-8") * 8, encoding="utf-8")
    old = tmp / "old"
    old.mkdir()
    subprocess.run(f"git archive base-session training sae | tar -x -C {old}", shell=True, check=True, cwd=ROOT)
    print("| code | stories | peak RSS (GB) | wall (s) |\n|---|---:|---:|---:|")
    for code, cwd in (("before (base-session)", old), ("after (streaming)", ROOT)):
        if code.split()[0] not in codes:
            continue
        for size in sizes:
            if code.startswith("before") and size == "8x" and not include_old_8x:
                print(f"| {code} | 8 x sample (16,128) | not re-run (issue: 6.9 GB) | |")
                continue
            data, n = (big, None) if size == "8x" else (sample, int(size))
            extra = [] if code.startswith("before") else ["--device", "cpu"]
            gb, wall = peak_rss_gb(_train_cmd(data, tmp / "runs", n, 20, extra), cwd)
            label = "8 x sample (16,128)" if size == "8x" else size
            print(f"| {code} | {label} | {gb:.2f} | {wall:.0f} |", flush=True)


def part_throughput(tmp: Path, steps: int, batch: int, buffer: int) -> None:
    from sae.checkpoint import sae_folder
    from training.activations import ActivationBuffer
    from training.lm_inputs import load_model
    from training.story_stream import StoryChunkStream, StorySource
    from training.streaming import StoryActivations
    from training.tinystories_cli import TinyStoriesConfig, run
    from training.trainer import MultiSAETrainer
    from training.trainer_config import TrainerConfig, activation_scale, build_specs

    torch.set_num_threads(1)
    cfg = TinyStoriesConfig(model=str(MINI), data=str(default_stories_path()), steps=steps, batch_size=batch,
                            buffer_size=buffer, out=tmp / "tp", evaluate=False, progress=False, overwrite=True,
                            device="cpu", checkpoint_every=0)
    bm, _, _ = load_model(cfg)
    chunks = StoryActivations(bm, StoryChunkStream(StorySource(cfg.data), cfg.harvest_batch_size), cfg.layer,
                              min(cfg.context_size, bm.context_size))
    t0, got, held = time.perf_counter(), 0, []
    for chunk in chunks:  # harvest alone: as many vectors as the training run consumes (+ one buffer fill)
        held.append(chunk.vectors)
        got += len(chunk.vectors)
        if got >= steps * batch + buffer:
            break
    harvest = got / (time.perf_counter() - t0)
    acts = torch.cat(held)
    tcfg = TrainerConfig(**{f: getattr(cfg, f) for f in TrainerConfig.__dataclass_fields__})
    specs = build_specs(tcfg, bm.d_model, lambda r, f: sae_folder(tmp / "alone", "m", "h", r, f), {})
    trainer = MultiSAETrainer(tcfg, specs, ActivationBuffer(acts, batch), scale=activation_scale(acts),
                              data_mean=acts.mean(0))
    t0 = time.perf_counter()
    trainer.train(overwrite=True)
    alone = steps * batch / (time.perf_counter() - t0)
    end_to_end = run(cfg).tokens_per_s
    print(f"\n{len(specs)} SAEs, batch {batch}, {steps} steps, buffer {buffer:,} vectors, 1 thread\n")
    print("| stage | tokens/s |\n|---|---:|")
    print(f"| harvest alone (stream -> model -> vectors) | {harvest:,.0f} |")
    print(f"| training alone ({len(specs)} SAEs, vectors in memory) | {alone:,.0f} |")
    print(f"| end to end (streaming: harvest + buffer + training) | {end_to_end:,.0f} |")


def part_processes(tmp: Path, steps: int, batch: int, buffer: int) -> None:
    print("\n| processes | wall (s) | tokens/s (end to end, global batch) |\n|---|---:|---:|")
    for n in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                    str(port), "-m", "training", "tinystories"]
        cmd = _train_cmd(default_stories_path(), tmp / f"p{n}", None, steps,
                         ["--device", "cpu", "--batch-size", str(batch), "--buffer-size", str(buffer),
                          "--checkpoint-every", "0"])[4:]
        t0 = time.perf_counter()
        done = subprocess.run(launcher + cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        line = [ln for ln in done.stdout.splitlines() if "tokens/s end to end" in ln][-1]
        print(f"| {n} | {wall:.0f} | {line.split(': ')[1].split(' tokens/s')[0]} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=["memory", "throughput", "processes"])
    p.add_argument("--sizes", nargs="+", default=["250", "8x"], help="memory part: story counts, or 8x")
    p.add_argument("--old-8x", action="store_true", help="also run the old code on 8 x the sample (minutes, ~7 GB)")
    p.add_argument("--code", nargs="+", default=["before", "after"], choices=["before", "after"],
                   help="memory part: measure the code before streaming, after, or both")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--buffer-size", type=int, default=16384)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.part or ["memory", "throughput", "processes"]:
            if part == "memory":
                part_memory(Path(tmp), args.sizes, args.old_8x, args.code)
            elif part == "throughput":
                part_throughput(Path(tmp), args.steps, args.batch_size, args.buffer_size)
            else:
                part_processes(Path(tmp), args.steps, args.batch_size, args.buffer_size)


if __name__ == "__main__":
    main()
