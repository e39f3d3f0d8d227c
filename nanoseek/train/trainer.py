"""The training loop: pretraining and SFT share it; only the loader differs.

Per step: the learning rate from the schedule, `grad_accum` micro-batches through
`train_step` (MTP and balance losses, clipping, AdamW, then the auxiliary-loss-free bias
update from that step's expert loads), one line of metrics (loss and its parts, lr, grad
norm, tokens/s, MFU, MaxVio per MoE layer), the progress bar, and every `save_every` steps
(by default every tenth of the run) an atomic checkpoint that holds the model, optimizer,
loader position and RNG states. Ctrl-C or SIGTERM (a scheduler's stop) finishes the step in
flight, saves it and raises `TrainingInterrupted`. `resume=True` continues from the latest
checkpoint exactly: the per-step losses of a run stopped and resumed equal those of an
uninterrupted run (on the CPU, bit for bit).

A non-finite loss or gradient skips the update and is counted; `max_bad_steps` in a row
stop the run with a `TrainingError` that says what to try.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CheckedConfig, described
from ..info import model_info
from ..loading import latest_checkpoint, resolve_device
from ..model import Transformer
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import MetricsLogger, ProgressBar, mfu, plot_metrics
from .optim import MOMENTS, SCHEDULES, build_optimizer, lr_multiplier, set_lr
from .precision import PRECISIONS, prepare_precision
from .recompute import checkpoint_blocks
from .step import train_step


FINAL_DTYPES = ("auto", "bf16", "fp8")  # of a run's final/ (stages.publish_final)


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what to change."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run between two steps, after saving the step it had finished.
    `signum` is the signal that asked (a shell reports the command's exit as 128 + signum)."""

    def __init__(self, stage: str, step: int, total: int, checkpoint: Path, signum: int = signal.SIGINT):
        super().__init__(f"{stage} stopped at step {step} of {total}; checkpoint saved in {checkpoint}")
        self.checkpoint, self.signum = checkpoint, int(signum)


@dataclass
class TrainConfig(CheckedConfig):
    kind = "train"
    steps: int = described(200, "optimizer steps")
    batch_size: int = described(8, "sequences per micro-batch")
    seq_len: int = described(256, "tokens per sequence")
    grad_accum: int = described(1, "micro-batches per optimizer step")
    lr: float = described(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = described(0.1, "the schedule's final lr as a fraction of lr")
    warmup: int = described(20, "steps of linear warm-up")
    schedule: str = described("cosine", f"lr schedule: {', '.join(SCHEDULES)}")
    decay_frac: float = described(0.2, "wsd: the final fraction of steps that decays")
    weight_decay: float = described(0.1, "AdamW weight decay of the matrices")
    grad_clip: float = described(1.0, "clip the gradient norm to this (0: no clipping)")
    precision: str = described("auto", "auto (bf16 autocast on GPU, float32 on CPU), bf16, fp32, or fp8: "
                                       "DeepSeek-V3's FP8 GEMMs (train/precision.py; emulated on the CPU)")
    activation_checkpointing: bool = described(False, "recompute each block in the backward (memory for compute)")
    adam_moments: str = described("fp32", f"AdamW's moments in {' or '.join(MOMENTS)} (V3 §3.3.3)")
    weights_once: bool = described(True, "cast the weights to BF16 (FP8: quantize the experts') once per "
                                         "optimizer step, not at every use: faster, 2 bytes a weight of memory")
    fuse_grad_accumulation: bool = described(False, "with weights_once: add each micro-batch's BF16 weight "
                                                    "gradient (fp8: the routed experts' wgrad) into the float32 "
                                                    "gradient in one pass (hooks on those weights then see no "
                                                    "gradient)")
    final_dtype: str = described("auto", "final/ as trained (auto), in bf16, or in fp8: V3's FP8 checkpoint "
                                         "layout")
    compile: bool = described(False, "torch.compile the model")
    save_every: int | None = described(None, "checkpoint every K steps (null: every tenth of the run; "
                                             "0: only at the end)")
    keep_last: int = described(3, "checkpoints kept (0: all)")
    max_bad_steps: int = described(5, "non-finite steps in a row that stop the run")
    seed: int = described(0, "seed of the initialisation and the data order")
    device: str = described("auto", "auto (a GPU when there is one), cpu, cuda, cuda:N")

    def __post_init__(self):
        self.check_types()
        need = self.need
        self.need_at_least(1, "steps", "batch_size", "seq_len", "grad_accum", "max_bad_steps")
        self.need_at_least(0, "warmup", "keep_last", "seed", "weight_decay", "grad_clip")
        need(self.save_every is None or self.save_every >= 0, "save_every", "must be >= 0 or null")
        need(self.lr > 0, "lr", "must be > 0")
        for name in ("min_lr_ratio", "decay_frac"):
            need(0 <= getattr(self, name) <= 1, name, "must be between 0 and 1")
        self.need_one_of("schedule", SCHEDULES)
        self.need_one_of("precision", PRECISIONS)
        self.need_one_of("adam_moments", MOMENTS)
        self.need_one_of("final_dtype", FINAL_DTYPES)


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


class StopRequest:
    """Ctrl-C (SIGINT), or SIGTERM (what `timeout`, Slurm and Kubernetes send before they kill),
    while a training loop runs: the first asks the loop to stop after the step in flight, so
    that the checkpoint it saves holds whole steps (an exception could land inside
    optimizer.step) and a preempted job loses nothing; a second one stops at once. Signals
    reach only the main thread; elsewhere they are left as they are."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, note):
        self.note, self.requested, self._previous = note, None, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():  # None: a handler set outside Python, as the default
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum)
        name = self.NAMES[self.requested]
        self.note(f"{name}: stopping after this step to save a checkpoint ({name} again: stop now, unsaved)")


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

    The trainer has run_dir, step, model, optimizer, device, tokenizer_dir, cfg (steps,
    save_every, keep_last), `stage` (the run kind its checkpoints record) and state();
    `restore(state)` puts back what state() added beyond the step."""

    saved_step: int | None = None
    is_main = True    # the process that writes metrics, progress and plots

    def outputs(self, progress: bool) -> tuple[MetricsLogger, ProgressBar]:
        """The metrics log (cut back to this step) and the progress bar of the run from here."""
        return (MetricsLogger(self.run_dir, resume_from_step=self.step + 1),
                ProgressBar(self.cfg.steps, initial=self.step, desc=self.stage, disable=not progress))

    def final_model(self) -> Transformer | None:
        """The trained model as one plain Transformer, where this process publishes it."""
        return self.model

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state(),
                               tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.keep_last)
        self.saved_step = self.step
        return path

    def save_due(self) -> bool:
        """Whether the step just done ends with a periodic checkpoint: every cfg.save_every
        steps, by default every tenth of the run, so that a crash loses little."""
        every = self.cfg.save_every
        if every is None:
            every = max(1, math.ceil(self.cfg.steps / 10))
        return every > 0 and self.step % every == 0

    def stop_agreed(self, stop: StopRequest) -> bool:
        """Whether the loop stops before its next step: a stop was requested (in one process)."""
        return bool(stop.requested)

    def end_run(self, stop: StopRequest) -> None:
        """The last checkpoint (unless this step's is saved); after a Ctrl-C or SIGTERM, the
        TrainingInterrupted that says where it is."""
        if self.saved_step != self.step:
            self.save()
        if stop.requested and self.step < self.cfg.steps:
            raise TrainingInterrupted(self.stage, self.step, self.cfg.steps, latest_checkpoint(self.run_dir),
                                      stop.requested)

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
        self.autocast = prepare_precision(self.model, cfg.precision, self.device)
        if cfg.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, moments=cfg.adam_moments)
        self.compiled = torch.compile(self.model, dynamic=False) if cfg.compile else None
        own_flops = getattr(model, "train_flops_per_token", None)  # a transformers student (hf_student.py)
        self.flops_per_token = (own_flops(cfg.seq_len) if own_flops else
                                model_info(model.config, context_length=cfg.seq_len)["train_flops_per_token"])
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

    def fit(self, resume: bool = False, progress: bool = True) -> list[dict]:
        """Train to cfg.steps; returns the logged records of this call. Ctrl-C or SIGTERM ends
        the step in flight, saves it and raises TrainingInterrupted."""
        cfg = self.cfg
        start_run(self.run_dir, resume, self.resume, cfg.seed)
        records = []
        logger, bar = self.outputs(progress)
        with logger, bar, StopRequest(bar.write) as stop:
            while self.step < cfg.steps and not self.stop_agreed(stop):
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
                if self.save_due():
                    self.save()
            if self.is_main:
                plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
            self.end_run(stop)
        return records

    # ------------------------------------------------------------ what a parallel run changes
    n_devices = 1     # devices the step's tokens were spread over (MFU is per device)

    def train_step(self, batches: list[dict]) -> dict:
        return train_step(self.model, batches, self.optimizer, self.cfg.grad_clip, self.autocast,
                          compiled=self.compiled, base_model=self.model, weights_once=self.cfg.weights_once,
                          fuse_accumulation=self.cfg.fuse_grad_accumulation)
