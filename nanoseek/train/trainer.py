"""The training loop: pretraining and SFT share it; only the loader differs.

Per step: the learning rate from the schedule, `grad_accum` micro-batches through
`train_step` (MTP and balance losses, clipping, AdamW, then the auxiliary-loss-free bias
update from that step's expert loads), one line of metrics (loss and its parts, lr, grad
norm, tokens/s, MFU, MaxVio per MoE layer), the progress bar, and every `save_every` steps
an atomic checkpoint that holds the model, optimizer, loader position and RNG states.
`resume=True` continues from the latest checkpoint exactly: the per-step losses of a run
killed and resumed equal those of an uninterrupted run (on the CPU, bit for bit).

A non-finite loss or gradient skips the update and is counted; `max_bad_steps` in a row
stop the run with a `TrainingError` that says what to try.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..info import model_info
from ..loading import latest_checkpoint, resolve_device
from ..model import Transformer
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import MetricsLogger, ProgressBar, mfu, plot_metrics
from .optim import SCHEDULES, build_optimizer, lr_multiplier, set_lr
from .step import train_step


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what to change."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    decay_frac: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on GPU, float32 on CPU
    compile: bool = False
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    max_bad_steps: int = 5
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train field 'schedule' = {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train field 'precision' = {self.precision!r}: choose auto, bf16 or fp32")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "max_bad_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train field '{name}' = {getattr(self, name)!r}: must be a positive integer")
        if not self.lr > 0:
            raise ValueError(f"train field 'lr' = {self.lr!r}: must be > 0")

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def refuse_existing_run(run_dir: str | Path) -> None:
    """A run started without resume must not write into another run's directory."""
    if latest_checkpoint(run_dir) is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints of a run: pass --resume "
                            "to continue it, or choose another --out")


def start_run(run_dir: str | Path, resume: bool, resume_fn, seed: int) -> None:
    """Continue the run in `run_dir` when asked and a checkpoint exists (`resume_fn()` loads it
    and returns True); otherwise start afresh: refuse a directory that holds a run, then seed."""
    if resume and resume_fn():
        return
    refuse_existing_run(run_dir)
    seed_everything(seed)


def run_outputs(run_dir: str | Path, step: int, total: int, desc: str,
                progress: bool | None) -> tuple[MetricsLogger, ProgressBar]:
    """metrics.jsonl (cut back to `step`) and the progress bar of a run continuing after `step`."""
    return (MetricsLogger(run_dir, resume_from_step=step + 1),
            ProgressBar(total, initial=step, desc=desc, disable=None if progress is None else not progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


class Checkpointed:
    """save() and resume() of a trainer's run directory, shared by Trainer and GRPOTrainer.

    The trainer has run_dir, step, model, optimizer, device, tokenizer_dir, cfg.keep_last,
    `stage` (the run kind its checkpoints record) and state(); `restore(state)` puts back
    what state() added beyond the step."""

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state(),
                               tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.keep_last)

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint, if any. Returns whether one was found;
        a checkpoint of another kind of run is refused (CheckpointError) before anything loads."""
        if latest_checkpoint(self.run_dir) is None:
            return False
        state = load_checkpoint(self.run_dir, self.model, self.optimizer, map_location=self.device,
                                stage=self.stage)
        self.step = state["step"]
        self.restore(state)
        return True

    def restore(self, state: dict) -> None:
        pass


class Trainer(Checkpointed):
    def __init__(self, model: Transformer, loader, cfg: TrainConfig, run_dir: str | Path,
                 tokenizer_dir: str | Path | None = None, stage: str = "train",
                 extra_state: dict | None = None):
        self.cfg, self.loader, self.stage = cfg, loader, stage
        self.run_dir = Path(run_dir)
        self.tokenizer_dir = tokenizer_dir
        self.extra_state = extra_state or {}
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device).train()
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.bfloat16 if use_bf16 else None
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.compiled = torch.compile(self.model, dynamic=False) if cfg.compile else None
        self.flops_per_token = model_info(model.config, context_length=cfg.seq_len)["train_flops_per_token"]
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped_total = 0

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        return {"stage": self.stage, "step": self.step, "loader": self.loader.state_dict(),
                "bad_in_a_row": self.bad_in_a_row, "skipped_total": self.skipped_total,
                "train_config": dataclasses.asdict(self.cfg), **self.extra_state}

    def restore(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.skipped_total = state.get("skipped_total", 0)

    # ------------------------------------------------------------ loop
    def _micro_batches(self) -> list[dict]:
        batches = []
        for _ in range(self.cfg.grad_accum):
            b = self.loader.next_batch()
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in b.items()})
        return batches

    def fit(self, resume: bool = False, progress: bool | None = None) -> list[dict]:
        """Train to cfg.steps; returns the logged records of this call."""
        cfg = self.cfg
        start_run(self.run_dir, resume, self.resume, cfg.seed)
        records = []
        logger, bar = self.outputs(progress)
        try:
            while self.step < cfg.steps:
                lr = cfg.lr * lr_multiplier(self.step, cfg.steps, cfg.warmup, cfg.schedule,
                                            cfg.min_lr_ratio, cfg.decay_frac)
                set_lr(self.optimizer, lr)
                t0 = time.perf_counter()
                batches = self._micro_batches()
                stats = self.train_step(batches)
                dt = time.perf_counter() - t0
                tokens = sum(int(b["input_ids"].numel()) for b in batches)
                self.step += 1
                if stats["skipped"]:
                    self.bad_in_a_row += 1
                    self.skipped_total += 1
                    bar.write(f"step {self.step}: non-finite loss or gradient, update skipped "
                              f"({self.bad_in_a_row} in a row)")
                    if self.bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                            f"(last at step {self.step}); the run stops. Lower the learning rate "
                            f"(lr={cfg.lr}), raise warmup, or check the data; resume from the last "
                            f"checkpoint with --resume.")
                else:
                    self.bad_in_a_row = 0
                tps = tokens / dt
                maxvio = stats.pop("maxvio")
                record = {**stats, "lr": lr, "tokens": tokens, "tokens_per_s": tps,
                          "step_time_s": dt, "skipped_total": self.skipped_total}
                util = mfu(tps / self.n_devices, self.flops_per_token, self.device)
                if util is not None:
                    record["mfu"] = util
                if maxvio:
                    record["maxvio"] = maxvio
                    record["maxvio_mean"] = sum(maxvio.values()) / len(maxvio)
                records.append(logger.log(self.step, **record))
                bar.update(self.step, loss=stats["loss"], tokens_per_s=tps, lr=lr)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
            self.save()
        finally:
            bar.close()
            logger.close()
        if self.is_main:
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
        return records

    # ------------------------------------------------------------ what a parallel run changes
    is_main = True    # the process that writes metrics, progress and plots
    n_devices = 1     # devices the step's tokens were spread over (MFU is per device)

    def train_step(self, batches: list[dict]) -> dict:
        return train_step(self.model, batches, self.optimizer, self.cfg.grad_clip, self.autocast,
                          compiled=self.compiled, base_model=self.model)

    def outputs(self, progress: bool | None) -> tuple[MetricsLogger, ProgressBar]:
        return run_outputs(self.run_dir, self.step, self.cfg.steps, self.stage, progress)

    def final_model(self) -> Transformer | None:
        """The trained model as one plain Transformer, where this process publishes it."""
        return self.model
