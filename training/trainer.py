"""Train several SAEs (widths x architectures) on one stream of activation batches.

Every SAE owns its module, Adam optimizer, dead-latent counters, RNG and loss curve
(`training.trainer_state.Member`); the SAEs share only the input batch, so an SAE trained in a group
ends bit-identical to the same SAE trained alone. Standard and TopK SAEs take the hand-written paths
of `training.fast_paths`; the others autograd.

Per step and SAE: loss + gradients with this step's sparsity coefficient (passed in, never written
into the SAE's config), the decoder-constrained Adam step (`training.optim`), update the
steps-since-fired counters (dead latents feed TopK's AuxK and optional resampling through
`training.resampling`). Schedules (`training.schedules`): linear LR warm-up, constant, linear decay
to 0 over the last `lr_decay_fraction`; linear sparsity-coefficient warm-up from 0. Over the last
`decoder_finetune_fraction` of the steps (standard's default) only the decoder trains, on the reconstruction
alone: the latents are frozen as they are, and the decoder becomes the best one for them, free of the L1
term's shrinkage.

Activations are scaled by one constant so that E||x||^2 = d_in while training (so default
coefficients transfer across models); the constant is folded into every saved checkpoint, which
therefore reads raw activations (SAELens `normalize_activations: none`).

Layout (`sae_folder` of sae/checkpoint.py):
```
<run folder>/F<d_sae>/                      final SAE folder + loss_curves.csv + training_config.json
<run folder>/F<d_sae>/steps/<step>/         intermediate SAE folder, plus (newest only by default) the
                                            resumable state of training.trainer_state
<run folder>/loss_curves.{csv,png}          every width of the run: the "four regimes" picture
```
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from sae.checkpoint import STEPS_DIR, TRAINING_CONFIG_FILE, save_sae, step_folder
from training.data_state import DataState, gather_data_state, restore_data_state, write_data_tensors
from training.distributed import DistContext, StepReducer
from training.fast_paths import StepLosses, decoder_finetune_loss_and_grads, has_fast_path, loss_and_grads
from training.loss_curves import CURVES_FILE, read_curve_csv, write_curve_csv, write_run_curves
from training.optim import constrained_step, set_lr
from training.resampling import resample_dead_latents
from training.schedules import sparsity_coeff_at
from training.trainer_config import (
    SAESpec,
    TrainerConfig,
    b_dec_init_for,
    decoder_finetune_steps,
    library_versions,
    lr_schedule,
    resolved_recipe,
)
from training.trainer_state import (
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    Member,
    adam_step,
    check_compatible,
    common_resumable_step,
    fold_scale,
    load_member_state,
    make_member,
    place_member,
    resumable_steps,
    state_tensors,
)


class BatchSource(Protocol):
    """What the trainer needs from a data buffer (training.shuffle_buffer.ShufflingBuffer, or the in-memory
    training.activations.ActivationBuffer); `state_tensors()` is optional (see training.data_state)."""

    def next_batch(self) -> Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any], *tensors: Any) -> None: ...


class MultiSAETrainer:
    """Trains `specs` on batches from `buffer`; see the module docstring."""

    def __init__(
        self,
        cfg: TrainerConfig,
        specs: Sequence[SAESpec],
        buffer: BatchSource,
        scale: float = 1.0,
        run_info: dict[str, Any] | None = None,
        data_mean: Tensor | None = None,
        data_variance: float | None = None,
        dist: DistContext | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """`scale`: activation_scale(acts) (used when cfg.normalize_activations); `data_mean [d_in]`: the mean
        activation (raw units), the initial b_dec of every SAE (None: zeros); `data_variance`: E||x - mean||^2
        (raw units), the denominator of the logged variance explained (None: each batch's own).
        `dist`: this process's rank under torchrun (training.distributed): `buffer` then yields this rank's
        batch_size / world_size vectors per step, and rank 0 alone writes. `device`: where the SAEs train."""
        if cfg.steps <= 0 or cfg.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        folders = [str(s.folder) for s in specs]
        if len(set(folders)) != len(folders):
            raise ValueError("two SAEs would share a folder: widths or architectures repeat")
        self.cfg, self.specs, self.buffer = cfg, list(specs), buffer
        self.scale = float(scale) if cfg.normalize_activations else 1.0
        self.run_info = dict(run_info or {})
        self.dist = dist or DistContext()
        self.reducer = StepReducer(self.dist)
        self.members = [place_member(make_member(cfg, s), device) for s in self.specs]
        if data_mean is not None:
            with torch.no_grad():
                for m in self.members:
                    if b_dec_init_for(cfg, m.spec.cfg) == "mean":
                        m.sae.b_dec.copy_(data_mean.to(m.sae.b_dec.dtype) * self.scale)
        self.token_variance = None if data_variance is None else float(data_variance) * self.scale**2
        self.lr_schedule = lr_schedule(cfg)
        self.finetune_start = [cfg.steps - decoder_finetune_steps(cfg, s.cfg) for s in self.specs]
        self.step = 0
        self.started = time.time()

    # -- one step ---------------------------------------------------------------------------------
    def _train_step(self, x: Tensor) -> None:
        cfg, step = self.cfg, self.step
        lr = self.lr_schedule.lr(step)
        if self.token_variance is not None:
            total_var = self.token_variance * x.shape[0]
        else:
            total_var = float((x - x.mean(0)).pow(2).sum()) or 1.0
        for m, finetune_start in zip(self.members, self.finetune_start, strict=True):
            dead = m.steps_since_fired >= cfg.dead_window
            if step >= finetune_start:  # the decoder alone, on the reconstruction
                coeff, out = 0.0, decoder_finetune_loss_and_grads(m.sae, x, fast=cfg.fast)
            else:
                coeff = sparsity_coeff_at(m.spec.cfg.sparsity_coeff, step, cfg.sparsity_warmup_steps)
                out = loss_and_grads(m.sae, x, coeff, dead, fast=cfg.fast)
            out = self._reduced(m, out)
            set_lr(m.opt, lr)
            # The clip is on SAELens's scale: our loss (a mean over d_in) and its gradient are its / d_in.
            constrained_step(m.sae, m.opt, unit_decoder=not m.spec.cfg.free_decoder,
                             clip_norm=cfg.grad_clip_norm / m.spec.cfg.d_in)
            fired = out.fire_counts > 0
            m.steps_since_fired += 1
            m.steps_since_fired[fired] = 0
            m.fire_counts += out.fire_counts
            m.tokens_counted += x.shape[0] * self.dist.world_size
            mse = float(out.mse)
            row = {"loss": float(out.loss), "mse": mse, "variance_explained": 1 - mse * x.numel() / total_var,
                   "sparsity_loss": float(out.sparsity), "aux_loss": float(out.aux),
                   "l0": float(out.fire_counts.sum()) / (x.shape[0] * self.dist.world_size)}
            for key, val in row.items():
                m.acc[key] = m.acc.get(key, 0.0) + val
            m.acc_n += 1
            m.acc["lr"], m.acc["sparsity_coeff"] = lr, coeff
        self.step += 1
        if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step < cfg.steps:
            for m, finetune_start in zip(self.members, self.finetune_start, strict=True):
                if self.step < finetune_start:  # in the fine-tuning phase the encoder stays as it is
                    self._resample(m, x)

    def _reduced(self, m: Member, out: StepLosses) -> StepLosses:
        """Under torchrun: gradients and losses averaged, firing counts summed over ranks (one all-reduce)."""
        if not self.dist.enabled:
            return out
        (loss, mse, sparsity, aux), counts = self.reducer.reduce(
            list(m.sae.parameters()), [out.loss, out.mse, out.sparsity, out.aux], out.fire_counts)
        return out._replace(loss=loss, mse=mse, sparsity=sparsity, aux=aux, fire_counts=counts)

    def _resample(self, m: Member, x: Tensor) -> int:
        """Re-initialise the dead latents of `m` (training.resampling); returns how many."""
        dead = m.steps_since_fired >= self.cfg.dead_window
        done = resample_dead_latents(m.sae, dead, self.cfg.resample_method, x=x, scale=self.cfg.resample_scale,
                                     gen=m.gen, opt=m.opt)
        m.steps_since_fired[done] = 0
        # The same latents are dead on every rank (reduced counts), but the new directions come from each
        # rank's own batch: rank 0's win.
        self.dist.broadcast_([p.data for p in m.sae.parameters()])
        return int(done.sum())

    def _flush_log(self) -> None:
        for m in self.members:
            if not m.acc_n:
                continue
            row = {k: v / m.acc_n for k, v in m.acc.items() if k not in ("lr", "sparsity_coeff")}
            row.update(step=self.step, tokens=self.step * self.cfg.batch_size, lr=m.acc["lr"],
                       sparsity_coeff=m.acc["sparsity_coeff"],
                       frac_dead=float((m.steps_since_fired >= self.cfg.dead_window).double().mean()))
            m.curve.append(row)
            m.acc, m.acc_n = {}, 0

    # -- checkpoints ------------------------------------------------------------------------------
    def _training_config(self, m: Member, completed: bool) -> dict[str, Any]:
        return {
            "run": m.spec.run,
            "architecture": m.spec.cfg.architecture,
            "d_in": m.spec.cfg.d_in,
            "d_sae": m.spec.cfg.d_sae,
            "seed": self.cfg.seed,
            "steps": self.step,
            "total_steps": self.cfg.steps,
            "tokens_seen": self.step * self.cfg.batch_size,
            "completed": completed,
            "activation_scale": self.scale,
            "activation_scale_note": "inputs were multiplied by this while training; the saved weights fold it in",
            "fast_path": bool(self.cfg.fast and has_fast_path(m.sae)),
            "recipe": resolved_recipe(self.cfg, m.spec.cfg),
            "sae_config": m.spec.cfg.to_saelens_dict(),
            "trainer": dataclasses.asdict(self.cfg),
            **self.run_info,
            "library_versions": library_versions(),
            "wall_time_s": round(time.time() - self.started, 1),
        }

    def _save_member(self, m: Member, folder: Path, with_state: bool, completed: bool,
                     data: DataState | None = None) -> Path:
        """Rank 0 only. `data`: every rank's buffer state (its tensors go into this folder when given)."""
        freq = m.fire_counts.double() / max(m.tokens_counted, 1)
        meta = {
            "format": STATE_FORMAT,
            "step": self.step,
            "tokens_seen": self.step * self.cfg.batch_size,
            "world_size": self.dist.world_size,
            "token_variance": self.token_variance,
            "buffer": None if data is None else data.json,
            "activation_scale": self.scale,
            "adam_step": adam_step(m),
            "rng_state": m.gen.get_state().tolist(),
            "run": m.spec.run,
            "d_sae": m.spec.cfg.d_sae,
            "trainer": dataclasses.asdict(self.cfg),
        }
        tensors = state_tensors(m) if with_state else None
        training_config = self._training_config(m, completed)

        def extra(tmp: Path) -> None:
            write_curve_csv(tmp / CURVES_FILE, m.curve)
            if tensors is not None:
                save_file(tensors, str(tmp / STATE_TENSORS))
                if data is not None and m is self.members[0]:
                    write_data_tensors(tmp, data)
                (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")

        return save_sae(fold_scale(m.sae, self.scale), folder, log10_sparsity=torch.log10(freq + 1e-10).float(),
                        training_config=training_config, extra=extra)

    def save_checkpoint(self) -> None:
        """Intermediate checkpoint of every SAE at the current step (each folder written atomically)."""
        self._flush_log()
        data = gather_data_state(self.buffer, self.dist)  # collective: every rank takes part
        for m in self.members:
            if self.dist.is_main:
                self._save_member(m, step_folder(m.spec.folder, self.step), with_state=True, completed=False,
                                  data=data)
        for m in self.members:  # the new state is on disk: older ones are not needed to resume
            m.fire_counts.zero_()
            m.tokens_counted = 0
            keep = max(self.cfg.keep_optimizer_state, 1)
            for old in resumable_steps(m.spec.folder)[:-keep] if self.dist.is_main else []:
                for name in (STATE_TENSORS, STATE_JSON):
                    (step_folder(m.spec.folder, old) / name).unlink(missing_ok=True)

    def resume(self) -> int:
        """Load the newest step that every SAE has a resumable checkpoint of; returns it (0: none)."""
        step = common_resumable_step([m.spec.folder for m in self.members])
        if not step:
            return 0
        for m in self.members:
            folder = step_folder(m.spec.folder, step)
            meta = json.loads((folder / STATE_JSON).read_text())
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{folder / STATE_JSON}: unknown trainer-state format {meta.get('format')}")
            check_compatible(self.cfg, meta["trainer"], folder, m.spec.cfg)
            load_member_state(m, load_file(str(folder / STATE_TENSORS)), meta)
            m.curve = [r for r in read_curve_csv(folder / CURVES_FILE) if r["step"] <= step]
            self.scale = float(meta["activation_scale"])
            self.token_variance = meta.get("token_variance", self.token_variance)
        restore_data_state(self.buffer, self.dist, meta["buffer"], step_folder(self.members[0].spec.folder, step))
        self.step = step
        return step

    def completed(self) -> bool:
        """Every final folder holds a finished run of this many steps."""
        for m in self.members:
            path = m.spec.folder / TRAINING_CONFIG_FILE
            try:
                tc = json.loads(path.read_text())
            except (OSError, ValueError):
                return False
            if not (tc.get("completed") and tc.get("steps") == self.cfg.steps):
                return False
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False, stop_at: int | None = None) -> list[Path]:
        """Train to `cfg.steps` and write the final folders; returns them.

        `resume`: continue from the newest common intermediate checkpoint. Without it, existing step
        checkpoints are an error unless `overwrite` (which deletes them). `stop_at`: return after this
        step without writing final folders, as if killed (tests, time-boxed sessions).
        """
        cfg = self.cfg
        if resume and self.completed():
            print(f"all {len(self.members)} SAEs already finished {cfg.steps:,} steps: nothing to resume")
            return [m.spec.folder for m in self.members]
        if resume:
            start = self.resume()
            if start:
                print(f"resuming all {len(self.members)} SAEs from step {start:,}")
            else:
                print("no complete intermediate checkpoint to resume from: starting from step 0")
        else:
            existing = [m.spec.folder / STEPS_DIR for m in self.members if (m.spec.folder / STEPS_DIR).exists()]
            if existing and not overwrite:
                raise FileExistsError(
                    f"{existing[0]} holds checkpoints of an earlier run: pass --resume to continue it or "
                    f"--overwrite to start again"
                )
            self.dist.barrier()  # every rank has looked before rank 0 deletes
            for path in existing if self.dist.is_main else []:
                shutil.rmtree(path)
        bar = tqdm(total=cfg.steps * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok",
                   unit_scale=True, disable=not cfg.progress, desc=f"{len(self.members)} SAEs", smoothing=0.1,
                   dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                x = self.buffer.next_batch()
                if self.scale != 1.0:
                    x = x * self.scale
                self._train_step(x.to(self.members[0].sae.W_enc.dtype))
                bar.update(cfg.batch_size)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._flush_log()
                    bar.set_postfix_str(self._postfix(), refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if stop_at is not None and self.step >= stop_at and self.step < cfg.steps:
                    return []
        finally:
            bar.close()
        self._flush_log()
        finals = [m.spec.folder for m in self.members]
        if self.dist.is_main:
            finals = [self._save_member(m, m.spec.folder, with_state=False, completed=True) for m in self.members]
            write_run_curves(self.specs, [m.curve for m in self.members])
        self.dist.barrier()  # the final folders exist when any rank returns
        return finals

    def _postfix(self) -> str:
        last = [m.curve[-1] for m in self.members if m.curve]
        if not last:
            return ""
        mean_loss = sum(r["loss"] for r in last) / len(last)
        l0 = "/".join(f"{r['l0']:.0f}" for r in last)
        return f"loss={mean_loss:.4g} L0={l0}"

