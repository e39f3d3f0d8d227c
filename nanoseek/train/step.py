"""One optimizer step: micro-batches with gradient accumulation, clipping, the MTP and balance
losses, then the auxiliary-loss-free bias update from this step's expert loads.

A non-finite loss or gradient norm skips the update (gradients dropped, loads discarded) and
is reported in the returned stats; the caller decides when too many in a row stop a run.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..model.moe import max_violation
from .precision import weights_once_a_step


def forward_backward(model: nn.Module, batch: dict, scale: float, autocast_dtype: torch.dtype | None):
    device_type = batch["input_ids"].device.type
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with ctx:
        out = model(batch["input_ids"], labels=batch["labels"])
    (out.loss * scale).backward()
    return out


def train_step(model: nn.Module, micro_batches: list[dict], optimizer: torch.optim.Optimizer,
               grad_clip: float = 1.0, autocast_dtype: torch.dtype | None = None,
               compiled: nn.Module | None = None, base_model: nn.Module | None = None,
               weights_once: bool = True, fuse_accumulation: bool = False) -> dict:
    """Returns loss parts (averaged over micro-batches) as tensors, grad norm, and MaxVio per
    MoE layer. `compiled` is the module to call (e.g. torch.compile(model)); `base_model` the
    plain module whose parameters and routers are updated (defaults to `model`); weights_once:
    the weights cast (quantized) once for the step's micro-batches (precision.weights_once_a_step)
    where that saves casts, else at every use; fuse_accumulation: with them, each micro-batch's
    gradient of a cast or quantized weight added into the float32 gradient in one pass."""
    base = base_model if base_model is not None else model
    call = compiled if compiled is not None else model
    n = len(micro_batches)
    names = ("loss", "main_loss", "mtp_loss", "balance_loss")
    parts = torch.zeros(len(names))
    # once a step pays where a weight would be cast more than once: over several micro-batches,
    # or in a compiled backward, which recasts rather than keep the forward's casts
    once = weights_once and (n > 1 or compiled is not None)
    with (weights_once_a_step(base, autocast_dtype, compiled is not None, fuse_accumulation) if once
          else contextlib.nullcontext()):
        for batch in micro_batches:
            out = forward_backward(call, batch, 1.0 / n, autocast_dtype)
            parts = parts.to(out.loss.device) + torch.stack(
                [getattr(out, k).detach().float() if getattr(out, k) is not None else out.loss.new_zeros(())
                 for k in names]) / n
    values, norm, finite, loads = apply_update(base, optimizer, grad_clip, parts)
    stats = dict(zip(names, values))
    stats["grad_norm"] = norm
    stats["skipped"] = not finite
    maxvio = torch.stack([max_violation(load) for load in loads.values()]).tolist() if loads else []
    stats["maxvio"] = dict(zip(loads, maxvio))
    return stats


def apply_update(base: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 parts: torch.Tensor) -> tuple[list[float], float, bool, dict]:
    """The end of every optimizer step (pre-training, SFT, GRPO): clip the gradients, read the
    step's figures `parts` (loss first) and the grad norm in ONE host read, then, if both the
    loss and the norm are finite, step the optimizer and update the expert bias from this
    step's loads; otherwise drop the gradients and the loads. Returns (parts as floats, grad
    norm, finite, loads per MoE layer: empty when skipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    *values, norm = torch.cat([parts.float(), grad_norm.reshape(1).to(parts.device, torch.float32)]).tolist()
    finite = math.isfinite(norm) and math.isfinite(values[0])
    if finite:
        optimizer.step()
        loads = base.update_expert_bias()
    else:
        for r in base.routers().values():
            r.load.zero_()
        loads = {}
    optimizer.zero_grad(set_to_none=True)
    return values, norm, finite, loads
