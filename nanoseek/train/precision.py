"""Training precision, one choice for every trainer (pretraining, SFT, GRPO):

    auto   BF16 autocast on a GPU, float32 on the CPU
    bf16   BF16 autocast (float32 master weights, gradients and optimizer); the linear and expert
           weights cast to BF16 once per optimizer step, not at every use (weights_once_a_step:
           2 bytes a weight of memory for a step's recasts)
    fp32   float32 throughout
    fp8    DeepSeek-V3's FP8 recipe (nanoseek/fp8) for the linear and expert GEMMs, BF16
           autocast for the rest; on the CPU the FP8 GEMMs are emulated (float32 products of
           FP8-rounded operands) and the rest runs in float32
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
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


# ---------------------------------------------------------------------- weights prepared once a step
# Under autocast every micro-batch recasts the float32 weights to BF16, and the compiled backward
# recasts them again rather than keep the casts: on DeepSeek-V2-Lite's layers, 41.5 of a BF16
# step's 224 ms of GPU time (benchmarks/results/h100_fp8train). The weights change only at the
# optimizer step, so one cast a step serves every micro-batch; the gradient still goes to the
# float32 weights, in float32.

# Fused accumulation (weights_once_a_step(fuse_accumulation=True), Megatron's "gradient
# accumulation fusion"): the step's BF16 copy is itself the leaf that collects the
# micro-batch's gradient, and a hook adds it into the float32 weight's .grad in one pass:
# 10 bytes a weight a micro-batch where the cast to float32 and autograd's add move 18. The
# float32 weight then has no part in autograd's graph, so hooks on it do not fire.
# FP8 training's routed experts do the same in their wgrad kernel: each weight's gradient is added
# into a float32 buffer in the kernel's store (fp8/swiglu.py), and the buffer becomes the
# weight's .grad when the step's micro-batches are done. Autograd never sees those gradients, so
# hooks on those weights see none either (a compiled step may still run their post-accumulate
# hooks, with .grad unchanged), and a weight no backward reached gets zeros, not None. Beyond
# the wgrad's own store, n micro-batches move 4 + 4n bytes a weight (the zeroing, the kernel's
# reads) where autograd's adds move 12(n - 1): more at one, as much at two, less from three.

def _accumulate_into(weight: torch.Tensor):
    def hook(cast: torch.Tensor) -> None:
        grad, cast.grad = cast.grad, None
        if weight.grad is None:
            weight.grad = grad.to(weight.dtype)
        else:
            weight.grad.add_(grad)
    return hook


def _step_weight(weight: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
    """The step's copy of `weight` for the forward: the leaf itself under fused accumulation,
    else through _StepCast, which hands the gradient on to the float32 weight."""
    return cast if cast.requires_grad else _StepCast.apply(weight, cast)


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
    dtype cast once on entry (`weights_once_a_step`; non-persistent buffers, so checkpoints do
    not change). Outside a step the layer is a plain Experts again."""

    CASTS = ("gate_cast", "up_cast", "down_cast")

    @staticmethod
    def weights(layer: Experts) -> tuple[torch.Tensor, ...]:
        return Experts.expert_weights(layer)

    def expert_weights(self, idx=None):
        if not self.training:
            return super().expert_weights(idx)
        weights = tuple(_step_weight(w, getattr(self, c)) for w, c in zip(self.weights(self), self.CASTS))
        return weights if idx is None else tuple(w[idx] for w in weights)


class StepCastLinear(nn.Linear):
    """nn.Linear, within one optimizer step, whose weight is read from its copy cast once on
    entry (the bias, a few values, autocast still casts)."""

    CASTS = ("weight_cast",)

    @staticmethod
    def weights(layer: nn.Linear) -> tuple[torch.Tensor, ...]:
        return (layer.weight,)

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        return F.linear(x, _step_weight(self.weight, self.weight_cast), self.bias)


STEP_CAST = {Experts: StepCastExperts, nn.Linear: StepCastLinear}


def step_cast_layers(model: nn.Module, dtype: torch.dtype | None) -> list[nn.Module]:
    """The plain linear and expert layers of `model` that can take one cast a step: float32
    weights on one device (not sharded), computed in a lower `dtype` (autocast's). Not the
    linears of FP8 training's MLPs, which read their weights into FP8 GEMMs."""
    from ..fp8.swiglu import Fp8TrainMLP
    if dtype is None or dtype == torch.float32:
        return []
    fp8 = {id(m) for mlp in model.modules() if isinstance(mlp, Fp8TrainMLP) for m in mlp.modules()}
    return [m for m in model.modules() if type(m) in STEP_CAST and id(m) not in fp8 and all(
        type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in m.parameters(recurse=False))]


@contextlib.contextmanager
def weights_once_a_step(model: nn.Module, dtype: torch.dtype | None, compiled: bool = False,
                        fuse_accumulation: bool = False):
    """Within it (one optimizer step's forward and backward passes), the linear and expert
    layers compute with their weights prepared once on entry: cast to autocast's `dtype`, or
    quantized (FP8 training's experts). The same numbers as at every use, since the weights
    change only at the optimizer step; but a weight used twice in a forward (the head, shared
    with MTP) sums its two gradients in float32, where autocast's cast cache sums them in BF16.
    `compiled`: the step runs compiled, so the quantization is compiled too (on a GPU).
    `fuse_accumulation`: each micro-batch's BF16 gradient of a cast weight is added into the
    float32 .grad in one pass (_accumulate_into; the two uses of a shared weight then sum in
    BF16 first, as autocast's do), and FP8 training's expert weights add theirs into float32
    buffers in the wgrad kernel, which become their .grad on exit. Either way hooks on those
    float32 weights see no gradient, so it is not for a wrapper that reduces gradients in hooks
    (DDP)."""
    from ..fp8.quant import FP8_DTYPE, WEIGHT_BLOCK, block_scale_shape
    from ..fp8.swiglu import Fp8TrainExperts
    cast = step_cast_layers(model, dtype)
    kinds = [type(layer) for layer in cast]
    quantized = [m for m in model.modules() if isinstance(m, Fp8TrainExperts) and m.training]
    # the experts whose gradients add into step buffers: their three weights trained, plain float32
    into = [m for m in quantized if fuse_accumulation and all(
        w.requires_grad and type(w.data) is torch.Tensor and w.dtype == torch.float32
        for w in Experts.expert_weights(m))]
    leaves, hooks = [], []
    try:
        with torch.no_grad():
            for layer, kind in zip(cast, kinds):
                step_kind = STEP_CAST[kind]
                for w, name in zip(step_kind.weights(layer), step_kind.CASTS):
                    buf = kept_buffer(layer, name, w.shape, dtype, w.device).copy_(w)
                    if fuse_accumulation:
                        leaves.append(buf.requires_grad_(True))
                        hooks.append(buf.register_post_accumulate_grad_hook(_accumulate_into(w)))
                layer.__class__ = step_kind
            for layer in quantized:
                for w, (data_name, scale_name) in zip(Experts.expert_weights(layer), layer.QUANTIZED):
                    data = kept_buffer(layer, data_name, w.shape, FP8_DTYPE, w.device)
                    scale = kept_buffer(layer, scale_name, block_scale_shape(w.shape, WEIGHT_BLOCK), torch.float32,
                                        w.device)
                    quantize_into(w, data, scale, compiled=compiled and w.is_cuda)
                layer.step_weights = True
            for layer in into:
                for w, name in zip(Experts.expert_weights(layer), layer.GRADS):
                    # the same buffer every step, so that a compiled graph sees the same tensor
                    buf = kept_buffer(layer, name, w.shape, torch.float32, w.device)
                    if w.grad is None:
                        buf.zero_()
                    else:
                        buf.copy_(w.grad)
                layer.grad_into = True
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for leaf in leaves:
            leaf.grad = None
            leaf.requires_grad_(False)
        for layer, kind in zip(cast, kinds):
            layer.__class__ = kind
        for layer in quantized:
            layer.step_weights = False
        for layer in into:
            if layer.grad_into:  # (not when entering failed before the buffers were ready)
                for w, name in zip(Experts.expert_weights(layer), layer.GRADS):
                    w.grad = getattr(layer, name)
            layer.grad_into = False


def _quantize_into(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    from ..fp8.quant import WEIGHT_BLOCK, quantize
    q = quantize(w, WEIGHT_BLOCK)
    data.copy_(q.data)
    scale.copy_(q.scale)


_compiled_quantize_into = None  # False once compiling it failed


def quantize_into(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, compiled: bool) -> None:
    """w quantized in 128x128 blocks into the buffers `data` and `scale`; `compiled` (a compiled
    step on a GPU), through torch.compile: eager's five passes over the float32 weights (amax,
    scale, cast, copies) took ~8x the one fused pass's HBM time on V2-Lite's shapes."""
    global _compiled_quantize_into
    if not compiled or _compiled_quantize_into is False:
        return _quantize_into(w, data, scale)
    if _compiled_quantize_into is None:
        _compiled_quantize_into = torch.compile(_quantize_into, dynamic=False)
    try:
        _compiled_quantize_into(w, data, scale)
    except Exception as e:  # noqa: BLE001 - a compiler failure costs speed, not the run
        warnings.warn(f"torch.compile of the FP8 weight quantization failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); quantizing eagerly")
        _compiled_quantize_into = False
        _quantize_into(w, data, scale)


def kept_buffer(module: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """module's non-persistent buffer `name` of this shape, dtype and device, the one it holds
    when it fits (the same memory every step: a compiled step reads the same addresses), else a
    new one."""
    buf = getattr(module, name, None)
    if buf is None or buf.dtype != dtype or buf.shape != tuple(shape) or buf.device != device:
        module.register_buffer(name, torch.empty(shape, dtype=dtype, device=device), persistent=False)
    return getattr(module, name)
