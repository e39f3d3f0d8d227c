"""A weight-only FP8 linear layer for a few rows (decode): y = x · (w_fp8 ⊙ scale)^T, the
weight read as stored, one byte an element, never written out dequantised.

Legend: M rows of x, K input features, N output features; the weight [N, K] is
float8_e4m3fn with one float32 scale per (BR x BC) block, `scale_inv` [⌈N/BR⌉, ⌈K/BC⌉]
(the V3 checkpoints' layout, BR = BC = 128; hf.py).

A decode step's linear layers read each weight once for a handful of rows: their time is
the bytes of the weight, so reading one byte instead of BF16's two is the whole gain, and it
is only kept if the dequantisation happens in registers. Per program: BLOCK_N output rows
(inside one block row of scales) against all M rows of x, over K in steps of BC: the FP8 tile
converted to x's dtype (exact: every e4m3 value is a BF16 value), one tensor-core dot with
float32 accumulation, times the tile's one scale. The twin is infer/fp8_weights.py's
dequantise-then-matmul.

One row (a decode step of one request) takes a GEMV instead: a tensor-core dot
of 16 rows would be 15 rows of padding at one row, and a program per 64 outputs leaves most
SMs idle at V2-Lite's widths (9 programs for a 576-wide projection on 132 SMs). The GEMV's
programs hold a few output rows each (gemv_launch: about GEMV_PROGRAMS of them), load up to
GEMV_K columns of them at once, scale each column by its block's scale and multiply on the
CUDA cores. Past one row, where few programs would run, the tensor-core kernel splits K
(k_shares).

A SwiGLU's gate and up projections at one row (the shared experts, a dense layer's MLP) take
one GEMV that reads both weights and applies the SiLU product (`fp8_swiglu_gemv`). The routed
experts of a decode step of a few tokens (`fp8_experts_gemv`) take the same GEMV,
one program row per (token, expert) pair, the pair's expert read in place from the stacked
FP8 weights: gate and up in one launch with the SwiGLU applied, then down times the routing
weight. Left to Inductor, the dequantisation of the gathered experts fused into one-row
reductions that read the FP8 bytes at 0.5-0.75 TB/s on an H100, half the step's time at
V2-Lite's widths (benchmarks/results/h100_decode_shapes/fp8_8L).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64      # rows of x one program holds (tl.dot's M)
BLOCK_N = 64       # output rows per program (fewer when a scale block has fewer)


@triton.jit
def fp8_weight_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_x, stride_y, scale_cols,
                             split_blocks, stride_split,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SCALE_ROWS: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)  # this program's share of K: split_blocks blocks of BLOCK_K from split's
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    scale_row = (pid * BLOCK_N) // SCALE_ROWS
    y_ptr += split * stride_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * split_blocks * BLOCK_K, tl.minimum(K, (split + 1) * split_blocks * BLOCK_K), BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                    other=0.0)
        # (a scalar load in the loop, unpipelined; loading a share's scales before it did not
        # change the kernel's time on an H100: benchmarks/results/h100_decode_shapes/gemv_fold)
        scale = tl.load(s_ptr + scale_row * scale_cols + k0 // BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION) * scale
    tl.store(y_ptr + m[:, None] * stride_y + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))


# One row takes the GEMV: it beat the tensor-core kernel 1.6-6.2x on V2-Lite's and V3's projections
# (all but V3's q_b_proj, 0.88x) and BF16 cuBLAS 1.3-2.2x; a row loop in it lost at four rows to the
# tensor-core kernel on V3's q_b_proj, o_proj and shared down projection (H100,
# benchmarks/results/h100_decode_shapes/fp8_gemv)
GEMV_PROGRAMS = 256  # programs the GEMV aims for: about two an SM of an H100/H200 (132)
GEMV_K = 2048        # columns of the weight a GEMV program loads at once
GEMV_TILE = 16384    # weight elements it loads at once: 64 a thread at 8 warps, no spill on sm_90


@triton.jit
def _gemv_dot(w_ptr, s_ptr, w_off, s_off, k, mask, x, K, SCALE_COLS: tl.constexpr, SCALED: tl.constexpr):
    """Σ_k w[:, k] · scale(k) · x[k] over a [BLOCK_N, BLOCK_K] tile of the weight (its rows inside one
    row of scale blocks): the scales fold into x, a multiply a column instead of one an element
    (8 -> 7 machine instructions an FP8 element on sm_90; 2-4% faster on an H100)."""
    if SCALED:
        x = x * tl.load(s_ptr + s_off + k // SCALE_COLS, mask=k < K, other=0.0)
    w = tl.load(w_ptr + w_off + k[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def fp8_weight_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, scale_cols, x_share,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr,
                           idx_ptr=None, route_ptr=None, w2_ptr=None, s2_ptr=None,
                           GATHER: tl.constexpr = False, SWIGLU: tl.constexpr = False, ROUTE: tl.constexpr = False,
                           SCALED: tl.constexpr = True):
    """Program (block of BLOCK_N outputs, pair): y[pair] = x[pair // x_share] · w^T. GATHER: w is
    the stacked [E, N, K] weights (scales [E, ⌈N/SCALE_ROWS⌉, scale_cols]) and the pair's matrix
    is expert idx[pair]; SWIGLU: silu(x · w^T) · (x · w2^T), w2 with scales s2 beside w; ROUTE:
    times route[pair]; not SCALED: 16- or 32-bit weights, no scales."""
    pid = tl.program_id(0)
    pair = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    w_off = n[:, None].to(tl.int64) * K
    s_off = ((pid * BLOCK_N) // SCALE_ROWS) * scale_cols  # BLOCK_N divides the scale block's rows
    if GATHER:
        e = tl.load(idx_ptr + pair).to(tl.int64)
        w_off += e * N * K
        s_off += e * tl.cdiv(N, SCALE_ROWS) * scale_cols
    x_ptr += (pair // x_share) * K
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # a wide tile an iteration (all of K up to GEMV_K): every load is in flight before the first use
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        mask = (n[:, None] < N) & (k[None, :] < K)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc += _gemv_dot(w_ptr, s_ptr, w_off, s_off, k, mask, x, K, SCALE_COLS, SCALED)
        if SWIGLU:
            acc2 += _gemv_dot(w2_ptr, s2_ptr, w_off, s_off, k, mask, x, K, SCALE_COLS, SCALED)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc2
    if ROUTE:
        acc *= tl.load(route_ptr + pair)
    tl.store(y_ptr + pair * N + n, acc, mask=n < N)


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None, y: torch.Tensor, block: tuple[int, int],
         pairs: int = 1, x_share: int = 1, w2: torch.Tensor | None = None, s2: torch.Tensor | None = None,
         idx: torch.Tensor | None = None, route: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_weight_gemv_kernel into y at gemv_launch's launch: w [N, K] (or stacked [E, N, K], each
    of `pairs` rows taking expert idx[pair]), FP8 with its block scales or 16-bit (scales None);
    w2: the SwiGLU's up weight beside w; route: each pair's routing weight. Returns y."""
    N, K = w.shape[-2:]
    t = gemv_launch(N, K, block, pairs, 2 if w2 is not None else 1)
    scaled = dict(SCALE_ROWS=block[0], SCALE_COLS=block[1]) if scales is not None else \
        dict(SCALE_ROWS=t["BLOCK_N"], SCALE_COLS=t["BLOCK_K"], SCALED=False)
    fp8_weight_gemv_kernel[(triton.cdiv(N, t["BLOCK_N"]), pairs)](
        x, w, scales, y, N, K, scales.shape[-1] if scales is not None else 1, x_share,
        idx_ptr=idx, route_ptr=route, w2_ptr=w2, s2_ptr=s2, GATHER=idx is not None, SWIGLU=w2 is not None,
        ROUTE=route is not None, **scaled, **t)
    return y


def gemv_launch(N: int, K: int, block: tuple[int, int], pairs: int = 1, weights: int = 1) -> dict:
    """The GEMV's launch for an N x K weight over `pairs` rows (each its own matrix, or one), of
    `weights` matrices read together: output rows a program holds (a power of two from 4, within
    a scale block's rows, for about GEMV_PROGRAMS programs in all and at most GEMV_TILE elements a
    load), columns a load, and warps (16 or more weight bytes a thread)."""
    block_k = min(GEMV_K, triton.next_power_of_2(K))
    by_programs = max(4, triton.next_power_of_2(N * pairs // GEMV_PROGRAMS + 1) // 2)
    block_n = min(block[0], by_programs, max(1, GEMV_TILE // weights // block_k))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=min(8, max(1, weights * block_n * block_k // 512)))


# The tensor-core kernel's time grew with K's blocks, about 0.6-0.8 µs a 128-column block, where
# fewer programs than two an SM ran (one a 64-output block; H100,
# benchmarks/results/h100_decode_shapes/fp8_gemv): such a weight is split over K until about
# SPLIT_PROGRAMS programs run, each over SPLIT_BLOCKS blocks or more
SPLIT_PROGRAMS = 264  # two an SM of an H100 (132)
SPLIT_BLOCKS = 4


def k_shares(N: int, K: int, block: tuple[int, int]) -> tuple[int, int]:
    """(shares, K blocks a share) the tensor-core kernel cuts an N x K weight's K into: (1, all)
    where enough programs run without."""
    columns, k_blocks = triton.cdiv(N, min(BLOCK_N, block[0])), triton.cdiv(K, block[1])
    per_share = triton.cdiv(k_blocks, max(1, min(SPLIT_PROGRAMS // columns, k_blocks // SPLIT_BLOCKS)))
    return triton.cdiv(k_blocks, per_share), per_share


def takes_gemv(M: int, N: int, K: int, block: tuple[int, int]) -> bool:
    """Whether M rows of an N x K weight take the GEMV: one row, unless the tensor-core kernel runs
    SPLIT_PROGRAMS programs or more unsplit over a K of one GEMV load (V3's q_b_proj, 384 programs
    over 1,536 columns: there it led the GEMV, 19 against 22 µs on an H100,
    benchmarks/results/h100_decode_shapes/fp8_gemv_auto; a longer K is unmeasured, and walking it
    is where the tensor-core kernel was slow)."""
    return M == 1 and (triton.cdiv(N, min(BLOCK_N, block[0])) < SPLIT_PROGRAMS or K > GEMV_K)


def unsupported(rows: int, weight: torch.Tensor, block: tuple[int, int]) -> str | None:
    """Why the kernel cannot take this call, or None."""
    if not 0 < rows <= MAX_ROWS:
        return f"{rows} rows (it takes 1..{MAX_ROWS})"
    if any(b < 16 or b & (b - 1) for b in block):
        return f"scale blocks of {block[0]}x{block[1]} (powers of two from 16)"
    if not weight.is_contiguous():
        return "a weight that is not contiguous"
    return None


@torch.library.custom_op("nanoseek::fp8_weight_linear", mutates_args=())
def fp8_weight_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, scale_inv: torch.Tensor,
                      block: list[int]) -> torch.Tensor:
    """y [M, N] in x's dtype = x · (w ⊙ scale_inv spread over its blocks)^T; M <= MAX_ROWS."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    reason = unsupported(M, w_NK, tuple(block))
    if reason is not None:
        raise ValueError(f"fp8_weight_linear cannot take {reason}")
    x_MK = x_MK.contiguous()
    if takes_gemv(M, N, K, tuple(block)):
        return gemv(x_MK, w_NK, scale_inv, torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device), tuple(block))
    precision = "ieee" if x_MK.dtype == torch.float32 else "tf32"  # float32 (the tests) exactly
    block_n = min(BLOCK_N, block[0])  # inside one row of scale blocks
    shares, per_share = k_shares(N, K, tuple(block))
    # each share's sums in float32 apart, added after (not atomically: the same sums in the same
    # order every step, so greedy decoding stays reproducible)
    out = torch.empty(shares, M, N, dtype=torch.float32 if shares > 1 else x_MK.dtype, device=x_MK.device)
    fp8_weight_linear_kernel[(triton.cdiv(N, block_n), shares)](
        x_MK, w_NK, scale_inv, out, M, N, K, x_MK.stride(0), N, scale_inv.shape[1], per_share, M * N,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block[1], SCALE_ROWS=block[0],
        PRECISION=precision, num_warps=4)
    return out[0] if shares == 1 else out.sum(0).to(x_MK.dtype)


@fp8_weight_linear.register_fake
def _(x_MK, w_NK, scale_inv, block):
    return x_MK.new_empty(x_MK.shape[0], w_NK.shape[0])


@triton.jit
def fp8_dequantize_kernel(w_ptr, s_ptr, out_ptr, R, C, scale_rows, scale_cols,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr):
    """Program (row block, column block, matrix): out = w · its block's scale, the product in
    float32 rounded once to out's dtype, as the twin's float32 dequantisation then cast. The
    row block lies in one row of scale blocks (BLOCK_R divides SCALE_ROWS): a scale a column."""
    e = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < R)[:, None] & (c < C)[None, :]
    off = e * R * C + r[:, None].to(tl.int64) * C + c[None, :]
    w = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (e * scale_rows + (tl.program_id(0) * BLOCK_R) // SCALE_ROWS) * scale_cols
                + c // SCALE_COLS, mask=c < C, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (w * s[None, :]).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


DEQUANTIZE_BLOCK = (32, 256)  # a program's tile: 8K elements, 64 a thread at 4 warps


@torch.library.custom_op("nanoseek::fp8_dequantize", mutates_args=())
def fp8_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: list[int], dtype: torch.dtype) -> torch.Tensor:
    """w [..., R, C] FP8 (contiguous) with block scales [..., ⌈R/block[0]⌉, ⌈C/block[1]⌉] -> dtype,
    in one pass: one byte read and two written an element. The torch twin (fp8/quant.dequantize,
    then a cast) writes float32 temporaries and repeats every scale over its block: at V3's
    o_proj it took 1.5 ms an FP8 linear at prefill rows, where BF16's whole product took 0.16
    (benchmarks/results/h100_decode_shapes/gemv_fold). The product is float32 rounded once to
    nearest even, as the twin's cast rounds (Triton's interpreter truncates to BF16 instead)."""
    R, C = w.shape[-2:]
    E = w.numel() // max(1, R * C)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    br, bc = min(DEQUANTIZE_BLOCK[0], block[0]), DEQUANTIZE_BLOCK[1]  # (scale blocks: powers of two)
    fp8_dequantize_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc), E)](
        w.contiguous(), scale_inv.contiguous(), out, R, C, scale_inv.shape[-2], scale_inv.shape[-1],
        BLOCK_R=br, BLOCK_C=bc, SCALE_ROWS=block[0], SCALE_COLS=block[1], num_warps=4)
    return out


@fp8_dequantize.register_fake
def _(w, scale_inv, block, dtype):
    return torch.empty(w.shape, dtype=dtype, device=w.device)


@torch.library.custom_op("nanoseek::fp8_swiglu_gemv", mutates_args=())
def fp8_swiglu_gemv(x_1K: torch.Tensor, w_gate: torch.Tensor, s_gate: torch.Tensor, w_up: torch.Tensor,
                    s_up: torch.Tensor, block: list[int]) -> torch.Tensor:
    """h [1, N] in x's dtype = SiLU(x · gate^T) · (x · up^T), one row, the two FP8 weights [N, K]
    read together by the GEMV: one launch where two GEMVs and the product were three, x read once."""
    h = torch.empty(1, w_gate.shape[0], dtype=x_1K.dtype, device=x_1K.device)
    return gemv(x_1K.contiguous(), w_gate, s_gate, h, tuple(block), w2=w_up, s2=s_up)


@fp8_swiglu_gemv.register_fake
def _(x_1K, w_gate, s_gate, w_up, s_up, block):
    return x_1K.new_empty(1, w_gate.shape[0])


@torch.library.custom_op("nanoseek::fp8_experts_gemv", mutates_args=())
def fp8_experts_gemv(x_ND: torch.Tensor, idx_NK: torch.Tensor, route_NK: torch.Tensor,
                     w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                     s_gate: torch.Tensor, s_up: torch.Tensor, s_down: torch.Tensor, block: list[int]) -> torch.Tensor:
    """y [N, K, D] float32: each (token, slot)'s expert output times its routing weight, the FP8
    experts (stacked, with their block scales as infer/fp8_weights.FP8Experts holds them) read in
    place by the GEMV, one pair of (token, expert) a row: SiLU(x W_gate^T) · (x W_up^T) in one
    launch, into x's dtype as the twin rounds it, then W_down^T times the route weight in another.
    A decode step of a few pairs (moe.Experts' "gather" path); the caller sums over K."""
    N, D = x_ND.shape
    K = idx_NK.shape[1]
    idx, route = idx_NK.contiguous().view(-1), route_NK.float().contiguous().view(-1)
    h = torch.empty(N * K, w_gate_EFD.shape[1], dtype=x_ND.dtype, device=x_ND.device)
    gemv(x_ND.contiguous(), w_gate_EFD, s_gate, h, tuple(block), N * K, K, w2=w_up_EFD, s2=s_up, idx=idx)
    y = torch.empty(N, K, D, dtype=torch.float32, device=x_ND.device)
    return gemv(h, w_down_EDF, s_down, y, tuple(block), N * K, idx=idx, route=route)


@fp8_experts_gemv.register_fake
def _(x_ND, idx_NK, route_NK, w_gate_EFD, w_up_EFD, w_down_EDF, s_gate, s_up, s_down, block):
    return x_ND.new_empty(x_ND.shape[0], idx_NK.shape[1], x_ND.shape[1], dtype=torch.float32)


@torch.library.custom_op("nanoseek::experts_down_gemv", mutates_args=())
def experts_down_gemv(h_MF: torch.Tensor, idx_NK: torch.Tensor, route_NK: torch.Tensor,
                      w_down_EDF: torch.Tensor) -> torch.Tensor:
    """y [N, K, D] float32: each (token, slot)'s SwiGLU output h (pairs in (token, slot) order)
    times its expert's 16-bit down projection, read in place by the GEMV, times its route weight:
    a decode step's routed down projection (moe.Experts' "gather_gemv" path)."""
    N, K = idx_NK.shape
    y = torch.empty(N, K, w_down_EDF.shape[1], dtype=torch.float32, device=h_MF.device)
    return gemv(h_MF.contiguous(), w_down_EDF, None, y, tuple(w_down_EDF.shape[1:]), N * K,
                idx=idx_NK.contiguous().view(-1), route=route_NK.float().contiguous().view(-1))


@experts_down_gemv.register_fake
def _(h_MF, idx_NK, route_NK, w_down_EDF):
    return h_MF.new_empty(idx_NK.shape[0], idx_NK.shape[1], w_down_EDF.shape[1], dtype=torch.float32)
