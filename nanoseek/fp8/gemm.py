"""The three FP8 GEMM shapes of training, each with its emulated twin and its fast path.

Every GEMM here is "NT": both operands are quantized along the contraction axis K, the
last axis of each, which is what the scales of `quant.py` describe.

    scaled_mm      a [M, K] · b [N, K]^T -> [M, N]            dense linear: fprop, dgrad, wgrad
    grouped_mm     a [M, K] · b[e] [N, K]^T for a's rows of   experts: fprop and dgrad
                   group e (rows sorted by group)
    grouped_mm_tokens  a [N, P] · b [K, P]^T over the tokens   experts: wgrad, one [N, K] per group
                   of each group -> [E, N, K] (P: the padded group-aligned token columns)

Twin (`fast=False`, and the CPU): dequantize both operands to float32 and multiply in
float32. Since every product of two E4M3 numbers is exact in float32, the twin differs from
an exact product of the dequantized operands only by float32 rounding.

Fast path (`fast=True`, an FP8-capable Hopper GPU):
- dense: `torch._scaled_mm` with blockwise scales (1x128 activations with 128x128 weights, or
  1x128 with 1x128 for the wgrad), cuBLASLt's DeepSeek-style recipe on SM90. cuBLAS applies
  each 128-long K block's scales to that block's tensor-core partial sum and accumulates in
  float32: the promotion at N_C = 128 that V3 §3.3.2 describes.
- grouped: torch 2.14's `_scaled_grouped_mm` has no blockwise scales (rowwise or MXFP8 only),
  so kernels.py has two Triton kernels doing the same per-128-K promotion.
Shapes cuBLAS does not take (a dimension not a multiple of 16, or a 128x128 scale layout the
installed torch would hand over wrong: `cublas_recipe`) go to the Triton kernels too.
benchmarks/fp8_gemm_error.py measures both paths' accumulation error against an FP8 GEMM that
sums all of K in the tensor cores (no promotion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import ACT_TILE, TILE, WEIGHT_BLOCK, Quantized, dequantize, first_tiles


# ---------------------------------------------------------------------- dense
def scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype, fast: bool) -> torch.Tensor:
    """a [M, K] (1x128 tiles) · b [N, K]^T (128x128 blocks or 1x128 tiles) -> [M, N] out_dtype."""
    if not fast:
        return (dequantize(a) @ dequantize(b).t()).to(out_dtype)
    if cublas_takes(a, b):
        return torch._scaled_mm(a.data, b.data.t(), scale_a=column_major(a.scale),
                                scale_b=cublas_scale_b(b), out_dtype=out_dtype)
    from .kernels import grouped_mm_fp8, grouped_mm_tokens_fp8
    if b.block == WEIGHT_BLOCK:  # a's rows as one group
        offsets = one_group(a.data.shape[0], a)
        return grouped_mm_fp8(a.data, a.scale, b.data[None], b.scale[None], offsets, first_tiles(offsets), out_dtype)
    # both quantized along K (a wgrad): K as one group of tokens
    return grouped_mm_tokens_fp8(a.data, a.scale, b.data, b.scale, first_tiles(one_group(a.data.shape[1], a)), 1,
                                 out_dtype)[0]


def cublas_takes(a: Quantized, b: Quantized) -> bool:
    """cuBLASLt's blockwise FP8 GEMM takes row-major a, column-major b, sizes multiple of 16,
    and a 128x128-blocked b only in a scale layout this torch hands over correctly."""
    (M, K), N = a.data.shape, b.data.shape[0]
    if a.block != ACT_TILE or b.block not in (ACT_TILE, WEIGHT_BLOCK) or M % 16 or K % 16 or N % 16:
        return False
    recipe = cublas_recipe(a.data.device)
    if recipe is None:
        return False
    if b.block == WEIGHT_BLOCK and recipe == "unpadded":  # right only where no padding is needed
        return b.scale.shape[-1] % 4 == 0 or b.scale.shape[0] == 1
    return True


# cuBLASLt reads a 128x128-block scale with its K-block stride rounded up to 4 (16 bytes).
# A torch that knows this takes the padded layout; an older one takes only the unpadded one,
# with which cuBLAS reads wrong scales wherever ⌈K/128⌉ is not a multiple of 4 (pytorch#166752),
# so those shapes go to the Triton kernels there. The installed torch is probed once, eagerly
# (a probe cannot run inside a compiled graph).
_RECIPES: dict[str, str | None] = {}


def cublas_recipe(device: torch.device) -> str | None:
    """"padded" or "unpadded" (the 128x128 scale layout this torch's _scaled_mm takes), or
    None (no blockwise _scaled_mm here: every FP8 GEMM goes to Triton)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _RECIPES:
        if torch.compiler.is_compiling():
            return None  # not probed before compiling: the Triton kernels, always right
        _RECIPES[key] = _probe(device)
    return _RECIPES[key]


def _probe(device: torch.device) -> str | None:
    """_scaled_mm on 16xK · Kx256 (two N blocks) with each layout: the padded one at K = 128
    (one K block, where the layouts differ), the unpadded one at K = 512 (four, where they
    agree); the first that torch accepts and computes right wins."""
    if device.type != "cuda":
        return None
    for name, L in (("padded", 1), ("unpadded", 4)):
        K = 128 * L
        a = torch.ones(16, K, device=device).to(torch.float8_e4m3fn)
        b = torch.ones(256, K, device=device).to(torch.float8_e4m3fn)
        scale_a = column_major(torch.ones(16, L, device=device))
        blocks = torch.tensor([[1.0], [2.0]], device=device).repeat(1, L)  # [N blocks, K blocks]
        want = torch.cat([torch.full((16, 128), K), torch.full((16, 128), 2.0 * K)], 1).to(device)
        try:
            out = torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=k_major(blocks, name == "padded"),
                                   out_dtype=torch.float32)
        except RuntimeError:
            continue
        if torch.equal(out, want):
            return name
    return None


def column_major(scale: torch.Tensor) -> torch.Tensor:
    """The same values with strides (1, rows): cuBLAS reads 1x128 scales outer-dim-major."""
    return scale.t().contiguous().t()


def cublas_scale_b(b: Quantized) -> torch.Tensor:
    """b's scale as _scaled_mm wants it for mat2 = b.data.t() [K, N]: [⌈K/128⌉, N] (1x128
    tiles, N-major) or [⌈K/128⌉, ⌈N/128⌉] (128x128 blocks, K-major; the K stride padded to a
    multiple of 4 where this torch takes it so)."""
    if b.block == ACT_TILE:
        return b.scale.t().contiguous()
    return k_major(b.scale, cublas_recipe(b.scale.device) == "padded")


def k_major(scale: torch.Tensor, padded: bool) -> torch.Tensor:
    """A contiguous [N blocks, L K-blocks] weight scale as the [L, N blocks] view cuBLAS reads;
    padded: its K stride rounded up to a multiple of 4 (a copy, unless L already is one)."""
    L = scale.shape[-1]
    return (F.pad(scale, (0, -L % 4))[:, :L] if padded and L % 4 else scale).t()


def one_group(n: int, a: Quantized) -> torch.Tensor:
    """The offsets of one group of n rows or tokens, on a's device."""
    return torch.full((1,), n, dtype=torch.int32, device=a.data.device)


# ---------------------------------------------------------------------- grouped
def grouped_mm(a: Quantized, b: Quantized, offsets_E: torch.Tensor | None, out_dtype: torch.dtype,
               fast: bool) -> torch.Tensor:
    """a [M, K] (1x128 tiles, rows sorted by group) · b[e] [N, K]^T (b [E, N, K], 128x128
    blocks) -> [M, N]; offsets_E: cumulative group ends, None for one group (a dense layer)."""
    if offsets_E is None:
        return scaled_mm(a, Quantized(b.data[0], b.scale[0], b.block), out_dtype, fast)
    if fast:
        from .kernels import grouped_mm_fp8
        return grouped_mm_fp8(a.data, a.scale, b.data, b.scale, offsets_E, first_tiles(offsets_E), out_dtype)
    a_MK, b_ENK = dequantize(a), dequantize(b)
    if grouped_mm_f32_takes(a_MK, b_ENK):
        return torch._grouped_mm(a_MK, b_ENK.transpose(-2, -1), offs=offsets_E).to(out_dtype)
    group_M = group_of_rows(offsets_E, a_MK.shape[0])
    out = a_MK.new_zeros(a_MK.shape[0], b_ENK.shape[1])
    for e in range(b_ENK.shape[0]):  # every group on every row, kept where the row is its group's
        out = torch.where((group_M == e)[:, None], a_MK @ b_ENK[e].t(), out)
    return out.to(out_dtype)


def grouped_mm_tokens(a: Quantized, b: Quantized, offsets_E: torch.Tensor | None, n_groups: int,
                      out_dtype: torch.dtype, fast: bool, into: torch.Tensor | None = None) -> torch.Tensor:
    """a [N, P] · b [K, P]^T summed over each group's tokens -> [E, N, K] (a weight gradient
    per group; zeros for a group without tokens). a and b come from quant.quantize_tokens with
    the same offsets_E, in its padded group-aligned layout (None: one group of all tokens).
    into: a float32 [E, N, K] gradient (contiguous) that the product is added to and that is
    returned; the fast path adds in the kernel's store, with no pass of its own."""
    if into is not None:
        if fast and offsets_E is not None:
            from .kernels import grouped_mm_tokens_into_fp8
            grouped_mm_tokens_into_fp8(a.data, a.scale, b.data, b.scale, first_tiles(offsets_E), into)
            return into
        return into.add_(grouped_mm_tokens(a, b, offsets_E, n_groups, into.dtype, fast))
    if offsets_E is None:
        return scaled_mm(a, b, out_dtype, fast)[None]
    if fast:
        from .kernels import grouped_mm_tokens_fp8
        return grouped_mm_tokens_fp8(a.data, a.scale, b.data, b.scale, first_tiles(offsets_E), n_groups, out_dtype)
    a_NP, b_KP = dequantize(a), dequantize(b)
    ends_E = (first_tiles(offsets_E)[1:] * TILE).to(torch.int32)  # each group's end column
    if grouped_mm_f32_takes(a_NP, b_KP):
        return torch._grouped_mm(a_NP, b_KP.t(), offs=ends_E).to(out_dtype)
    group_P = group_of_rows(ends_E, a_NP.shape[1])
    return torch.stack([(a_NP * (group_P == e)) @ b_KP.t() for e in range(n_groups)]).to(out_dtype)


def grouped_mm_f32_takes(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm runs float32 on the CPU, eagerly, on rows aligned to 16 bytes."""
    return (all(t.device.type == "cpu" and t.shape[-1] % 4 == 0 for t in tensors)
            and not torch.compiler.is_compiling())


def group_of_rows(offsets_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[M] the group of each row, from the cumulative group ends."""
    return torch.bucketize(torch.arange(n_rows, device=offsets_E.device), offsets_E, right=True)
