"""Triton kernels for the grouped FP8 GEMMs of the experts, blockwise-scaled as V3 does.

torch 2.14's `_scaled_grouped_mm` takes rowwise or MXFP8 scales only, not DeepSeek's
1x128 / 128x128 ones, so the grouped GEMMs are written here (the dense ones go to cuBLAS
through `torch._scaled_mm`, gemm.py). Both kernels step through K one 128-long block at a
time: `tl.dot` of two E4M3 blocks gives that block's partial sums in float32, which are
multiplied by the block's two scales and added to a float32 accumulator. That is the
promotion of V3 §3.3.2 at N_C = 128 (the scales change every 128 of K, so they must).

Legend: M tokens sorted by group (expert), E groups, `ends` the cumulative group ends
(int32, as torch._grouped_mm's offs), `first_tile` [E + 1] each group's first 128-token
tile (quant.first_tiles). A tile never holds two groups' tokens.

- `grouped_mm_kernel`: c [M, N] = a [M, K] · b[e] [N, K]^T for the rows of group e, with a
  in 1x128 tiles and b in 128x128 blocks; one program per (block of columns, 128-row tile or
  half of one).
  Without A_SCALED, a is BF16 and only b is FP8 (weight-only, inference's prefill).
- `grouped_mm_tokens_kernel`: c[e] [N, K] = Σ over group e's tokens of a [N, P] · b [K, P]^T,
  both in the padded group-aligned 128-token tiles of quant.quantize_tokens; one program per
  (block of N, block of K, group), looping over the group's tiles. With ACCUMULATE it adds into
  c (a float32 gradient) instead of overwriting it.
- `quantize_tokens_kernel`: those tiles built from the [tokens, channels] activations or
  gradients in one pass; one program per (tile, block of channels).

The contraction tile is always 128 (the scales' granularity); the output block widths,
warps and stages are timed per shape on a GPU (triton.autotune). The twins are gemm.py's
float32 paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import TILE


@triton.jit
def _tile_rows(ends_ptr, first_tile_ptr, tile, E, EP: tl.constexpr, BLOCK: tl.constexpr):
    """(group, first token, the group's end token) of a group-aligned 128-token tile. The grids
    are a bound (⌈M/128⌉ + E - 1 tiles): a tile past the last group's counts as that group's,
    and its first token lies past the group's end, so it holds no rows."""
    groups = tl.arange(0, EP)
    tile_ends = tl.load(first_tile_ptr + 1 + groups, mask=groups < E, other=2**30)
    e = tl.minimum(tl.sum((tile_ends <= tile).to(tl.int32), 0), E - 1)  # the group whose tiles hold it
    end = tl.load(ends_ptr + e)
    start = tl.load(ends_ptr + tl.maximum(e - 1, 0), mask=e > 0, other=0)
    return e, start + (tile - tl.load(first_tile_ptr + e)) * BLOCK, end


@triton.jit
def grouped_mm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, ends_ptr, first_tile_ptr, N, K, E,
                      EP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      A_SCALED: tl.constexpr = True):
    # A_SCALED False: a is not quantized (BF16 activations at inference, sa_ptr unused) and b's
    # E4M3 blocks are widened to a's dtype for the dot: weight-only FP8, the BF16 model's products.
    # a program takes BLOCK_M rows of a 128-row tile: all of it, or half (BLOCK_M divides 128).
    # The column blocks are the fastest grid axis: the programs running at once share their rows
    # of a in L2, which is read once from memory, where with the rows fastest a was read once per
    # column block (a [M, K] is as large as L2 at V2-Lite's shapes)
    pid_n = tl.program_id(0)
    tile = tl.program_id(1) // (BLOCK // BLOCK_M)
    part = tl.program_id(1) % (BLOCK // BLOCK_M)
    e, row0, end = _tile_rows(ends_ptr, first_tile_ptr, tile, E, EP, BLOCK)
    row0 += part * BLOCK_M
    if row0 < end:  # not a tile past the last group's, nor the empty half of a group's last tile
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < end, cols < N
        nk = tl.cdiv(K, BLOCK)
        b_base = b_ptr + e.to(tl.int64) * N * K
        # the 128x128 block scale of each column, per K block: one number for a block of at
        # most 128 columns, which then scales the rows' scales, not every partial sum twice
        sb_cols = sb_ptr + (e.to(tl.int64) * tl.cdiv(N, BLOCK) + cols // BLOCK) * nk
        sb_block = sb_ptr + (e.to(tl.int64) * tl.cdiv(N, BLOCK) + pid_n * BLOCK_N // BLOCK) * nk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, nk):
            ks = kb * BLOCK + tl.arange(0, BLOCK)
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                        other=0.0)
            b = tl.load(b_base + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :],
                        other=0.0)
            if A_SCALED:
                sa = tl.load(sa_ptr + rows * nk + kb, mask=row_ok, other=0.0)
                if BLOCK_N <= BLOCK:
                    acc += tl.dot(a, tl.trans(b)) * (sa * tl.load(sb_block + kb))[:, None]
                else:
                    sb = tl.load(sb_cols + kb, mask=col_ok, other=0.0)
                    acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
            elif BLOCK_N <= BLOCK:
                acc += tl.dot(a, tl.trans(b.to(a.dtype))) * tl.load(sb_block + kb)
            else:
                sb = tl.load(sb_cols + kb, mask=col_ok, other=0.0)
                acc += tl.dot(a, tl.trans(b.to(a.dtype))) * sb[None, :]
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_mm_tokens_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, first_tile_ptr, N, K, P, T,
                             BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             ACCUMULATE: tl.constexpr = False):
    # the group is the slowest grid axis, so that the programs running at once share their
    # group's tiles in L2
    e = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    ns = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (tl.program_id(0) // n_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = ns < N, ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(tl.load(first_tile_ptr + e), tl.load(first_tile_ptr + e + 1)):  # none: a zero gradient
        ms = t * BLOCK + tl.arange(0, BLOCK)
        m_ok = ms < P  # the padded layout is whole tiles; one plain group may end mid-tile
        a = tl.load(a_ptr + ns[:, None].to(tl.int64) * P + ms[None, :], mask=n_ok[:, None] & m_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * P + ms[None, :], mask=k_ok[:, None] & m_ok[None, :],
                    other=0.0)
        sa = tl.load(sa_ptr + ns * T + t, mask=n_ok, other=0.0)
        sb = tl.load(sb_ptr + ks * T + t, mask=k_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
    c_ptrs = c_ptr + (e.to(tl.int64) * N + ns[:, None]) * K + ks[None, :]
    c_ok = n_ok[:, None] & k_ok[None, :]
    if ACCUMULATE:  # read after the loop: the old block holds no registers while the tiles stream
        acc = tl.load(c_ptrs, mask=c_ok, other=0.0) + acc
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def quantize_tokens_kernel(x_ptr, q_ptr, s_ptr, ends_ptr, first_tile_ptr, M, C, T, E, FP8_MAX: tl.constexpr,
                           EP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (tile, block of channels): x's rows of one group-aligned 128-token tile (a
    contiguous run of its group's tokens, or none past the last group), amax per channel
    over them, E4M3 values written transposed: q [C, 128·T] and s [C, T]. The tokens are read
    along the channels and written along the tokens, each once; quant.quantize_tokens is the
    twin, division correctly rounded as torch's so that the bytes agree."""
    tile = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    _, row0, end = _tile_rows(ends_ptr, first_tile_ptr, tile, E, EP, BLOCK)
    rows = row0 + tl.arange(0, BLOCK)  # none of a tile past the last group's is read: it holds zeros
    r_ok = (rows < end) & (rows < M)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cs[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    # tl.max drops NaNs: a tile holding one gets a NaN scale, as the twin's amax gives it
    amax = tl.where(tl.sum((x != x).to(tl.int32), axis=0) > 0, float("nan"), amax)
    scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)))
    q = tl.math.div_rn(x, tl.broadcast_to(scale[None, :], x.shape))
    # a NaN stays NaN, as torch's clamp keeps it (by where: Triton 3.6 rejects a PropagateNan bound to a name)
    q = tl.where(q != q, q, tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)).to(q_ptr.dtype.element_ty)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    tl.store(q_ptr + cs[:, None].to(tl.int64) * (T * BLOCK) + cols[None, :], tl.trans(q), mask=c_ok[:, None])
    tl.store(s_ptr + cs * T + tile, scale, mask=c_ok)


# On a GPU the launch shapes are chosen per (N, K) by timing a few Hopper-typical ones (a kernel
# that writes its whole output can run any number of times; the accumulating launch's output is
# restored after each timing run; a 256-wide block with 4 warps would spill its float32
# accumulator). 64-row programs of 4 warps (one warpgroup) are what vLLM's tuned table for its
# Triton blockwise FP8 GEMM at N = K = 1536 on an H100 picks at every M. A weight gradient's
# program loops over its expert's few token tiles (~3 at V2-Lite's 4,096 tokens) and then stores
# a float32 block: two stages and less shared memory leave room for more programs an SM to hide
# those stores. Timing more shapes costs the first step, never a later one. Triton's CPU
# interpreter gets the first.
def _configs(*shapes: tuple[dict, int, int]) -> list[triton.Config]:
    return [triton.Config(blocks, num_warps=warps, num_stages=stages) for blocks, warps, stages in shapes]


_grouped_tuned = triton.autotune(_configs(({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
                                          ({"BLOCK_M": 128, "BLOCK_N": 128}, 4, 4),
                                          ({"BLOCK_M": 128, "BLOCK_N": 256}, 8, 3),
                                          ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 3),
                                          ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 4),
                                          ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3)),
                                 key=["N", "K"])(grouped_mm_kernel)
_tokens_tuned = triton.autotune(_configs(({"BLOCK_N": 128, "BLOCK_K": 128}, 8, 3),
                                         ({"BLOCK_N": 128, "BLOCK_K": 128}, 4, 4),
                                         ({"BLOCK_N": 128, "BLOCK_K": 256}, 8, 3),
                                         ({"BLOCK_N": 256, "BLOCK_K": 128}, 8, 3),
                                         ({"BLOCK_N": 128, "BLOCK_K": 128}, 4, 2),
                                         ({"BLOCK_N": 64, "BLOCK_K": 128}, 4, 2),
                                         # the two tile shapes that keep their accumulators without
                                         # spilling (benchmarks/kernel_resources.py), deeper pipelined
                                         ({"BLOCK_N": 64, "BLOCK_K": 128}, 4, 3),
                                         ({"BLOCK_N": 128, "BLOCK_K": 64}, 4, 3)),
                                key=["N", "K"])(grouped_mm_tokens_kernel)
# The token quantizer's channels a program (x's [128, BLOCK_C] tile, transposed through shared
# memory): at 64 channels on 8 warps it holds 3 programs an SM (79 registers; sm_90 compile,
# benchmarks/kernel_resources.py) and ran at ~40% of the copy bandwidth on an H100; 32 channels on
# 4 warps hold 7 (68 registers). It writes all of its outputs, so any shape may be timed.
_quantize_tuned = triton.autotune(_configs(({"BLOCK_C": 64}, 8, 1), ({"BLOCK_C": 32}, 4, 1),
                                           ({"BLOCK_C": 32}, 2, 1), ({"BLOCK_C": 64}, 4, 1),
                                           ({"BLOCK_C": 128}, 8, 1)),
                                  key=["C"])(quantize_tokens_kernel)
# the same shapes for the launch that adds into a gradient: timed apart from the overwriting one,
# c restored after every timing run, which would otherwise add once more each
_tokens_into_tuned = triton.autotune(_tokens_tuned.configs, key=["N", "K"], restore_value=["c_ptr"])(
    grouped_mm_tokens_kernel)


def _launch(tuned, grid, *args, **constexprs) -> None:
    """The autotuned kernel on a GPU; its first configuration in Triton's CPU interpreter."""
    if args[0].is_cuda:
        tuned[grid](*args, **constexprs)
        return
    config = tuned.configs[0]
    tuned.fn[grid(config.kwargs)](*args, **config.kwargs, **constexprs, num_warps=config.num_warps,
                                  num_stages=config.num_stages)


def grouped_grid(M: int, N: int, E: int):
    """grouped_mm_kernel's grid for a launch configuration: (column blocks, row programs), the
    row tiles bounded by ⌈M/128⌉ + E - 1."""
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), (triton.cdiv(M, TILE) + E - 1) * (TILE // meta["BLOCK_M"]))


def tokens_grid(N: int, K: int, n_groups: int):
    """grouped_mm_tokens_kernel's grid for a launch configuration: (blocks of [N, K], groups)."""
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), n_groups)


@torch.library.custom_op("nanoseek::fp8_grouped_mm", mutates_args=())
def grouped_mm_fp8(a_MK: torch.Tensor, scale_a: torch.Tensor, b_ENK: torch.Tensor, scale_b: torch.Tensor,
                   offsets_E: torch.Tensor, first_E1: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N]: a's rows of group e times b[e]^T. a [M, K] E4M3 with scale_a [M, ⌈K/128⌉];
    b [E, N, K] E4M3 with scale_b [E, ⌈N/128⌉, ⌈K/128⌉]; all contiguous. first_E1 =
    quant.first_tiles(offsets_E), computed by the caller: inside a compiled graph it is fused and
    shared, where here it would be ~6 eager launches a call."""
    M, K = a_MK.shape
    E, N, _ = b_ENK.shape
    c = torch.empty(M, N, dtype=out_dtype, device=a_MK.device)
    _launch(_grouped_tuned, grouped_grid(M, N, E),
            a_MK, scale_a, b_ENK, scale_b, c, offsets_E, first_E1, N, K, E, triton.next_power_of_2(E),
            TILE)
    return c


@grouped_mm_fp8.register_fake
def _(a_MK, scale_a, b_ENK, scale_b, offsets_E, first_E1, out_dtype):
    return a_MK.new_empty(a_MK.shape[0], b_ENK.shape[1], dtype=out_dtype)


@torch.library.custom_op("nanoseek::fp8_weight_grouped_mm", mutates_args=())
def grouped_mm_fp8_weight(a_MK: torch.Tensor, b_ENK: torch.Tensor, scale_b: torch.Tensor, offsets_E: torch.Tensor,
                          first_E1: torch.Tensor) -> torch.Tensor:
    """grouped_mm_fp8 with a not quantized: [M, N] in a's dtype, a's rows of group e times
    (b[e] · its block scales)^T, b's E4M3 values widened to a's dtype in the kernel (weight-only
    FP8: an FP8 checkpoint's experts read in place at inference). a [M, K] contiguous."""
    M, K = a_MK.shape
    E, N, _ = b_ENK.shape
    c = torch.empty(M, N, dtype=a_MK.dtype, device=a_MK.device)
    _launch(_grouped_tuned, grouped_grid(M, N, E),
            a_MK, scale_b, b_ENK, scale_b, c, offsets_E, first_E1, N, K, E, triton.next_power_of_2(E), TILE,
            A_SCALED=False)
    return c


@grouped_mm_fp8_weight.register_fake
def _(a_MK, b_ENK, scale_b, offsets_E, first_E1):
    return a_MK.new_empty(a_MK.shape[0], b_ENK.shape[1])


@torch.library.custom_op("nanoseek::fp8_grouped_mm_tokens", mutates_args=())
def grouped_mm_tokens_fp8(a_NP: torch.Tensor, scale_a: torch.Tensor, b_KP: torch.Tensor, scale_b: torch.Tensor,
                          first_E1: torch.Tensor, n_groups: int, out_dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K]: per group, a [N, P] · b [K, P]^T over its tokens. a, b E4M3 in the padded
    group-aligned layout with scales [N, T] and [K, T] (quant.quantize_tokens); all contiguous.
    first_E1: quant.first_tiles of the group ends."""
    N, P = a_NP.shape
    K, T = b_KP.shape[0], scale_a.shape[1]
    c = torch.empty(n_groups, N, K, dtype=out_dtype, device=a_NP.device)
    _launch(_tokens_tuned, tokens_grid(N, K, n_groups), a_NP, scale_a, b_KP, scale_b, c, first_E1, N, K, P, T, TILE)
    return c


@grouped_mm_tokens_fp8.register_fake
def _(a_NP, scale_a, b_KP, scale_b, first_E1, n_groups, out_dtype):
    return a_NP.new_empty(n_groups, a_NP.shape[0], b_KP.shape[0], dtype=out_dtype)


# no fake registration: an op that mutates and returns nothing gets torch's trivial one
@torch.library.custom_op("nanoseek::fp8_grouped_mm_tokens_into", mutates_args=("c_ENK",))
def grouped_mm_tokens_into_fp8(a_NP: torch.Tensor, scale_a: torch.Tensor, b_KP: torch.Tensor, scale_b: torch.Tensor,
                               first_E1: torch.Tensor, c_ENK: torch.Tensor) -> None:
    """c [E, N, K] += grouped_mm_tokens_fp8's product, in the kernel's store (c float32,
    contiguous: a weight's gradient, which then needs no separate read-add-write pass)."""
    N, P = a_NP.shape
    K, T = b_KP.shape[0], scale_a.shape[1]
    _launch(_tokens_into_tuned, tokens_grid(N, K, c_ENK.shape[0]),
            a_NP, scale_a, b_KP, scale_b, c_ENK, first_E1, N, K, P, T, TILE, ACCUMULATE=True)


@torch.library.custom_op("nanoseek::fp8_quantize_tokens", mutates_args=())
def quantize_tokens_fp8(x_MC: torch.Tensor, offsets_E: torch.Tensor,
                        first_E1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_tokens(x_MC, offsets_E)'s data [C, 128·T] and scale [C, T] (T =
    n_tiles), in one pass over x (contiguous, tokens sorted by group); first_E1:
    quant.first_tiles(offsets_E)."""
    from .quant import FP8_DTYPE, FP8_MAX, n_tiles
    M, C = x_MC.shape
    E, T = offsets_E.shape[0], n_tiles(offsets_E, M)
    # Triton's CPU interpreter rounds to E4M3 by truncating with a half-up bump and no carry
    # (127.9 becomes 64): there the kernel stores its float32 quotients and torch rounds them
    q = torch.empty(C, T * TILE, dtype=FP8_DTYPE if x_MC.is_cuda else torch.float32, device=x_MC.device)
    s = torch.empty(C, T, dtype=torch.float32, device=x_MC.device)
    _launch(_quantize_tuned, lambda meta: (T, triton.cdiv(C, meta["BLOCK_C"])),
            x_MC, q, s, offsets_E, first_E1, M, C, T, E, FP8_MAX, triton.next_power_of_2(E), TILE)
    return q.to(FP8_DTYPE), s


@quantize_tokens_fp8.register_fake
def _(x_MC, offsets_E, first_E1):
    from .quant import FP8_DTYPE, n_tiles
    M, C = x_MC.shape
    T = n_tiles(offsets_E, M)
    return x_MC.new_empty(C, T * TILE, dtype=FP8_DTYPE), x_MC.new_empty(C, T, dtype=torch.float32)
