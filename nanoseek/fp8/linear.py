"""FP8 linear layer: its three GEMMs quantized as V3 Figure 7 draws them.

    fprop   y  = x · W^T       x in 1x128 tiles, W in 128x128 blocks
    dgrad   dx = dy · W        dy in 1x128 tiles, W^T: the same blocks transposed (no requantizing)
    wgrad   dW = dy^T · x      dy and x in 128x1 tiles (along the tokens, the contraction)

The input saved for the backward is the FP8 copy made for the fprop (data + one float32 per
128 values: ~1/2 of BF16's bytes), dequantized in the backward and requantized along the
tokens for the wgrad, as V3 converts its cached 1x128 tiles to 128x1 ones (§3.3.2-3). The
quantized weight is saved too (1 byte a parameter), so that the dgrad reuses it.
Outputs come in the compute dtype (autocast's, else the input's); dx in the input's dtype,
dW in the weight's (float32 master weights: float32 gradients, §3.3.1).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import compute_dtype
from .gemm import scaled_mm
from .quant import ACT_TILE, WEIGHT_BLOCK, Quantized, dequantize, quantize, quantize_tokens


class Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, fast: bool, save_fp8_input: bool):
        out_dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # the quantized GEMMs choose their dtypes
            x_MK = x.reshape(-1, x.shape[-1])
            xq, wq = quantize(x_MK, ACT_TILE), quantize(weight, WEIGHT_BLOCK)
            y_MN = scaled_mm(xq, wq, out_dtype, fast)
        saved_x = (xq.data, xq.scale) if save_fp8_input else (x_MK,)
        ctx.save_for_backward(wq.data, wq.scale, *saved_x)
        ctx.fast, ctx.x_shape, ctx.x_dtype = fast, x.shape, x.dtype
        return y_MN.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        w_data, w_scale, *saved_x = ctx.saved_tensors
        fast = ctx.fast
        with torch.autocast(dy.device.type, enabled=False):
            dy_MN = dy.reshape(-1, dy.shape[-1])
            dx = dw = None
            if ctx.needs_input_grad[0]:
                wq = Quantized(w_data, w_scale, WEIGHT_BLOCK)
                dx = scaled_mm(quantize(dy_MN, ACT_TILE), wq.t(), ctx.x_dtype, fast).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                x_MK = dequantize(Quantized(*saved_x, ACT_TILE)) if len(saved_x) == 2 else saved_x[0]
                dw = scaled_mm(quantize_tokens(dy_MN), quantize_tokens(x_MK), torch.float32, fast)
        return dx, dw, None, None


class Fp8TrainLinear(nn.Linear):
    """nn.Linear whose training forward runs the FP8 recipe; eval mode (inference, rollouts,
    evaluation) runs the plain layer. Same parameters and names: checkpoints do not change.
    Made by `convert.convert_to_fp8`, not constructed directly."""

    fast: bool = False
    save_fp8_input: bool = True

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        y = Fp8LinearFunction.apply(x, self.weight, self.fast, self.save_fp8_input)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={'fast' if self.fast else 'emulated'}"

