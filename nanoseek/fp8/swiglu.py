"""FP8 SwiGLU feed-forward, dense (dense layers, shared experts) and grouped (routed experts).

    h = SiLU(x · W_gate^T) ⊙ (x · W_up^T),    y = h · W_down^T

Six GEMMs forward and backward per weight, all in FP8 as linear.py describes; a dense layer
is the grouped case with one group. What the backward keeps (V3 §3.3.3, "low-precision
activation"): the FP8 copy of x and the SwiGLU's inputs (gate, up) in FP8 with 1x128 tiles;
the SwiGLU's output h, the down projection's input, is not stored but recomputed from them
in the backward. Forward-only values (h for the fprop) use the unquantized gate and up.
The routed experts' weights change only at the optimizer step, so a training step quantizes
them once for all its micro-batches (train/precision.py's weights_once_a_step). Within such a
step the weight gradients may also be added straight into float32 buffers that become the
weights' .grad at its end (Megatron's "gradient accumulation fusion"): the wgrad kernel adds in
its store, where autograd would read, add and write every micro-batch's gradient once more.

Legend: M tokens (sorted by expert for the routed experts), D hidden size, F expert width,
E experts; `offsets_E` the cumulative token count of each expert (None: one dense layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import MLP, Experts, compute_dtype
from .gemm import grouped_mm, grouped_mm_tokens
from .quant import ACT_TILE, WEIGHT_BLOCK, Quantized, dequantize, quantize, quantize_tokens


class Fp8SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E, fast: bool, into: bool, *extra):
        """extra: the three weights as this step already quantized them (data, scale each), or
        nothing: quantize them here; then, with `into`, three float32 buffers of the weights'
        shapes that the backward adds the weights' gradients into, returning none for them."""
        weights_q, grads = (extra[:-3], extra[-3:]) if into else (extra, ())
        out_dtype = compute_dtype(x_MD)
        with torch.autocast(x_MD.device.type, enabled=False):
            xq = quantize(x_MD, ACT_TILE)
            if weights_q:
                wg, wu, wd = (Quantized(*weights_q[i:i + 2], WEIGHT_BLOCK) for i in (0, 2, 4))
            else:
                wg, wu, wd = (quantize(w, WEIGHT_BLOCK) for w in (w_gate_EFD, w_up_EFD, w_down_EDF))
            gate_MF = grouped_mm(xq, wg, offsets_E, out_dtype, fast)
            up_MF = grouped_mm(xq, wu, offsets_E, out_dtype, fast)
            h_MF = F.silu(gate_MF.float()) * up_MF.float()
            y_MD = grouped_mm(quantize(h_MF, ACT_TILE), wd, offsets_E, out_dtype, fast)
            gate_q, up_q = quantize(gate_MF, ACT_TILE), quantize(up_MF, ACT_TILE)
        ctx.save_for_backward(xq.data, xq.scale, gate_q.data, gate_q.scale, up_q.data, up_q.scale,
                              wg.data, wg.scale, wu.data, wu.scale, wd.data, wd.scale, offsets_E)
        ctx.fast, ctx.x_dtype, ctx.n_groups, ctx.n_extra = fast, x_MD.dtype, w_gate_EFD.shape[0], len(extra)
        # on ctx, not saved: the backward only writes them, and a saved tensor written before it is
        # unpacked (the layer run twice in one graph) would fail autograd's version check
        ctx.grads = grads
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_d, x_s, gate_d, gate_s, up_d, up_s, wg_d, wg_s, wu_d, wu_s, wd_d, wd_s, offsets_E = ctx.saved_tensors
        fast, E = ctx.fast, ctx.n_groups
        into_gate, into_up, into_down = ctx.grads or (None, None, None)
        q = lambda data, scale, block=ACT_TILE: Quantized(data, scale, block)  # noqa: E731
        with torch.autocast(dy_MD.device.type, enabled=False):
            f32 = torch.float32
            dh_MF = grouped_mm(quantize(dy_MD, ACT_TILE), q(wd_d, wd_s, WEIGHT_BLOCK).t(), offsets_E, f32, fast)
            gate_MF, up_MF = dequantize(q(gate_d, gate_s)), dequantize(q(up_d, up_s))
            sig_MF = torch.sigmoid(gate_MF)
            silu_MF = gate_MF * sig_MF
            h_MF = silu_MF * up_MF  # recomputed, not stored
            d_up_MF = dh_MF * silu_MF
            d_gate_MF = dh_MF * up_MF * sig_MF * (1 + gate_MF * (1 - sig_MF))  # SiLU'(g) = σ(g)(1 + g(1 - σ(g)))
            dy_T = quantize_tokens(dy_MD, offsets_E, fast)
            x_T = quantize_tokens(dequantize(q(x_d, x_s)), offsets_E, fast)
            dw_down = grouped_mm_tokens(dy_T, quantize_tokens(h_MF, offsets_E, fast), offsets_E, E, f32, fast,
                                        into_down)
            dw_gate = grouped_mm_tokens(quantize_tokens(d_gate_MF, offsets_E, fast), x_T, offsets_E, E, f32, fast,
                                        into_gate)
            dw_up = grouped_mm_tokens(quantize_tokens(d_up_MF, offsets_E, fast), x_T, offsets_E, E, f32, fast,
                                      into_up)
            dx_MD = (grouped_mm(quantize(d_gate_MF, ACT_TILE), q(wg_d, wg_s, WEIGHT_BLOCK).t(), offsets_E, f32, fast)
                     + grouped_mm(quantize(d_up_MF, ACT_TILE), q(wu_d, wu_s, WEIGHT_BLOCK).t(), offsets_E, f32, fast))
        if ctx.grads:  # added into the buffers already
            dw_gate = dw_up = dw_down = None
        return dx_MD.to(ctx.x_dtype), dw_gate, dw_up, dw_down, None, None, None, *[None] * ctx.n_extra


def fp8_swiglu(x_MD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E, fast: bool,
               weights_q: tuple[torch.Tensor, ...] = (), grads_into: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """grads_into: none, or float32 (gate, up, down) buffers the weights' gradients are added
    into instead of being returned to autograd, which then has no part in the weights (in eager
    mode neither their gradient accumulators nor their hooks run)."""
    if grads_into:
        w_gate_EFD, w_up_EFD, w_down_EDF = (w.detach() for w in (w_gate_EFD, w_up_EFD, w_down_EDF))
    return Fp8SwiGLUFunction.apply(x_MD, w_gate_EFD, w_up_EFD, w_down_EDF, offsets_E, fast, len(grads_into) > 0,
                                   *weights_q, *grads_into)


class Fp8TrainMLP(MLP):
    """A dense SwiGLU (dense layers, shared experts) in FP8 in training mode. The same
    gate_proj / up_proj / down_proj linears hold the weights, as in checkpoints."""

    fast: bool = False

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        weights = (self.gate_proj.weight[None], self.up_proj.weight[None], self.down_proj.weight[None])
        y_MD = fp8_swiglu(x.reshape(-1, x.shape[-1]), *weights, None, self.fast)
        return y_MD.view(*x.shape[:-1], -1)


class Fp8TrainExperts(Experts):
    """The routed experts in FP8 in training mode: model/moe.py's grouped path (tokens sorted
    by expert, one grouped GEMM per projection) with FP8 GEMMs."""

    fast: bool = False
    # within an optimizer step: the weights as quantized on its entry, in these non-persistent
    # buffers (train/precision.py's weights_once_a_step), data and scale of each
    step_weights: bool = False
    QUANTIZED = (("gate_q", "gate_q_scale"), ("up_q", "up_q_scale"), ("down_q", "down_q_scale"))
    # within an optimizer step with fused accumulation: the weights' gradients added into these
    # non-persistent float32 buffers, which become their .grad at the step's end (weights_once_a_step)
    grad_into: bool = False
    GRADS = ("gate_grad", "up_grad", "down_grad")

    def forward(self, x_ND, weight_NK, idx_NK):
        if not self.training:
            return super().forward(x_ND, weight_NK, idx_NK)
        return self.forward_grouped(x_ND, weight_NK, idx_NK)

    def swiglu_sorted(self, x_MD, counts_E):
        if not self.training:
            return super().swiglu_sorted(x_MD, counts_E)
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        given = tuple(getattr(self, n) for pair in self.QUANTIZED for n in pair) if self.step_weights else ()
        grads = tuple(getattr(self, n) for n in self.GRADS) if self.grad_into else ()
        return fp8_swiglu(x_MD, self.gate_proj, self.up_proj, self.down_proj, offsets_E, self.fast, given, grads)
