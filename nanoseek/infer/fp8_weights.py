"""FP8 weights at inference: a checkpoint stored in FP8 stays FP8 in memory.

The official V3 / R1 weights keep the linear layers' and the experts' matrices as
float8_e4m3fn with one float32 scale per 128x128 block (`weight_scale_inv`; hf.py).
Dequantising them at load doubles the memory and the bytes every decode step reads, and a
decode step's time is those bytes. So `keep_fp8_weights`, a module swap applied from outside
the model while it is still on the meta device (`from_pretrained(keep_fp8=...)`), puts an
`FP8Linear` or `FP8Experts` wherever the checkpoint is FP8, and the loader copies the FP8
values and their scales in as stored:

- FP8Linear: weight [out, in] float8 + weight_scale_inv. The twin dequantises (w_fp8 ·
  scale_inv, in float32) into the model's weight dtype and runs `F.linear`: exactly what the
  model dequantised at load computes. On a GPU, decode-sized inputs (up to 64 rows) go
  through kernels/fp8_linear.py instead, which reads the FP8 weight in place (weight-only
  FP8: the products in BF16, float32 sums, the block scales applied to them); larger inputs
  (a prefill) dequantise the weight as the twin does, by one Triton pass. kernel="w8a8"
  quantises the activations too, per token per 128 channels as FP8 training does, and runs
  the FP8 x FP8 GEMM of training (fp8/gemm.py: cuBLAS's blockwise `_scaled_mm` on Hopper, the
  float32 twin elsewhere), for every row count: prefill and decode.
- FP8MLP: a SwiGLU MLP (shared experts, dense layers) whose gate and up are FP8Linear: at one
  row its gate and up take one GEMV launch that reads both weights.
- FP8Experts: the stacked experts [E, F, D] / [E, D, F] in float8 with scales [E, ⌈F/128⌉,
  ⌈D/128⌉]. The small-batch kernels (kernels/moe.py: decode batches of up to 64 tokens on a
  GPU) read them in place with their scales, and so does the GEMV of kernels/fp8_linear.py
  when a decode step of a few pairs gathers the chosen experts. Every other expert path reads
  its weights through `Experts.expert_weights`, which this class dequantises. A prefill's
  grouped GEMMs read the FP8 experts in place too, where the kernels run (fp8/kernels.py:
  weight-only, or with kernel="w8a8" the activations quantized as in training); elsewhere
  they dequantise all experts.
`kv_b_proj` is dequantised at load: the absorbed attention uses its per-head blocks as
matrices (W_UK into the query, W_UV into the output), as DeepSeek's own inference code does.
The dequantised model is the twin of the FP8 one (tests compare their logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..fp8.quant import block_scale_shape
from ..hf import FP8_BLOCK, SCALE_SUFFIX, dequantize_fp8_blockwise, quantize_fp8_blockwise
from ..kernels import fast_kernels_supported, triton_runs
from ..model import Transformer
from ..model.moe import MLP, Experts, compute_dtype

# modules an FP8 checkpoint's weights stay FP8 in, by name; kv_b_proj: see the module docstring
DEQUANTIZED = ("kv_b_proj",)
KERNELS = ("auto", "triton", "twin", "w8a8")


def _dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    return dequantize_fp8_blockwise(w, scale_inv, block).to(dtype)


def _kernels_run(kernel: str, x: torch.Tensor, anywhere: bool = False) -> bool:
    """Whether a module of this kernel choice may run kernels/fp8_linear.py's kernels on x: never
    the twin nor under autograd; "triton" (or anywhere) wherever Triton runs (the CPU tests: its
    interpreter), else only where the fast kernels were measured (kernels.fast_kernels_supported)."""
    if kernel == "twin" or torch.is_grad_enabled():
        return False
    if kernel == "triton" or anywhere:
        return triton_runs(x.device)
    return fast_kernels_supported(x.device, compute_dtype(x))


def fp8_gemm_fast(x: torch.Tensor) -> bool:
    """Whether fp8/gemm.py's W8A8 GEMMs take their fast path for x (a Hopper GPU), not the twin."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9


def _fp8_buffers(module: nn.Module, name: str, weight: torch.Tensor, block: tuple[int, int]) -> None:
    """Register `name` (float8, weight's shape) and its block scales `name_scale_inv`: empty
    on the meta device (a checkpoint fills them), else weight quantised."""
    if weight.is_meta:
        w_fp8 = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device="meta")
        scale_inv = torch.empty(block_scale_shape(weight.shape, block), device="meta")
    elif weight.dim() == 3:  # one expert at a time: the float32 temporaries of V3's 256 at once take 14 GiB
        w_fp8 = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
        scale_inv = torch.empty(block_scale_shape(weight.shape, block), device=weight.device)
        for e in range(weight.shape[0]):
            w_fp8[e], scale_inv[e] = quantize_fp8_blockwise(weight[e].detach(), block)
    else:
        w_fp8, scale_inv = quantize_fp8_blockwise(weight.detach(), block)
    module.register_buffer(name, w_fp8)
    module.register_buffer(name + SCALE_SUFFIX, scale_inv)


class FP8Linear(nn.Module):
    """A bias-optional linear layer with an FP8 weight and 128x128 block scales (module
    docstring). dtype: what the twin dequantises into (the model's other weights' dtype);
    kernel: "auto" (the Triton kernel on an NVIDIA Hopper+ GPU for up to 64 rows), "triton"
    (wherever Triton runs: the CPU tests use its interpreter), "twin" (never) or "w8a8"
    (activations in FP8 too: module docstring)."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int], kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block, self.kernel, self.dtype = block, kernel, linear.weight.dtype
        _fp8_buffers(self, "weight", linear.weight, block)
        self.bias = linear.bias

    def dequantized_weight(self, kernel: bool = False) -> torch.Tensor:
        """The weight in self.dtype; kernel: by kernels/fp8_linear.fp8_dequantize in one pass (the
        same values) instead of torch's float32 temporaries."""
        if kernel:
            from ..kernels.fp8_linear import fp8_dequantize
            return fp8_dequantize(self.weight, self.weight_scale_inv, list(self.block), self.dtype)
        return _dequantize(self.weight, self.weight_scale_inv, self.block, self.dtype)

    def takes_kernel(self, x_MK: torch.Tensor) -> bool:
        if not _kernels_run(self.kernel, x_MK):
            return False
        from ..kernels import fp8_linear
        return fp8_linear.unsupported(x_MK.shape[0], self.weight, self.block) is None

    def w8a8(self, x_MK: torch.Tensor) -> torch.Tensor:
        """x [M, K] in 1x128 FP8 tiles times the FP8 weight: [M, N] in x's compute dtype."""
        from ..fp8.gemm import scaled_mm
        from ..fp8.quant import ACT_TILE, Quantized, quantize
        fast = fp8_gemm_fast(x_MK)
        M, pad = x_MK.shape[0], -x_MK.shape[0] % 16  # cuBLAS's blockwise GEMM takes rows in 16s
        x_q = quantize(F.pad(x_MK, (0, 0, 0, pad)) if fast and pad else x_MK, ACT_TILE)
        w_q = Quantized(self.weight, self.weight_scale_inv, self.block)
        return scaled_mm(x_q, w_q, compute_dtype(x_MK), fast)[:M]

    def forward(self, x):
        x_MK = x.reshape(-1, self.in_features)
        if self.kernel == "w8a8" and not torch.is_grad_enabled() and self.block == FP8_BLOCK:
            y = self.w8a8(x_MK).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.takes_kernel(x_MK):
            from ..kernels.fp8_linear import fp8_weight_linear
            y = fp8_weight_linear(x_MK.to(compute_dtype(x)), self.weight, self.weight_scale_inv, list(self.block))
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        # past the kernels' rows (a prefill): dequantized, then cuBLAS
        return F.linear(x, self.dequantized_weight(_kernels_run(self.kernel, x_MK)), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks {self.block}"


class FP8MLP(MLP):
    """A SwiGLU MLP (shared experts, a dense layer) whose gate and up projections are FP8Linear:
    at one row, where their kernel runs the GEMV, both go through one launch that reads the two
    weights and applies the SiLU product (kernels/fp8_linear.fp8_swiglu_gemv); else as MLP."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def fused(self, x_MK: torch.Tensor) -> bool:
        """Where gate alone would take the GEMV (keep_fp8_weights gives gate and up one block and
        kernel, and an MLP's linears have no bias)."""
        from ..kernels import fp8_linear
        gate = self.gate_proj
        return (gate.kernel != "w8a8" and gate.takes_kernel(x_MK)
                and fp8_linear.takes_gemv(x_MK.shape[0], gate.out_features, gate.in_features, gate.block))

    def forward(self, x):
        x_MK = x.reshape(-1, x.shape[-1])
        if not self.fused(x_MK):
            return super().forward(x)
        from ..kernels.fp8_linear import fp8_swiglu_gemv
        g, u = self.gate_proj, self.up_proj
        h = fp8_swiglu_gemv(x_MK.to(compute_dtype(x)), g.weight, g.weight_scale_inv, u.weight, u.weight_scale_inv,
                            list(g.block))
        return self.down_proj(h.view(*x.shape[:-1], -1).to(x.dtype))


class FP8Experts(Experts):
    """Experts whose stacked weights are FP8 with block scales per expert (module docstring).
    kernel: as FP8Linear's, for the grouped GEMMs of a prefill: "auto" and "triton" the
    weight-only kernel, "w8a8" the activations quantized too, "twin" the experts dequantised."""

    def __init__(self, experts: Experts, block: tuple[int, int], kernel: str = "auto"):
        nn.Module.__init__(self)
        self.path, self.last_path = experts.path, None
        self.block, self.dtype, self.kernel = block, experts.gate_proj.dtype, kernel
        for name in ("gate_proj", "up_proj", "down_proj"):
            _fp8_buffers(self, name, getattr(experts, name), block)

    def grouped_kernels_take(self, x_MD: torch.Tensor) -> bool:
        """Whether a grouped forward reads the FP8 weights in place (else it dequantises them all)."""
        if tuple(self.block) != FP8_BLOCK:
            return False
        if self.kernel == "w8a8":  # the FP8 GEMM's float32 twin where there is no FP8 GPU, as FP8Linear's
            return not torch.is_grad_enabled()
        return _kernels_run(self.kernel, x_MD)

    def swiglu_sorted(self, x_MD, counts_E):
        """A prefill's three grouped GEMMs on the FP8 weights as stored, where a dequantised copy
        of every expert would be written and read again: 5 bytes a parameter instead of 1."""
        if not self.grouped_kernels_take(x_MD):
            return super().swiglu_sorted(x_MD, counts_E)
        from ..fp8.quant import first_tiles
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        dtype = compute_dtype(x_MD)
        (w_gate, w_up, w_down), (s_gate, s_up, s_down), _ = self.small_batch_weights()
        if self.kernel == "w8a8":
            from ..fp8.gemm import grouped_mm
            from ..fp8.quant import ACT_TILE, Quantized, quantize
            fast = fp8_gemm_fast(x_MD)
            xq = quantize(x_MD, ACT_TILE)
            gate_MF = grouped_mm(xq, Quantized(w_gate, s_gate, FP8_BLOCK), offsets_E, dtype, fast)
            up_MF = grouped_mm(xq, Quantized(w_up, s_up, FP8_BLOCK), offsets_E, dtype, fast)
            h_MF = quantize(F.silu(gate_MF) * up_MF, ACT_TILE)
            return grouped_mm(h_MF, Quantized(w_down, s_down, FP8_BLOCK), offsets_E, dtype, fast)
        from ..fp8.kernels import grouped_mm_fp8_weight
        first_E1 = first_tiles(offsets_E)
        x_MD = x_MD.to(dtype).contiguous()
        gate_MF = grouped_mm_fp8_weight(x_MD, w_gate, s_gate, offsets_E, first_E1)
        up_MF = grouped_mm_fp8_weight(x_MD, w_up, s_up, offsets_E, first_E1)
        # in the compute dtype, as model.moe.grouped_swiglu (the dequantised twin) multiplies
        return grouped_mm_fp8_weight((F.silu(gate_MF) * up_MF).contiguous(), w_down, s_down, offsets_E, first_E1)

    def gemv_takes(self, x_ND: torch.Tensor, anywhere: bool = False) -> bool:
        """Whether a gathered forward (a decode step of a few pairs) runs kernels/fp8_linear.py's
        GEMV on the FP8 experts in place, as FP8Linear's kernel choice (anywhere: wherever Triton
        runs, as "triton"): else they are dequantised."""
        if self.kernel == "w8a8" or not _kernels_run(self.kernel, x_ND, anywhere):
            return False
        from ..kernels import fp8_linear
        return all(fp8_linear.unsupported(1, getattr(self, n), self.block) is None
                   for n in ("gate_proj", "up_proj", "down_proj"))

    def forward_gathered(self, x_ND, weight_NK, idx_NK, anywhere: bool = False):
        if not self.gemv_takes(x_ND, anywhere):
            return super().forward_gathered(x_ND, weight_NK, idx_NK)
        from ..kernels.fp8_linear import fp8_experts_gemv
        (w_gate, w_up, w_down), (s_gate, s_up, s_down), block = self.small_batch_weights()
        y_NKD = fp8_experts_gemv(x_ND.to(compute_dtype(x_ND)), idx_NK, weight_NK, w_gate, w_up, w_down,
                                 s_gate, s_up, s_down, list(block))
        return y_NKD.sum(1).to(x_ND.dtype)

    def forward_gathered_gemv(self, x_ND, weight_NK, idx_NK):
        """Every projection through the GEMV ("gather_gemv": wherever Triton runs)."""
        return self.forward_gathered(x_ND, weight_NK, idx_NK, anywhere=True)

    def small_batch_weights(self):
        """The FP8 weights and their scales as stored: kernels/moe.py reads them in place."""
        names = ("gate_proj", "up_proj", "down_proj")
        return (tuple(getattr(self, n) for n in names), tuple(getattr(self, n + SCALE_SUFFIX) for n in names),
                tuple(self.block))

    def expert_weights(self, idx=None):
        names = ("gate_proj", "up_proj", "down_proj")
        pairs = [(getattr(self, n), getattr(self, n + SCALE_SUFFIX)) for n in names]
        if idx is not None:
            pairs = [(w[idx], s[idx]) for w, s in pairs]
        return tuple(_dequantize(w, s, self.block, self.dtype) for w, s in pairs)


def keep_fp8_weights(model: Transformer, fp8_names: set[str], block: tuple[int, int],
                     kernel: str = "auto") -> None:
    """The module swap `from_pretrained(keep_fp8=...)` applies: every nn.Linear and Experts
    whose weights the checkpoint stores in FP8 (fp8_names: state-dict names) becomes an
    FP8Linear / FP8Experts, except DEQUANTIZED, and an MLP whose gate and up became FP8Linear an
    FP8MLP; kernel: FP8Linear's. On a model that is not on the meta device the new modules hold
    its weights quantised."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: must be one of {', '.join(KERNELS)}")
    if kernel == "w8a8" and torch.cuda.is_available():
        from ..fp8.gemm import cublas_recipe
        cublas_recipe(torch.device("cuda"))  # probed eagerly, before any compile or CUDA graph
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if child in DEQUANTIZED:
            continue
        if isinstance(module, nn.Linear) and f"{name}.weight" in fp8_names:
            swapped = FP8Linear(module, block, kernel)
        elif type(module) is Experts and f"{name}.gate_proj" in fp8_names:
            swapped = FP8Experts(module, block, kernel)
        else:
            continue
        setattr(model.get_submodule(parent_name), child, swapped)
    for name, module in list(model.named_modules()):  # after their linears: one launch for gate and up
        if type(module) is MLP and isinstance(module.gate_proj, FP8Linear) and isinstance(module.up_proj, FP8Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, FP8MLP(module))


def layer_weights(model: Transformer) -> set[str]:
    """What an official V3 checkpoint stores in FP8: every decoder layer's linear weights and
    routed experts (state-dict names; the stacked gate_proj names its experts); not the
    embedding, the output head or the routers."""
    return {f"{name}.weight" if isinstance(m, nn.Linear) else f"{name}.gate_proj"
            for name, m in model.named_modules()
            if name.startswith("model.layers.") and (isinstance(m, nn.Linear) or type(m) is Experts)}


def quantize_weights(model: Transformer, block: tuple[int, int] = FP8_BLOCK, kernel: str = "auto") -> Transformer:
    """A loaded model's layer weights (layer_weights) in FP8 with block scales, in place, as
    loading its FP8 checkpoint would hold them (kv_b_proj excepted, keep_fp8_weights)."""
    keep_fp8_weights(model, layer_weights(model), block, kernel)
    return model


# --dtype of serve, generate and chat: how a checkpoint's weights are held
DTYPE_CHOICES = {"auto": dict(dtype=None, keep_fp8=keep_fp8_weights),   # FP8 stays FP8, else as stored
                 "bf16": dict(dtype=torch.bfloat16, keep_fp8=None),      # FP8 dequantised
                 "fp32": dict(dtype=torch.float32, keep_fp8=None)}


def has_fp8_weights(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (FP8 weights and their scales
    included), each tensor counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
