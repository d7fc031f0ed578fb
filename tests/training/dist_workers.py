"""Processes of the distributed tests: one rank of a gloo process group training on fixed global batches."""

import os
import sys

import torch
import torch.distributed as dist

from training.distributed import DistContext, RankFailure
from training.trainer import MultiSAETrainer
from training.trainer_config import TrainerConfig, build_specs

D = 12


def trainer_cfg(**kw) -> TrainerConfig:
    base = dict(widths=["6", "20"], architectures=["standard", "topk"], steps=10, batch_size=64, checkpoint_every=0,
                log_every=2, lr_warmup_steps=2, sparsity_warmup_steps=3, k=3, aux_k=4, dead_window=2, progress=False,
                resample_every=4)
    base.update(kw)
    return TrainerConfig(**base)


class GlobalBatches:
    """Batch i of a seeded sequence of global batches; rank r of W gets rows r::W of it (the same data as W=1)."""

    def __init__(self, batch_size: int, rank: int = 0, world: int = 1, die_at: int | None = None):
        self.batch_size, self.rank, self.world, self.i, self.die_at = batch_size, rank, world, 0, die_at

    def next_batch(self):
        if self.die_at is not None and self.i == self.die_at:
            os._exit(17)  # as if killed: no exception, no cleanup
        g = torch.Generator().manual_seed(1000 + self.i)
        x = torch.randn(self.batch_size, D, generator=g) * 3 + 0.5
        self.i += 1
        return x[self.rank::self.world]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state, *tensors):
        self.i = state["i"]


def train(out: str, rank: int = 0, world: int = 1, die_at: int | None = None) -> list[str]:
    """Train the test SAEs under `out`; returns their final folders."""
    cfg = trainer_cfg()
    ctx = DistContext(rank, world, rank, "gloo" if world > 1 else None)
    specs = build_specs(cfg, D, lambda run, f: os.path.join(out, run, f"F{f}"), {"model_name": "test"})
    source = GlobalBatches(cfg.batch_size, rank, world, die_at)
    trainer = MultiSAETrainer(cfg, specs, source, scale=0.3, data_mean=torch.full((D,), 0.5), dist=ctx)
    folders = trainer.train()
    if world > 1:  # every rank's own weights, to compare across ranks
        for m in trainer.members:
            torch.save({k: v.detach().clone() for k, v in m.sae.state_dict().items()},
                       os.path.join(out, f"{m.label.replace('/', '_')}.rank{rank}.pt"))
    return [str(f) for f in folders]


def rank_main(rank: int, world: int, port: int, out: str, die_at: int | None, timeout_s: float) -> None:
    import datetime

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        train(out, rank, world, die_at if rank == 1 else None)
    except RankFailure as err:
        print(f"RANKFAILURE {err}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
              None if sys.argv[5] == "-" else int(sys.argv[5]), float(sys.argv[6]))
