"""Training precision, one choice for every trainer (pretraining, SFT, GRPO):

    auto   BF16 autocast on a GPU, float32 on the CPU
    bf16   BF16 autocast (float32 master weights, gradients and optimizer); the routed experts'
           weights cast to BF16 once per optimizer step, not at every use (expert_weights_once:
           2 bytes a weight of memory for a step's recasts)
    fp32   float32 throughout
    fp8    DeepSeek-V3's FP8 recipe (nanoseek/fp8) for the linear and expert GEMMs, BF16
           autocast for the rest; on the CPU the FP8 GEMMs are emulated (float32 products of
           FP8-rounded operands) and the rest runs in float32
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model.moe import Experts

PRECISIONS = ("auto", "bf16", "fp32", "fp8")


def prepare_precision(model: nn.Module, precision: str, device: torch.device) -> torch.dtype | None:
    """Apply `precision` to a model about to train on `device`: for fp8, swap its layers for
    the FP8 ones (raising fp8.Fp8Unsupported, one line, on a GPU that cannot run them).
    Returns the autocast dtype of the forward passes (None: none)."""
    if precision == "fp8":
        from ..fp8 import convert_to_fp8
        convert_to_fp8(model, device=device)
    gpu = device.type == "cuda"
    if precision == "bf16" or (precision in ("auto", "fp8") and gpu):
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------- expert weights, cast once a step
# Under autocast every micro-batch recasts the float32 expert weights to BF16, and the compiled
# backward recasts them again rather than keep the casts: on DeepSeek-V2-Lite's layers ~15% of a
# BF16 step. The weights change only at the optimizer step, so one cast a step serves every
# micro-batch; the gradient still goes to the float32 weights, in float32.

class _StepCast(torch.autograd.Function):
    """weight (float32, a parameter) -> cast (its copy in the compute dtype, made this step);
    the gradient passes to the weight as autocast's cast would pass it."""

    @staticmethod
    def forward(ctx, weight, cast):
        ctx.dtype = weight.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


class StepCastExperts(Experts):
    """Experts, within one optimizer step, whose weights are read from copies in the compute
    dtype cast once on entry (`expert_weights_once`; non-persistent buffers, so checkpoints do
    not change). Outside a step the layer is a plain Experts again."""

    CASTS = ("gate_cast", "up_cast", "down_cast")

    def expert_weights(self, idx=None):
        if not self.training:
            return super().expert_weights(idx)
        weights = tuple(_StepCast.apply(w, getattr(self, c))
                        for w, c in zip(super().expert_weights(), self.CASTS))
        return weights if idx is None else tuple(w[idx] for w in weights)


def step_cast_experts(model: nn.Module, dtype: torch.dtype | None) -> list[Experts]:
    """The plain expert layers of `model` that can take one cast a step: float32 weights on one
    device (not sharded), computed in a lower `dtype` (autocast's)."""
    if dtype is None or dtype == torch.float32:
        return []
    return [m for m in model.modules() if type(m) is Experts and all(
        type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in m.parameters(recurse=False))]


@contextlib.contextmanager
def expert_weights_once(model: nn.Module, dtype: torch.dtype | None):
    """Within it (one optimizer step's forward and backward passes), the expert layers compute
    with their weights prepared once on entry: cast to autocast's `dtype`, or quantized (FP8
    training's experts). The same numbers as at every use, since the weights change only at
    the optimizer step."""
    from ..fp8.quant import WEIGHT_BLOCK, quantize
    from ..fp8.swiglu import Fp8TrainExperts
    cast = step_cast_experts(model, dtype)
    quantized = [m for m in model.modules() if isinstance(m, Fp8TrainExperts) and m.training]
    try:
        with torch.no_grad():
            for layer in cast:
                for w, name in zip(Experts.expert_weights(layer), StepCastExperts.CASTS):
                    kept_buffer(layer, name, w, dtype).copy_(w)
                layer.__class__ = StepCastExperts
            for layer in quantized:
                for i, w in enumerate(Experts.expert_weights(layer)):
                    for name, t in zip(layer.QUANTIZED[2 * i:2 * i + 2], quantize(w, WEIGHT_BLOCK)[:2]):
                        kept_buffer(layer, name, t, t.dtype).copy_(t)
                layer.step_weights = True
        yield
    finally:
        for layer in cast:
            layer.__class__ = Experts
        for layer in quantized:
            layer.step_weights = False


def kept_buffer(module: nn.Module, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """module's non-persistent buffer `name` shaped as `like` in `dtype`, the one it holds when it
    fits (the same memory every step: a compiled step reads the same addresses), else a new one."""
    buf = getattr(module, name, None)
    if buf is None or buf.dtype != dtype or buf.shape != like.shape or buf.device != like.device:
        module.register_buffer(name, torch.empty_like(like, dtype=dtype), persistent=False)
    return getattr(module, name)
