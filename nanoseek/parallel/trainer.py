"""The training loop of `train/trainer.py` on several processes (`torchrun ... nanoseek train
--dp D --ep E --pp P`).

Every rank runs the same loop over the same loader: a step draws the global batch
(`batch_size` rows, as in one process) and each data-parallel rank keeps its rows, so the
loader's position, the learning rate and the losses do not depend on the world size. Rank 0
alone writes metrics.jsonl (global means: parallel/step.py reduces them), the progress bar and
the plots; checkpoints are distributed (parallel/checkpoint.py) and written once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from ..loading import latest_checkpoint
from ..model import Transformer
from ..train.optim import build_optimizer
from ..train.trainer import Trainer, TrainConfig
from .checkpoint import load_distributed, load_full_model, save_distributed
from .mesh import ParallelConfig, ParallelError, build_mesh, device_type, init_distributed
from .parallelize import parallelize
from .step import parallel_train_step


class DistributedRun:
    """What a trainer whose model is spread over ranks does differently with its run
    directory: distributed checkpoints, and metrics and progress from rank 0 alone. The
    trainer has `is_main` and `model_config` besides Checkpointed's attributes."""

    def outputs(self, progress):
        if self.is_main:
            return super().outputs(progress)
        return _Discard(), _Discard()

    def save(self) -> Path:
        path = save_distributed(self.run_dir, self.step, self.model, self.optimizer, self.model_config,
                                self.state(), tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.keep_last)
        self.saved_step = self.step
        return path

    def stop_agreed(self, stop) -> bool:
        """A stop any rank was asked for (Ctrl-C or SIGTERM reach the ranks at different
        moments): every rank stops after the same step, where a rank-local stop would leave the
        others waiting in the next step's collectives."""
        if not torch.distributed.is_initialized():  # one process (a run resumed alone)
            return bool(stop.requested)
        asked = torch.tensor([int(stop.requested or 0)], device=self.device)
        torch.distributed.all_reduce(asked, op=torch.distributed.ReduceOp.MAX)
        signum = int(asked.item())
        if signum and not stop.requested:
            stop.requested = signal.Signals(signum)
        return bool(stop.requested)

    def resume(self) -> bool:
        if latest_checkpoint(self.run_dir) is None:
            return False
        state = load_distributed(self.run_dir, self.model, self.optimizer, stage=self.stage)
        self.step = state["step"]
        self.restore(state)
        return True


class ParallelTrainer(DistributedRun, Trainer):
    def __init__(self, model: Transformer, loader, cfg: TrainConfig, run_dir: str | Path,
                 parallel: ParallelConfig, tokenizer_dir: str | Path | None = None, stage: str = "train",
                 extra_state: dict | None = None):
        rank, world = init_distributed()
        parallel.check_world(world)
        check_batch(cfg, parallel)
        if cfg.compile:
            raise ParallelError("compile=true is not supported with --dp/--ep/--pp yet; drop it")
        # the expert-parallel layers replace the FP8 experts, and a layer's recompute has not
        # been tried under FSDP's hooks or the pipeline's stages
        for name, value in (("precision", "fp8"), ("activation_checkpointing", True)):
            if getattr(cfg, name) == value:
                raise ParallelError(f"{name}={str(value).lower()} is not supported with --dp/--ep/--pp yet; drop it")
        if cfg.device not in ("auto", device_type()):
            raise ParallelError(f"device={cfg.device!r}: a parallel run uses one {device_type()} per "
                                "process; leave device=auto")
        super().__init__(model, loader, cfg, run_dir, tokenizer_dir, stage, extra_state)
        self.parallel, self.rank, self.n_devices = parallel, rank, world
        self.is_main = rank == 0
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mesh = build_mesh(parallel) if world > 1 else None
        self.pm = parallelize(model, parallel, self.mesh, self.device)
        self.model_config = self.pm.config
        self.model = self.pm.view
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, moments=cfg.adam_moments)
        dp_rank = self.mesh.dp.get_local_rank() if self.mesh is not None else 0
        rows = cfg.batch_size // parallel.dp
        self.rows = slice(dp_rank * rows, (dp_rank + 1) * rows)

    def train_step(self, batches: list[dict]) -> dict:
        mine = [{k: v[self.rows] for k, v in b.items()} for b in batches]
        return parallel_train_step(self.pm, self.mesh, mine, self.optimizer, self.cfg.grad_clip, self.autocast)

    def final_model(self) -> Transformer | None:
        """Rank 0: the whole model, read back from the last checkpoint."""
        return load_full_model(self.run_dir) if self.is_main else None


def check_batch(cfg: TrainConfig, parallel: ParallelConfig) -> None:
    """The global batch must split evenly over dp ranks, and each rank's rows over the
    pipeline's micro-batches."""
    if cfg.batch_size % parallel.dp:
        raise ParallelError(f"batch_size={cfg.batch_size} (the global batch) must be a multiple of "
                            f"--dp {parallel.dp}")
    rows = cfg.batch_size // parallel.dp
    if parallel.pp > 1 and rows % parallel.n_microbatches:
        raise ParallelError(f"each of the {parallel.dp} data-parallel ranks gets {rows} rows of "
                            f"batch_size={cfg.batch_size}, which {parallel.n_microbatches} pipeline "
                            f"micro-batches must divide; change batch_size or --microbatches")


class _Discard:
    """Metrics logger and progress bar of the ranks that do not write them."""

    def log(self, step: int, **values) -> dict:
        return {"step": step, **values, "time": time.time()}

    def update(self, *args, **kwargs) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
