"""Pipeline parallelism with torch.distributed.pipelining: stages, schedules and one step.

Schedules (`--pp-schedule`):
- `1f1b`: one stage per rank (stage r on pp rank r); after a warm-up of forwards each rank
  alternates one forward and one backward (`Schedule1F1B`).
- `dualpipev`: DeepSeek's DualPipe folded into a V (`ScheduleDualPipeV`, after the DualPipe
  repository's DualPipeV): 2·pp stages, rank r holding stages r and 2·pp-1-r, so rank 0 holds
  both the embedding and the head + MTP; forward and backward chunks of different
  micro-batches are paired (OVERLAP_F_B) and the backward is split into input and weight
  parts (zero-bubble) to fill the gaps. Needs at least 2·pp micro-batches.
Torch runs an OVERLAP_F_B pair one after the other unless a custom function is registered
for it. With expert parallelism, `overlap.py`'s is registered (`overlap`; by default on GPUs):
the pair runs as two threads taking turns at the all-to-alls, so that one chunk's communication
hides behind the other's compute, DualPipe's point (benchmarks/pipeline_bubble.py measures
the schedules' bubbles themselves).

Every schedule here is built with `scale_grads=False`: the stages' loss is already each
micro-batch's share of the global-batch loss (stage.py).
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from ..model.transformer import Transformer
from . import overlap
from .mesh import ParallelConfig, ParallelError
from .stage import ModelStage, split_layers


def stage_indices(cfg: ParallelConfig, pp_rank: int) -> list[int]:
    """The pipeline stages a pp rank runs: its own (1F1B) or the two arms of its V."""
    if cfg.schedule == "dualpipev":
        return sorted({pp_rank, 2 * cfg.pp - 1 - pp_rank})
    return [pp_rank]


def make_stages(model: Transformer, cfg: ParallelConfig, pp_rank: int) -> list[ModelStage]:
    """This rank's ModelStages of `model` (its own modules, not copies)."""
    c = model.config
    n = cfg.n_stages if cfg.pp > 1 else 1
    ranges = split_layers(c.num_hidden_layers, c.num_nextn_predict_layers, n)
    return [ModelStage(model, ranges[i], i, n) for i in (stage_indices(cfg, pp_rank) if cfg.pp > 1 else [0])]


def build_schedule(stages: list[ModelStage], cfg: ParallelConfig, pp_mesh: DeviceMesh,
                   device: torch.device, loss_fn):
    """The pipeline schedule over this rank's (already parallelised) stages. `loss_fn` is
    called on the last stage only, but every rank passes one: it marks a training schedule."""
    if cfg.n_microbatches < cfg.n_stages:
        raise ParallelError(f"--microbatches {cfg.n_microbatches} is fewer than the {cfg.n_stages} "
                            f"pipeline stages of {cfg.schedule}; use at least {cfg.n_stages}")
    group = pp_mesh.get_group()
    pipe_stages = [PipelineStage(s, s.index, s.n_stages, device, group=group) for s in stages]
    if cfg.schedule == "dualpipev":
        schedule = ScheduleDualPipeV(pipe_stages, cfg.n_microbatches, loss_fn=loss_fn, scale_grads=False)
        if cfg.ep > 1 and (cfg.overlap if cfg.overlap is not None else device.type == "cuda"):
            register_overlap(schedule)
        return schedule
    return Schedule1F1B(pipe_stages[0], cfg.n_microbatches, loss_fn=loss_fn, scale_grads=False)


def register_overlap(schedule) -> None:
    """Run the schedule's OVERLAP_F_B pairs overlapped (overlap.py), where this torch allows."""
    from torch.distributed.pipelining.schedules import OVERLAP_F_B
    if not overlap.supported(schedule):
        warnings.warn("this torch's pipeline runtime lacks what the DualPipeV overlap uses; "
                      "its forward/backward pairs run one after the other", stacklevel=2)
        return
    overlap.TURNS.enabled = True
    schedule.register_custom_function(OVERLAP_F_B, overlap.overlap_f_b)


def pipeline_step(schedule, stages: list[ModelStage], input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward and backward of one batch through the pipeline (its micro-batches split by the
    schedule); the first stage's rank feeds the tokens, the last stage's the labels."""
    args = (input_ids,) if any(s.is_first for s in stages) else ()
    target = labels if any(s.is_last for s in stages) else None
    schedule.step(*args, target=target)
