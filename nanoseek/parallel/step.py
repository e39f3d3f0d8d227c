"""One optimizer step of a parallel model: the single-process `train_step` across ranks.

- Denominators of the global batch (token counts per loss term, sequences) are all-reduced
  over dp before the forward, so every rank computes its exact share of the global loss.
- Gradient norm over parameters held as DTensors on different meshes (FSDP over dp, experts
  over edp × ep, stages over pp): each rank's squared norm of what it holds, divided by how
  many ranks hold the same copy, summed over the world.
- The auxiliary-loss-free bias update uses the expert loads summed over dp, so every rank
  of a stage applies the same update; MaxVio is computed from those global loads.
- Every rank takes the same decision to step or skip: it is made from all-reduced values.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model.moe import max_violation
from .mesh import Meshes
from .parallelize import ParallelModel
from .stage import BALANCE, MAIN, MTP, denominators

NAMES = ("loss", "main_loss", "mtp_loss", "balance_loss")


def all_reduce(t: torch.Tensor, mesh=None) -> torch.Tensor:
    """Sum in place over a 1-D (sub)mesh, or over every rank when mesh is None; a no-op in
    one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if mesh is None:
            dist.all_reduce(t)
        elif mesh.size() > 1:
            dist.all_reduce(t, group=mesh.get_group())
    return t


def clip_grad_norm(params, max_norm: float, mesh: Meshes | None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model spread over a mesh; returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        copies = 1
        if isinstance(g, DTensor):
            copies = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if p.is_replicate())
        sq = sq + local.double().pow(2).sum() / copies
    total = all_reduce(sq).sqrt().float()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


def parallel_train_step(pm: ParallelModel, mesh: Meshes | None, micro_batches: list[dict],
                        optimizer: torch.optim.Optimizer, grad_clip: float = 1.0,
                        autocast_dtype: torch.dtype | None = None) -> dict:
    """The stats of `train_step` (loss parts as floats, grad norm, skipped, MaxVio per MoE
    layer of the whole model), for this rank's rows of each micro-batch; identical on all ranks."""
    dp = mesh.dp if mesh is not None else None
    n_mtp = pm.config.num_nextn_predict_layers
    n = len(micro_batches)
    # all micro-batches' denominators in one all-reduce; x n: the step's loss is their mean
    dens = all_reduce(torch.stack([denominators(b["labels"], n_mtp) for b in micro_batches]), dp) * n
    for stage in pm.stages:
        stage.stats.zero_()
    device_type = micro_batches[0]["input_ids"].device.type
    for batch, den in zip(micro_batches, dens):
        for stage in pm.stages:
            stage.set_denominators(den.to(stage.denominators))
        ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            pm.forward_backward(batch["input_ids"], batch["labels"])

    parts = all_reduce(sum(stage.stats for stage in pm.stages).double())
    parts = torch.stack([parts.sum(), parts[MAIN], parts[MTP], parts[BALANCE]])
    values, grad_norm, finite, loads = apply_parallel_update(pm.view, pm.routers(), mesh, optimizer,
                                                             grad_clip, parts)
    maxvio = {}
    if loads:
        maxvio = dict(zip(loads, torch.stack([max_violation(load) for load in loads.values()]).tolist()))
    if mesh is not None and mesh.pp.size() > 1:       # the other stages' layers
        gathered = [None] * mesh.pp.size()
        dist.all_gather_object(gathered, maxvio, group=mesh.pp.get_group())
        maxvio = {k: v for d in gathered for k, v in sorted(d.items())}
    return {**dict(zip(NAMES, values)), "grad_norm": grad_norm, "skipped": not finite,
            "maxvio": dict(sorted(maxvio.items()))}


def apply_parallel_update(view: torch.nn.Module, routers: dict, mesh: Meshes | None,
                          optimizer: torch.optim.Optimizer, grad_clip: float,
                          parts: torch.Tensor) -> tuple[list[float], float, bool, dict]:
    """train/step.py's apply_update for a model spread over a mesh: `parts` (loss first) are
    already the global figures; clip, one host read, then step and update the expert bias from
    the loads summed over dp, or drop the gradients and loads, the same decision on every rank.
    Returns (parts as floats, grad norm, finite, global loads per MoE layer: empty when skipped)."""
    dp = mesh.dp if mesh is not None else None
    norm = clip_grad_norm(view.parameters(), grad_clip, mesh)
    *values, grad_norm = torch.cat([parts.float(), norm.reshape(1).to(parts.device)]).tolist()
    finite = math.isfinite(grad_norm) and math.isfinite(values[0])
    loads = {}
    if finite:
        optimizer.step()
        if routers:
            stacked = all_reduce(torch.stack([r.load for r in routers.values()]), dp)
            for r, load in zip(routers.values(), stacked):
                r.load.copy_(load)
                r.update_bias()
            loads = dict(zip(routers, stacked))
    for r in routers.values():
        r.load.zero_()
    optimizer.zero_grad(set_to_none=True)
    return values, grad_norm, finite, loads
