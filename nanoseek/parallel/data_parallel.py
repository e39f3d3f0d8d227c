"""Data parallelism with FSDP2 (`fully_shard`), or its replicated twin, applied from outside.

Units, bottom-up as FSDP2 wants them: each expert-parallel `mlp.experts` over the `edp` mesh
(its parameters are already sharded over `ep`), each MTP module's `shared_head.norm` (the model
calls it outside the layer's forward, so it needs its own unshard hook), each decoder layer,
then the root (embedding, final norm, head) over `dp`. `fsdp=False` replicates instead
(`replicate`, FSDP's DDP mode): the same units, all-reduced gradients.

Gradients are summed, not averaged, across ranks: every rank's loss is already its share of
the global-batch loss (parallel/step.py), and the expert gradients collect contributions from
all EP ranks through the all-to-all, so a sum is what equals the single-process gradient.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ..model.transformer import Block
from .expert_parallel import ExpertParallelExperts
from .mesh import Meshes, ParallelConfig, ParallelError


def apply_data_parallel(model: nn.Module, mesh: Meshes, cfg: ParallelConfig) -> None:
    """Shard (or replicate) `model` (a Transformer or a pipeline stage) over mesh.dp."""
    if cfg.dp == 1:
        return
    if cfg.cpu_offload and not torch.cuda.is_available():
        raise ParallelError("cpu_offload moves FSDP state off a GPU; this machine has none")
    if cfg.fsdp:
        # Under a pipeline, parameters stay gathered from forward to backward: each micro-batch
        # would gather them again, and DualPipeV's split backward (input gradients, later weight
        # gradients) after a reshard gives wrong weight gradients (torch 2.14; the tests see it).
        wrap = partial(fully_shard, reshard_after_forward=cfg.pp == 1)
    else:
        wrap = replicate
    # bf16 compute copies reduce their gradients in float32; otherwise nothing is cast
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.param_dtype == "bf16" else MixedPrecisionPolicy())
    kwargs = {"mp_policy": mp,
              "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()}
    for block in model.modules():
        if not isinstance(block, Block):
            continue
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, ExpertParallelExperts):
            wrap(experts, mesh=mesh.edp, **kwargs)
        if hasattr(block, "shared_head"):
            wrap(block.shared_head.norm, mesh=mesh.dp, **kwargs)
        wrap(block, mesh=mesh.dp, **kwargs)
    wrap(model, mesh=mesh.dp, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # gloo has no pre-multiplied sum; a plain sum is also what NCCL copies fastest
            module.set_force_sum_reduction_for_comms(True)
