"""Triton kernels of the fused decode step: one decoder layer of one token per row in nine
kernels, seven for a dense layer (infer/fused.py wires them; its twin is the model's
absorbed-MLA decode forward).

Legend: B rows (one new token each), D hidden_size, Q q_lora_rank, C kv_lora_rank, R
qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, H heads, S cache positions, E routed
experts, K experts per token, F an expert's width, P = K routed + S shared slots.

A decode step of a small batch reads every weight once and does little else: its speed is
how many kernels it takes and how much of each one's time is waiting. Written as PyTorch
ops, a layer is dozens of kernels even after Inductor's fusion (norms, projections, RoPE,
cache write, absorption, attention, router, top-k, experts, combine; benchmarks/results/
decode_profile.txt); here it is nine:

1. `gemv`            RMSNorm(h) @ [W_q_a; W_kv_a]^T              -> qkv_a [B, Q + C + R]
2. `mla_query`       per head: q_a norm, q_b, RoPE, W_UK absorbed
                     -> q_lat, q_pe; one more program: kv norm, k_pe RoPE, the cache write
3. `mla_attend`      attention over the latent cache, split over S (flash-decoding)
4. `mla_output`      merge the splits, W_UV                       -> o [B, H·V]
5. `gemv`            h += o @ W_o^T
6. `gemv`            RMSNorm(h) @ W_router^T                      -> router logits [B, E]
7. `moe_route`       group-limited top-K of the affinities         -> K experts, K gates
8. `moe_up`          per (row, slot, block of F): SiLU(x W_gate^T) · (x W_up^T); the
                     shared experts are slots after the routed ones (a dense layer's MLP:
                     the one slot, no router)
9. `moe_down`        h += Σ_p g_p · hmid_p W_down_p^T (routed slots), + hmid_s W_down_s^T
                     (the shared ones, no gate)

Everything is computed in float32 from whatever the tensors hold (BF16 weights and cache,
or float32 in the CPU tests) and rounded on store, except the attention's dot products,
whose operands (q_lat, q_pe, the softmax weights) are rounded to the cache's dtype first.
FP8 weights (an FP8 checkpoint's, float8 with one float32 scale per SB_R x SB_C block; the
kernels' FP8 flag) are widened in registers; a program's rows of a weight lie in one row of
blocks, so each block's scale multiplies the block's partial sums, once a block rather than
once a weight. `moe_up_dot` (the launch's up_dot) multiplies on the tensor cores instead of
summing products in registers, its activation rounded to float16 first: a widened FP8 weight
costs the CUDA cores an instruction or two where a product-sum costs four.
Norms are recomputed by each program that needs them: a reduction over one row is cheaper
than another kernel.

Programmatic dependent launch (PDL, Hopper+). Each kernel first lets the next one launch
(`_launch_next`), then loads what no earlier kernel of the step writes (its weights), and
only then waits for the previous kernel (`_wait_prev`) before reading activations (but
mla_query, which reads its weights in chunks that would not fit in registers at once, waits
first). So a kernel's launch and its weight reads overlap the kernel before it, and the chain of
dependent kernels costs little more than its activations' round trips. Nothing a kernel
writes is read by another before that one's wait; the expert weights of the routed slots
depend on the routing and are read after it. USE_PDL is off in Triton's interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _launch_next(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_prev(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _rms_norm(x, g, n, eps):
    """RMSNorm of a row held whole in registers (float32; padding zeros), times the weight g."""
    return x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps) * g


@triton.jit
def _rope_store(ptr, even, odd, cos, sin, mask):
    """Pairs (even, odd) turned by the angles of (cos, sin), stored interleaved at ptr."""
    tl.store(ptr, even * cos - odd * sin, mask=mask)
    tl.store(ptr + 1, odd * cos + even * sin, mask=mask)


@triton.jit
def _inv_rms(x_ptr, n, eps, BLOCK: tl.constexpr):
    """1 / RMS of x[0:n] (a scalar)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        acc += x * x
    return tl.rsqrt(tl.sum(acc, axis=0) / n + eps)


@triton.jit
def _scaled_batch_rows(w, x, s, B: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, SBC: tl.constexpr):
    """[B, ROWS]: Σ_c x[b, c] · w[r, c] · s[c // SBC] for float8 w [ROWS, COLS], x [B, COLS]:
    each block of SBC columns summed, then scaled (a multiply a block, not one a column)."""
    w4 = tl.reshape(w.to(tl.float32), [1, ROWS, COLS // SBC, SBC])
    x4 = tl.reshape(x, [B, 1, COLS // SBC, SBC])
    return tl.sum(tl.sum(x4 * w4, axis=3) * s[None, None, :], axis=2)


@triton.jit
def gemv_kernel(x_ptr, stride_x, B, K, norm_ptr, eps,
                w1_ptr, n1, w2_ptr, n2, res_ptr, stride_res, out_ptr, stride_out,
                HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
                USE_PDL: tl.constexpr, s1_ptr=None, s2_ptr=None, FP8: tl.constexpr = False,
                SB_R: tl.constexpr = 128, SB_C: tl.constexpr = 128):
    """out[b, :n1] = x_b @ w1^T, out[b, n1:n1+n2] = x_b @ w2^T (two weights, one launch),
    x_b = RMSNorm(x[b]) · norm if HAS_NORM, plus res[b] if HAS_RES (res may be out: each
    program reads and writes only its own columns). All B rows per program:
    each weight block is read once. ONE_CHUNK (BLOCK_K >= K): one load of the weight block, issued
    first, so its latency overlaps the row's and the norm's (a loop over K would wait for
    memory once per chunk); else chunks of BLOCK_K (a wide hidden size). FP8: both weights
    float8 with block scales s1, s2 (module docstring)."""
    _launch_next(USE_PDL)
    pid = tl.program_id(0)
    nb1 = tl.cdiv(n1, BLOCK_O)
    second = (pid >= nb1).to(tl.int32)
    w_ptr = w1_ptr
    if pid >= nb1:
        w_ptr = w2_ptr
    o0 = (pid - second * nb1) * BLOCK_O
    o = o0 + tl.arange(0, BLOCK_O)
    if FP8:
        s_ptr = s1_ptr
        if pid >= nb1:
            s_ptr = s2_ptr
        s_ptr += (o0 // SB_R) * tl.cdiv(K, SB_C)  # the row of scale blocks holding the program's rows
    omask = o < n1 + second * (n2 - n1)
    rows = tl.arange(0, BLOCK_B)
    bmask = rows < B
    if ONE_CHUNK:
        k = tl.arange(0, BLOCK_K)
        kmask = k < K
        w = tl.load(w_ptr + o[:, None] * K + k[None, :], mask=omask[:, None] & kmask[None, :], other=0.0)
        if HAS_NORM:
            g = tl.load(norm_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        if FP8:
            SBC: tl.constexpr = min(SB_C, BLOCK_K)
            cb = tl.arange(0, BLOCK_K // SBC)
            s = tl.load(s_ptr + cb, mask=cb * SBC < K, other=0.0)
        _wait_prev(USE_PDL)
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                    mask=bmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if HAS_NORM:
            inv = tl.rsqrt(tl.sum(x * x, axis=1) / K + eps)
            x = x * inv[:, None] * g[None, :]
        if FP8:
            acc = _scaled_batch_rows(w, x, s, BLOCK_B, BLOCK_O, BLOCK_K, SBC)
        else:
            acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        _wait_prev(USE_PDL)
        if HAS_NORM:
            sq = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                            mask=bmask[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
                sq += x * x
            inv = tl.rsqrt(tl.sum(sq, axis=1) / K + eps)
        acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            w = tl.load(w_ptr + o[:, None] * K + k[None, :], mask=omask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                        mask=bmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            if HAS_NORM:
                g = tl.load(norm_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                x = x * inv[:, None] * g[None, :]
            if FP8:
                SBC_L: tl.constexpr = min(SB_C, BLOCK_K)
                cb = k0 // SB_C + tl.arange(0, BLOCK_K // SBC_L)
                s = tl.load(s_ptr + cb, mask=cb * SB_C < K, other=0.0)
                acc += _scaled_batch_rows(w, x, s, BLOCK_B, BLOCK_O, BLOCK_K, SBC_L)
            else:
                acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    col = o + second * n1
    mask = bmask[:, None] & omask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rows[:, None] * stride_res + col[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + col[None, :], acc, mask=mask)


@triton.jit
def mla_query_kernel(qkv_ptr, stride_qkv, qnorm_ptr, kvnorm_ptr, eps_q, eps_kv,
                     wqb_ptr, wkvb_ptr, inv_freq_ptr, rope_factor, pos_ptr,
                     qlat_ptr, qpe_ptr, ckv_ptr, kpe_ptr, stride_ckv, stride_kpe,
                     H, Q, C, N, R, V,
                     CHUNK_Q: tl.constexpr, CHUNK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_R2: tl.constexpr, Q_LORA: tl.constexpr, USE_PDL: tl.constexpr, SHARE_C: tl.constexpr,
                     sqb_ptr=None, FP8: tl.constexpr = False, SB_R: tl.constexpr = 128, SB_C: tl.constexpr = 128):
    """Program (b, h < H): head h's q_nope, q_pe = q_b(RMSNorm(q_a)), q_pe rotated, and the
    absorbed query q_lat[b, h] = W_UK_h^T q_nope. Program (b, H): c_kv = RMSNorm(kv_a[:C]),
    k_pe = RoPE(kv_a[C:]), both written into the cache at the row's position. RoPE pairs are
    interleaved (x0, x1), ..., pair i turned by the angle position · inv_freq[i], cos and sin
    scaled by rope_factor (rope.RotaryEmbedding). The row holds q_a (Q wide) then kv_a; without
    Q_LORA (V2-Lite) it holds the query itself, H·(N + R) = Q wide, and q_b and its norm are
    not read. q_b is read CHUNK_Q columns and W_UK CHUNK_C columns at a time: a head's whole
    [N, Q] and [N, C] at V3's widths spilled 13 KB a thread (benchmarks/kernel_resources.py).
    Program axis 2: the share of q_lat's columns [s·SHARE_C, (s+1)·SHARE_C) a program writes
    (one share: SHARE_C >= C), so that a model of few heads runs more than H + 1 programs (each
    share computes q_nope again: free without a query LoRA, where it is loaded); only share 0
    writes q_pe and the cache. FP8: q_b float8 with block scales sqb (CHUNK_Q dividing SB_C: a
    chunk's columns share one block, a row's scale multiplies its chunk's sum); W_UK is 16-bit."""
    _launch_next(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    share = tl.program_id(2)
    c_first = share * SHARE_C
    c_end = tl.minimum(C, c_first + SHARE_C)
    R2 = R // 2
    r2 = tl.arange(0, BLOCK_R2)
    r2mask = r2 < R2
    row_ptr = qkv_ptr + b * stride_qkv
    # positions are written between steps, not by a kernel of this step
    angle = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + r2, mask=r2mask, other=0.0)
    cos = tl.cos(angle) * rope_factor
    sin = tl.sin(angle) * rope_factor
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    if h < H:
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        row0 = h * (N + R)
        _wait_prev(USE_PDL)
        if Q_LORA:
            inv = _inv_rms(row_ptr, Q, eps_q, CHUNK_Q)
            pe_rows = row0 + N + 2 * r2
            q_nope = tl.zeros([BLOCK_N], dtype=tl.float32)
            pe_e = tl.zeros([BLOCK_R2], dtype=tl.float32)
            pe_o = tl.zeros([BLOCK_R2], dtype=tl.float32)
            for j0 in range(0, Q, CHUNK_Q):
                j = j0 + tl.arange(0, CHUNK_Q)
                jmask = j < Q
                pmask = r2mask[:, None] & jmask[None, :]
                x = (tl.load(row_ptr + j, mask=jmask, other=0.0).to(tl.float32) * inv
                     * tl.load(qnorm_ptr + j, mask=jmask, other=0.0).to(tl.float32))
                w_n = tl.load(wqb_ptr + (row0 + n)[:, None] * Q + j[None, :], mask=nmask[:, None] & jmask[None, :],
                              other=0.0)
                w_e = tl.load(wqb_ptr + pe_rows[:, None] * Q + j[None, :], mask=pmask, other=0.0)
                w_o = tl.load(wqb_ptr + (pe_rows + 1)[:, None] * Q + j[None, :], mask=pmask, other=0.0)
                dn = tl.sum(w_n.to(tl.float32) * x[None, :], axis=1)
                de = tl.sum(w_e.to(tl.float32) * x[None, :], axis=1)
                do = tl.sum(w_o.to(tl.float32) * x[None, :], axis=1)
                if FP8:  # (a pair's two rows share a block: blocks start at even rows)
                    s_row = sqb_ptr + j0 // SB_C
                    s_cols = tl.cdiv(Q, SB_C)
                    dn *= tl.load(s_row + ((row0 + n) // SB_R) * s_cols, mask=nmask, other=0.0)
                    s_pe = tl.load(s_row + (pe_rows // SB_R) * s_cols, mask=r2mask, other=0.0)
                    de *= s_pe
                    do *= s_pe
                q_nope += dn
                pe_e += de
                pe_o += do
        else:
            q_nope = tl.load(row_ptr + row0 + n, mask=nmask, other=0.0).to(tl.float32)
            pe_e = tl.load(row_ptr + row0 + N + 2 * r2, mask=r2mask, other=0.0).to(tl.float32)
            pe_o = tl.load(row_ptr + row0 + N + 2 * r2 + 1, mask=r2mask, other=0.0).to(tl.float32)
        if share == 0:
            _rope_store(qpe_ptr + (b * H + h) * R + 2 * r2, pe_e, pe_o, cos, sin, r2mask)
        for c0 in range(c_first, c_end, CHUNK_C):
            cc = c0 + tl.arange(0, CHUNK_C)
            ccmask = cc < c_end
            w_uk = tl.load(wkvb_ptr + (h * (N + V) + n)[:, None] * C + cc[None, :],
                           mask=nmask[:, None] & ccmask[None, :], other=0.0)
            tl.store(qlat_ptr + (b * H + h) * C + cc, tl.sum(w_uk.to(tl.float32) * q_nope[:, None], axis=0),
                     mask=ccmask)
    elif share == 0:
        # (names of its own: Triton merges same-named values of the two branches)
        kv_ptr = row_ptr + Q
        pos = tl.load(pos_ptr + b)
        g_kv = tl.load(kvnorm_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        _wait_prev(USE_PDL)
        kv = tl.load(kv_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        k_e = tl.load(kv_ptr + C + 2 * r2, mask=r2mask, other=0.0).to(tl.float32)
        k_o = tl.load(kv_ptr + C + 2 * r2 + 1, mask=r2mask, other=0.0).to(tl.float32)
        tl.store(ckv_ptr + b * stride_ckv + pos * C + c, _rms_norm(kv, g_kv, C, eps_kv), mask=cmask)
        _rope_store(kpe_ptr + b * stride_kpe + pos * R + 2 * r2, k_e, k_o, cos, sin, r2mask)


@triton.jit
def _row_units(pos_ptr, B, UNITS, SPLIT, IDLE, BLOCK_B: tl.constexpr):
    """How a step's attention is cut into units of work: every row's positions in chunks of
    one length for the whole step, about (their sum) / UNITS rounded up to a multiple of SPLIT
    (so a short step takes fewer units, not shorter ones). A long row among short ones gets
    most of the units, as in FlashMLA's tile scheduling. A row at position IDLE (a CUDA-graph
    bucket's padding row, its output unused; -1: none) attends to that position only, not to
    the whole cache. Returns the chunk length and, per row, its position, its first position,
    its unit count and the end of its units (rows' units are consecutive: at most UNITS + B of
    them). mla_attend and mla_output agree on it."""
    rows = tl.arange(0, BLOCK_B)
    pos = tl.load(pos_ptr + rows, mask=rows < B, other=0).to(tl.int32)  # positions are written between steps
    first = tl.where(pos == IDLE, pos, 0)
    lengths = tl.where(rows < B, pos + 1 - first, 0)
    chunk = tl.cdiv(tl.cdiv(tl.sum(lengths, axis=0), UNITS), SPLIT) * SPLIT
    counts = tl.cdiv(lengths, chunk)
    return chunk, pos, first, counts, tl.cumsum(counts, axis=0)


@triton.jit
def _through_memory(x, ptr):
    """The int32 x, stored as float32 bits at ptr (a float32 slot of the program's own, written
    again later) and read back. For loop bounds that reductions computed: bounded by them
    directly, mla_attend_tma_kernel's loop compiled for sm_90 (64 heads, blocks of 64, 8 warps)
    with 176 bytes of spill and 1,148 instructions a trip; bounded by them read back, as by any
    loaded values, with none and 781 (benchmarks/results/kernel_resources/tma_attention)."""
    tl.store(ptr, x.to(tl.float32, bitcast=True))
    return tl.load(ptr, volatile=True).to(tl.int32, bitcast=True)


@triton.jit
def _unit_span(pos_ptr, unit, B, UNITS, SPLIT, IDLE, BLOCK_B: tl.constexpr):
    """The row of `unit` (of _row_units' cut; B for a unit past the last row's) and the
    positions [start, end) it attends to."""
    chunk, pos_B, first_B, counts, ends = _row_units(pos_ptr, B, UNITS, SPLIT, IDLE, BLOCK_B)
    rows = tl.arange(0, BLOCK_B)
    b32 = tl.sum((ends <= unit).to(tl.int32), axis=0)  # the row whose units hold this one
    row = rows == b32
    pos = tl.sum(tl.where(row, pos_B, 0), axis=0)
    nth = unit - tl.sum(tl.where(row, ends - counts, 0), axis=0)  # its place among the row's units
    start = tl.sum(tl.where(row, first_B, 0), axis=0) + nth * chunk
    return b32, start, tl.minimum(start + chunk, pos + 1)


@triton.jit
def _attend_program(pos_ptr, B, UNITS, SPLIT, IDLE, HEAD_BLOCKS, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """The attention kernels' program (unit · HEAD_BLOCKS + head block): its unit, the unit's
    row and positions [start, end) (_unit_span) and its first head, once the previous kernel
    (which may just have written the new cache row) is waited for."""
    _launch_next(USE_PDL)
    unit = tl.program_id(0) // HEAD_BLOCKS
    b32, start, end = _unit_span(pos_ptr, unit, B, UNITS, SPLIT, IDLE, BLOCK_B)
    _wait_prev(USE_PDL)
    return unit, b32, start, end, (tl.program_id(0) % HEAD_BLOCKS) * BLOCK_H


@triton.jit
def mla_attend_kernel(qlat_ptr, qpe_ptr, ckv_ptr, kpe_ptr, stride_ckv, stride_kpe, pos_ptr,
                      acc_ptr, m_ptr, l_ptr, scale, H, C, R, B, SPLIT, UNITS, IDLE, HEAD_BLOCKS,
                      BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      USE_PDL: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Program (unit · HEAD_BLOCKS + head block), one grid axis (a second axis would cap the
    units at 65,535): BLOCK_H heads over one unit of _row_units, a chunk of one row's positions
    (its last one shorter). The head block varies fastest, so the programs that read the same
    latent positions run together and share them through L2. Per program:
    scores q_lat·c_kv + q_pe·k_pe, an online softmax over blocks of BLOCK_S positions, the
    unnormalised sum of p·c_kv with its running max and sum into partial sums indexed by the
    unit (merged by mla_output; a unit past the last row's writes nothing). Everything it
    reads but the positions, the previous kernel may just have written (the new cache row),
    so it waits first. TRANSPOSED: the same sums with the positions and the latent's channels
    as the dots' rows (scores [positions, heads], the running sum [C, heads]): Hopper's wgmma
    takes a dot of at least 64 rows, more than a program's heads (16-32), so untransposed
    those dots likely run on the older mma instructions."""
    unit, b32, start, end, h0 = _attend_program(pos_ptr, B, UNITS, SPLIT, IDLE, HEAD_BLOCKS, BLOCK_H, BLOCK_B, USE_PDL)
    b = b32.to(tl.int64)
    if b32 < B:
        hh = h0 + tl.arange(0, BLOCK_H)
        cc = tl.arange(0, BLOCK_C)
        rr = tl.arange(0, BLOCK_R)
        hmask, cmask, rmask = hh < H, cc < C, rr < R
        dtype = ckv_ptr.dtype.element_ty
        q = tl.load(qlat_ptr + (b * H + hh)[:, None] * C + cc[None, :],
                    mask=hmask[:, None] & cmask[None, :], other=0.0).to(dtype)
        qp = tl.load(qpe_ptr + (b * H + hh)[:, None] * R + rr[None, :],
                     mask=hmask[:, None] & rmask[None, :], other=0.0).to(dtype)
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_H], dtype=tl.float32)
        if TRANSPOSED:
            acc = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
            q_t, qp_t = tl.trans(q), tl.trans(qp)
        else:
            acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < end
            c = tl.load(ckv_ptr + b * stride_ckv + s[:, None] * C + cc[None, :],
                        mask=smask[:, None] & cmask[None, :], other=0.0)
            kp = tl.load(kpe_ptr + b * stride_kpe + s[:, None] * R + rr[None, :],
                         mask=smask[:, None] & rmask[None, :], other=0.0)
            if TRANSPOSED:
                sc = (tl.dot(c, q_t, input_precision=DOT_PRECISION)
                      + tl.dot(kp, qp_t, input_precision=DOT_PRECISION)) * scale
                sc = tl.where(smask[:, None], sc, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, axis=0))
                alpha = tl.exp(m - m_new)
                p = tl.exp(sc - m_new[None, :])
                l = l * alpha + tl.sum(p, axis=0)
                acc = acc * alpha[None, :] + tl.dot(tl.trans(c), p.to(dtype), input_precision=DOT_PRECISION)
            else:
                sc = (tl.dot(q, tl.trans(c), input_precision=DOT_PRECISION)
                      + tl.dot(qp, tl.trans(kp), input_precision=DOT_PRECISION)) * scale
                sc = tl.where(smask[None, :], sc, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(sc - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(dtype), c, input_precision=DOT_PRECISION)
            m = m_new
        part = unit.to(tl.int64) * H + hh  # (units + rows) x H x C passes 2^31 at a few thousand rows
        tl.store(m_ptr + part, m, mask=hmask)
        tl.store(l_ptr + part, l, mask=hmask)
        if TRANSPOSED:
            tl.store(acc_ptr + part[None, :] * C + cc[:, None], acc, mask=cmask[:, None] & hmask[None, :])
        else:
            tl.store(acc_ptr + part[:, None] * C + cc[None, :], acc, mask=hmask[:, None] & cmask[None, :])


@triton.jit
def _attend_tile(q_lo, q_hi, qp, c_lo, c_hi, kp, valid, m, l, acc_lo, acc_hi, scale,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of positions of mla_attend_tma_kernel's online softmax: the scores of the
    latent's two halves and the RoPE key, the running max m, sum l and the two halves of the
    unnormalised sum (positions not `valid` weigh nothing where MASKED). Scores in base 2
    (`scale` holds log2(e)): exp2 compiled to 15% fewer instructions a block than exp."""
    sc = tl.dot(q_lo, tl.trans(c_lo), input_precision=DOT_PRECISION)
    sc = tl.dot(q_hi, tl.trans(c_hi), sc, input_precision=DOT_PRECISION)
    sc = tl.dot(qp, tl.trans(kp), sc, input_precision=DOT_PRECISION) * scale
    if MASKED:
        sc = tl.where(valid[None, :], sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(sc - m_new[:, None])
    pc = p.to(c_lo.dtype)
    acc_lo = tl.dot(pc, c_lo, acc_lo * alpha[:, None], input_precision=DOT_PRECISION)
    acc_hi = tl.dot(pc, c_hi, acc_hi * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l * alpha + tl.sum(p, axis=1), acc_lo, acc_hi


@triton.jit
def mla_attend_tma_kernel(qlat_ptr, qpe_ptr, ckv_desc, kpe_desc, ckv_ptr, kpe_ptr, stride_ckv, stride_kpe, pos_ptr,
                          acc_ptr, m_ptr, l_ptr, scale, H, B, SPLIT, UNITS, IDLE, HEAD_BLOCKS,
                          HALF: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_B: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """mla_attend_kernel's partial sums (the same programs and units) for a latent of C = 2·HALF
    channels and a RoPE key of R, both powers of two, built for Hopper: whole blocks of
    positions come by TMA copies (ckv_desc [rows' positions, C] in blocks [BLOCK_S, HALF],
    kpe_desc [.., R] in [BLOCK_S, R]: row b's positions start at b · stride / width), straight
    into shared memory where wgmma reads them, with no address arithmetic in registers; the
    latent in two halves, as a TMA copy is at most 256 wide, and so the running sum is two
    [BLOCK_H, HALF] halves. A unit's last, partial block is read by masked loads instead: a
    copy would bring positions past the row's end, whose cache rows may hold anything (a NaN
    times a zero weight is NaN). Compiled for sm_90 at 64 heads, blocks of 64 and 8 warps it
    does not spill where mla_attend_kernel's 64-head launches do, and its loop issues 781
    instructions a block, 80 of them wgmma (benchmarks/kernel_resources.py)."""
    C: tl.constexpr = 2 * HALF
    unit, b32, start, end, h0 = _attend_program(pos_ptr, B, UNITS, SPLIT, IDLE, HEAD_BLOCKS, BLOCK_H, BLOCK_B, USE_PDL)
    b = b32.to(tl.int64)
    if b32 < B:
        hh = h0 + tl.arange(0, BLOCK_H)
        cc = tl.arange(0, HALF)
        rr = tl.arange(0, R)
        hmask = hh < H
        dtype = ckv_ptr.dtype.element_ty
        q_row = qlat_ptr + (b * H + hh)[:, None] * C + cc[None, :]
        q_lo = tl.load(q_row, mask=hmask[:, None], other=0.0).to(dtype)
        q_hi = tl.load(q_row + HALF, mask=hmask[:, None], other=0.0).to(dtype)
        qp = tl.load(qpe_ptr + (b * H + hh)[:, None] * R + rr[None, :], mask=hmask[:, None], other=0.0).to(dtype)
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        part = unit.to(tl.int64) * H + hh
        mine = unit.to(tl.int64) * H + h0  # this program's m and l slots
        start = _through_memory(start, m_ptr + mine)
        end = _through_memory(end, l_ptr + mine)
        whole = start + (end - start) // BLOCK_S * BLOCK_S
        c_row = b32 * (stride_ckv // C)
        k_row = b32 * (stride_kpe // R)
        ss = tl.arange(0, BLOCK_S)
        scale = scale * 1.4426950408889634  # log2(e): the scores in base 2
        for s0 in range(start, whole, BLOCK_S):
            m, l, acc_lo, acc_hi = _attend_tile(
                q_lo, q_hi, qp, ckv_desc.load([c_row + s0, 0]), ckv_desc.load([c_row + s0, HALF]),
                kpe_desc.load([k_row + s0, 0]), ss, m, l, acc_lo, acc_hi, scale, False, DOT_PRECISION)
        if whole < end:
            s = whole + ss
            valid = s < end
            c_ptrs = ckv_ptr + b * stride_ckv + s[:, None] * C + cc[None, :]
            m, l, acc_lo, acc_hi = _attend_tile(
                q_lo, q_hi, qp, tl.load(c_ptrs, mask=valid[:, None], other=0.0),
                tl.load(c_ptrs + HALF, mask=valid[:, None], other=0.0),
                tl.load(kpe_ptr + b * stride_kpe + s[:, None] * R + rr[None, :], mask=valid[:, None], other=0.0),
                valid, m, l, acc_lo, acc_hi, scale, True, DOT_PRECISION)
        tl.store(m_ptr + part, m * 0.6931471805599453, mask=hmask)  # back to base e, as mla_output takes it
        tl.store(l_ptr + part, l, mask=hmask)
        a_row = acc_ptr + part[:, None] * C + cc[None, :]
        tl.store(a_row, acc_lo, mask=hmask[:, None])
        tl.store(a_row + HALF, acc_hi, mask=hmask[:, None])


@triton.jit
def mla_output_kernel(acc_ptr, m_ptr, l_ptr, wkvb_ptr, o_ptr, pos_ptr, H, C, N, V, B, SPLIT, UNITS, IDLE,
                      BLOCK_B: tl.constexpr, BLOCK_SP: tl.constexpr, CHUNK_SP: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (b, h, j): o_lat = row b's units merged (softmax-weighted), o[b, h·V + v] =
    (W_UV_h o_lat)[v] for the j-th block of BLOCK_V of the V outputs. Only the row's units are
    read (_row_units), CHUNK_SP at a time: the work follows the positions, not the cache's
    length. BLOCK_SP >= the most units a row may get (UNITS, and the cache's length over
    SPLIT), BLOCK_C >= C. Blocks of fewer than V outputs merge the units again each, so that a
    model of few heads runs more than H programs a row, each reading less of W_UV."""
    _launch_next(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < V
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    wuv = tl.load(wkvb_ptr + (h * (N + V) + N + v)[:, None] * C + c[None, :],
                  mask=vmask[:, None] & cmask[None, :], other=0.0)
    _, _, _, counts, ends = _row_units(pos_ptr, B, UNITS, SPLIT, IDLE, BLOCK_B)
    row = tl.arange(0, BLOCK_B) == b
    used = tl.sum(tl.where(row, counts, 0), axis=0)
    first = (tl.sum(tl.where(row, ends, 0), axis=0) - used).to(tl.int64)
    _wait_prev(USE_PDL)
    sp = tl.arange(0, BLOCK_SP)
    m = tl.load(m_ptr + (first + sp) * H + h, mask=sp < used, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    o_lat = tl.zeros([BLOCK_C], dtype=tl.float32)
    total = tl.zeros([CHUNK_SP], dtype=tl.float32)  # (tensors, not Python numbers: loop-carried)
    for s0 in range(0, used, CHUNK_SP):
        spc = s0 + tl.arange(0, CHUNK_SP)
        smask = spc < used
        part = (first + spc) * H + h
        w = tl.where(smask, tl.exp(tl.load(m_ptr + part, mask=smask, other=float("-inf")) - m_max), 0.0)
        total += w * tl.load(l_ptr + part, mask=smask, other=0.0)
        a = tl.load(acc_ptr + part[:, None] * C + c[None, :], mask=smask[:, None] & cmask[None, :], other=0.0)
        o_lat += tl.sum(a * w[:, None], axis=0)
    o_lat = o_lat / tl.sum(total, axis=0)
    tl.store(o_ptr + (b * H + h) * V + v, tl.sum(wuv.to(tl.float32) * o_lat[None, :], axis=1), mask=vmask)


@triton.jit
def moe_route_kernel(logits_ptr, bias_ptr, scaling, sel_idx_ptr, sel_gate_ptr,
                     E: tl.constexpr, K: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, GROUP_TOP2: tl.constexpr,
                     NORM_TOPK: tl.constexpr, USE_PDL: tl.constexpr):
    """Program b: one token's routing (moe.Router) from its E logits, held as [G, E/G]
    (E and G powers of two): affinities by sigmoid or softmax, the bias added for choosing,
    the best TOPK_GROUP of the G groups kept (a group scored by the sum of its best two, or
    its best one), the top K of those by K rounds of max; gates normalised over the K and
    scaled. Ties go to the lower index, as moe.ranks. The K chosen experts are written in
    index order with their gates (the slots' order does not change the sum)."""
    EG: tl.constexpr = E // G
    _launch_next(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G)
    j = tl.arange(0, EG)
    flat = g[:, None] * EG + j[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + flat).to(tl.float32)
    _wait_prev(USE_PDL)
    logit = tl.load(logits_ptr + b * E + flat).to(tl.float32)
    if SIGMOID:
        score = tl.sigmoid(logit)
    else:
        ex = tl.exp(logit - tl.max(tl.max(logit, axis=1), axis=0))
        score = ex / tl.sum(tl.sum(ex, axis=1), axis=0)
    choice = score
    if HAS_BIAS:
        choice += bias
    if G > 1 and TOPK_GROUP < G:
        top1 = tl.max(choice, axis=1)
        if GROUP_TOP2:
            first = tl.min(tl.where(choice == top1[:, None], j[None, :], EG), axis=1)
            gscore = top1 + tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), choice), axis=1)
        else:
            gscore = top1
        keep = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(tl.where(keep, float("-inf"), gscore), axis=0)
            keep = keep | (g == tl.min(tl.where(~keep & (gscore == best), g, G), axis=0))
        choice = tl.where(keep[:, None], choice, float("-inf"))
    taken = flat < 0
    for _ in tl.static_range(K):
        rest = tl.where(taken, float("-inf"), choice)
        best = tl.max(tl.max(rest, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(~taken & (rest == best), flat, E), axis=1), axis=0)
        taken = taken | (flat == pick)
    norm = scaling
    if NORM_TOPK:
        norm = scaling / (tl.sum(tl.sum(tl.where(taken, score, 0.0), axis=1), axis=0) + 1e-20)
    # slot of a chosen expert: how many chosen ones have a lower index
    count = taken.to(tl.int32)
    per_group = tl.sum(count, axis=1)
    slot = (tl.cumsum(per_group, axis=0) - per_group)[:, None] + tl.cumsum(count, axis=1) - count
    tl.store(sel_idx_ptr + b * K + slot, flat, mask=taken)
    tl.store(sel_gate_ptr + b * K + slot, score * norm, mask=taken)


@triton.jit
def _scaled_rows(w, x, s, ROWS: tl.constexpr, COLS: tl.constexpr, SBC: tl.constexpr):
    """_scaled_batch_rows of one row x [COLS]: [ROWS]. Written apart: through a batch of one, the
    up kernel compiles for sm_90 to 1,064 instructions instead of 944 (more lane shuffles)."""
    w3 = tl.reshape(w.to(tl.float32), [ROWS, COLS // SBC, SBC])
    part = tl.sum(w3 * tl.reshape(x, [COLS // SBC, SBC])[None, :, :], axis=2)
    return tl.sum(part * s[None, :], axis=1)


@triton.jit
def _up_program(F, BLOCK_F: tl.constexpr):
    """The up kernels' program (b, p, f-block): row b, slot p, and its rows f0.. of the slot's F."""
    f0 = tl.program_id(2) * BLOCK_F
    f = f0 + tl.arange(0, BLOCK_F)
    return tl.program_id(0).to(tl.int64), tl.program_id(1), f0, f, f < F


@triton.jit
def _slot_weights(b, p, f0, K: tl.constexpr, F, D, sel_idx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr,
                  wgs_ptr, wus_ptr, sgs_ptr, sus_ptr, FP8: tl.constexpr, SB_R: tl.constexpr, SB_C: tl.constexpr):
    """The up kernels' slot p of row b: its gate and up weights' first rows (a routed expert's
    after the routing, else the shared chunk p - K), and with FP8 the row of block scales
    holding rows f0.. (else the weights again: never read)."""
    wg, wu = sg_ptr + (p - K) * F * D, su_ptr + (p - K) * F * D
    sg, su = wg, wu
    if FP8:
        s_row = (((p - K) * F + f0) // SB_R) * tl.cdiv(D, SB_C)
        sg, su = sgs_ptr + s_row, sus_ptr + s_row
    if p < K:
        idx = tl.load(sel_idx_ptr + b * K + p).to(tl.int64)
        wg, wu = wg_ptr + idx * F * D, wu_ptr + idx * F * D
        if FP8:
            routed_s = (idx * tl.cdiv(F, SB_R) + f0 // SB_R) * tl.cdiv(D, SB_C)
            sg, su = wgs_ptr + routed_s, wus_ptr + routed_s
    return wg, wu, sg, su


@triton.jit
def moe_up_kernel(h_ptr, stride_h, norm_ptr, eps, D, sel_idx_ptr,
                  wg_ptr, wu_ptr, sg_ptr, su_ptr, F,
                  hmid_ptr, stride_hm_b,
                  K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
                  USE_PDL: tl.constexpr, wgs_ptr=None, wus_ptr=None, sgs_ptr=None, sus_ptr=None,
                  FP8: tl.constexpr = False, SB_R: tl.constexpr = 128, SB_C: tl.constexpr = 128):
    """Program (b, p, f-block): slot p < K is routed expert sel_idx[b, p], p >= K the shared
    experts' chunk p - K (rows (p-K)·F.. of their stacked [S·F, D] weights, or a dense
    layer's whole MLP with F its width). hmid[b, p, f] = SiLU(x·W_gate[f]) · (x·W_up[f]),
    x = RMSNorm(h[b])·norm. ONE_CHUNK (BLOCK_D >= D): the rows of W_gate and W_up are
    loaded at once, a shared slot's before the wait (they depend on no routing). FP8: every
    weight float8, the routed experts' block scales wgs, wus [E, ⌈F/SB_R⌉, ⌈D/SB_C⌉], the
    shared ones' sgs, sus [⌈S·F/SB_R⌉, ⌈D/SB_C⌉] (BLOCK_F dividing SB_R, and F a multiple of
    SB_R if there are several shared chunks: a program's rows share one row of blocks)."""
    _launch_next(USE_PDL)
    b, p, f0, f, fmask = _up_program(F, BLOCK_F)
    shared = p >= K
    x_ptr = h_ptr + b * stride_h
    if ONE_CHUNK:
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        wmask = fmask[:, None] & dmask[None, :]
        rows = (p - K) * F + f
        # a shared slot's rows now (a routed slot's mask is empty: no traffic), a routed slot's
        # after the routing: each program reads one of the two
        s_g = tl.load(sg_ptr + rows[:, None] * D + d[None, :], mask=wmask & shared, other=0.0)
        s_u = tl.load(su_ptr + rows[:, None] * D + d[None, :], mask=wmask & shared, other=0.0)
        g = tl.load(norm_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        if FP8:  # a scale a block of columns, applied to the block's partial sums
            s_cols = tl.cdiv(D, SB_C)
            shared_s = (((p - K) * F + f0) // SB_R) * s_cols  # (negative for a routed slot: never read)
            SBC: tl.constexpr = min(SB_C, BLOCK_D)
            cb = tl.arange(0, BLOCK_D // SBC)
            cbmask = cb < s_cols
            x_g = tl.load(sgs_ptr + shared_s + cb, mask=cbmask & shared, other=0.0)
            x_u = tl.load(sus_ptr + shared_s + cb, mask=cbmask & shared, other=0.0)
        _wait_prev(USE_PDL)
        idx = tl.load(sel_idx_ptr + b * K + p, mask=p < K, other=0).to(tl.int64)
        rmask = wmask & (p < K)
        # a shared slot keeps its rows (the routed load's mask is empty): one tile, widened once
        w_g = tl.load(wg_ptr + idx * F * D + f[:, None] * D + d[None, :], mask=rmask, other=s_g)
        w_u = tl.load(wu_ptr + idx * F * D + f[:, None] * D + d[None, :], mask=rmask, other=s_u)
        hx = tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32)
        x = _rms_norm(hx, g, D, eps)
        if FP8:
            routed_s = (idx * tl.cdiv(F, SB_R) + f0 // SB_R) * s_cols + cb
            x_g = tl.load(wgs_ptr + routed_s, mask=cbmask & (p < K), other=x_g)
            x_u = tl.load(wus_ptr + routed_s, mask=cbmask & (p < K), other=x_u)
            acc_g = _scaled_rows(w_g, x, x_g, BLOCK_F, BLOCK_D, SBC)
            acc_u = _scaled_rows(w_u, x, x_u, BLOCK_F, BLOCK_D, SBC)
        else:
            acc_g = tl.sum(w_g.to(tl.float32) * x[None, :], axis=1)
            acc_u = tl.sum(w_u.to(tl.float32) * x[None, :], axis=1)
    else:
        _wait_prev(USE_PDL)
        wg, wu, sg, su = _slot_weights(b, p, f0, K, F, D, sel_idx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr,
                                       wgs_ptr, wus_ptr, sgs_ptr, sus_ptr, FP8, SB_R, SB_C)
        inv = _inv_rms(x_ptr, D, eps, BLOCK_D)
        acc_g = tl.zeros([BLOCK_F], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_F], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < D
            x = (tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32) * inv
                 * tl.load(norm_ptr + d, mask=dmask, other=0.0).to(tl.float32))
            wmask = fmask[:, None] & dmask[None, :]
            w_g = tl.load(wg + f[:, None] * D + d[None, :], mask=wmask, other=0.0)
            w_u = tl.load(wu + f[:, None] * D + d[None, :], mask=wmask, other=0.0)
            if FP8:
                SBC_L: tl.constexpr = min(SB_C, BLOCK_D)
                cb = d0 // SB_C + tl.arange(0, BLOCK_D // SBC_L)
                cbmask = cb * SB_C < D
                acc_g += _scaled_rows(w_g, x, tl.load(sg + cb, mask=cbmask, other=0.0), BLOCK_F, BLOCK_D, SBC_L)
                acc_u += _scaled_rows(w_u, x, tl.load(su + cb, mask=cbmask, other=0.0), BLOCK_F, BLOCK_D, SBC_L)
            else:
                acc_g += tl.sum(w_g.to(tl.float32) * x[None, :], axis=1)
                acc_u += tl.sum(w_u.to(tl.float32) * x[None, :], axis=1)
    tl.store(hmid_ptr + b * stride_hm_b + p * F + f, acc_g * tl.sigmoid(acc_g) * acc_u, mask=fmask)


@triton.jit
def moe_up_dot_kernel(h_ptr, stride_h, norm_ptr, eps, D, sel_idx_ptr,
                      wg_ptr, wu_ptr, sg_ptr, su_ptr, F,
                      hmid_ptr, stride_hm_b,
                      K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
                      STAGES: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr,
                      wgs_ptr=None, wus_ptr=None, sgs_ptr=None, sus_ptr=None,
                      FP8: tl.constexpr = False, SB_R: tl.constexpr = 128, SB_C: tl.constexpr = 128,
                      W8A8: tl.constexpr = False, xq_ptr=None, xs_ptr=None, stride_xq=0, stride_xs=0):
    """moe_up_kernel's result (program (b, p, f-block), the same slots and scales) with the
    products on the tensor cores: each BLOCK_D columns of the BLOCK_F rows (>= 16) a tl.dot
    with x in the first of 16 columns (zeros in the rest: the sum of a row is exact), the
    weight tiles pipelined over STAGES. HALF: x and the weights float16 (x = RMSNorm(h)·norm,
    rounded once), else float32 (the CPU tests' float32 models). FP8: BLOCK_D divides SB_C, so
    a chunk's partial sums take one scale. W8A8 (FP8 weights): x quantized too, a scale per
    BLOCK_D chunk (amax / 448, as training's 1x128 tiles), and the FP8 tiles multiplied as
    they are: widening a weight for a 16-bit product cost a shared-memory load and a convert
    per two weights (sm_90: 2.8 instructions a weight at 64 rows). The program quantizes x
    whole before its loop into row b's scratch (xq [., D] float8, xs [., ⌈D/BLOCK_D⌉]; every
    program of the row writes the same bytes) and reads it back a tile a trip: quantizing a
    chunk a trip cost its loop a cross-warp amax and more instructions than the products."""
    _launch_next(USE_PDL)
    b, p, f0, f, fmask = _up_program(F, BLOCK_F)
    x_ptr = h_ptr + b * stride_h
    dt: tl.constexpr = tl.float16 if HALF else tl.float32
    _wait_prev(USE_PDL)
    wg, wu, sg, su = _slot_weights(b, p, f0, K, F, D, sel_idx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr,
                                   wgs_ptr, wus_ptr, sgs_ptr, sus_ptr, FP8, SB_R, SB_C)
    inv = _inv_rms(x_ptr, D, eps, BLOCK_X)
    first = (tl.arange(0, 16) == 0)[None, :]
    if W8A8:
        xq_row, xs_row = xq_ptr + b * stride_xq, xs_ptr + b * stride_xs
        XB: tl.constexpr = BLOCK_X if BLOCK_X > BLOCK_D else BLOCK_D
        for x0 in range(0, D, XB):
            i = x0 + tl.arange(0, XB)
            x = (tl.load(x_ptr + i, mask=i < D, other=0.0).to(tl.float32) * inv
                 * tl.load(norm_ptr + i, mask=i < D, other=0.0).to(tl.float32))
            x2 = tl.reshape(x, [XB // BLOCK_D, BLOCK_D])
            amax = tl.max(tl.abs(x2), axis=1)
            xs = tl.where(amax > 0, amax / 448.0, 1.0)  # fp8.quant's scale_inv: 1 for an all-zero chunk
            tl.store(xq_row + i, tl.reshape((x2 / xs[:, None]).to(tl.float8e4nv), [XB]), mask=i < D)
            c = x0 // BLOCK_D + tl.arange(0, XB // BLOCK_D)
            tl.store(xs_row + c, xs, mask=c * BLOCK_D < D)
        tl.debug_barrier()  # the program's own stores, read back below
    acc_g = tl.zeros([BLOCK_F, 16], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_F, 16], dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        wmask = fmask[:, None] & dmask[None, :]
        w_g = tl.load(wg + f[:, None] * D + d[None, :], mask=wmask, other=0.0)
        w_u = tl.load(wu + f[:, None] * D + d[None, :], mask=wmask, other=0.0)
        if W8A8:  # x in the first of the tile's 16 columns, zeros in the rest
            xq = tl.load(xq_row + d[:, None] + 0 * first, mask=dmask[:, None] & first, other=0.0)
            xs = tl.load(xs_row + d0 // BLOCK_D)
            acc_g += tl.dot(w_g, xq) * (tl.load(sg + d0 // SB_C) * xs)
            acc_u += tl.dot(w_u, xq) * (tl.load(su + d0 // SB_C) * xs)
        else:
            x = (tl.load(x_ptr + d, mask=dmask, other=0.0).to(tl.float32) * inv
                 * tl.load(norm_ptr + d, mask=dmask, other=0.0).to(tl.float32))
            xb = tl.where(first, x[:, None], 0.0).to(dt)
            w_g, w_u = w_g.to(dt), w_u.to(dt)
            if FP8:
                acc_g += tl.dot(w_g, xb, input_precision="ieee") * tl.load(sg + d0 // SB_C)
                acc_u += tl.dot(w_u, xb, input_precision="ieee") * tl.load(su + d0 // SB_C)
            else:
                acc_g = tl.dot(w_g, xb, acc_g, input_precision="ieee")
                acc_u = tl.dot(w_u, xb, acc_u, input_precision="ieee")
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    tl.store(hmid_ptr + b * stride_hm_b + p * F + f, g * tl.sigmoid(g) * u, mask=fmask)


@triton.jit
def moe_down_kernel(h_ptr, stride_h, sel_idx_ptr, sel_gate_ptr, wd_ptr, F, sd_ptr, FS, D,
                    hmid_ptr, stride_hm_b,
                    K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_FS: tl.constexpr,
                    USE_PDL: tl.constexpr, wds_ptr=None, sds_ptr=None, FP8: tl.constexpr = False,
                    SB_R: tl.constexpr = 128, SB_C: tl.constexpr = 128):
    """Program (b, d-block): h[b, d] += Σ_p gate_p · W_down_p[d] · hmid[b, p] over the K
    routed slots (a [K, BLOCK_D, BLOCK_F] load: every expert's rows in flight at once), plus
    the shared experts' W_down[d] · hmid[b, K:] (their FS = S·F values follow the routed
    slots'; their rows loaded before the wait when BLOCK_FS >= FS). In place: a program
    reads and writes only its own block of h. FP8: the weights float8, the routed experts'
    block scales wds [E, ⌈D/SB_R⌉, ⌈F/SB_C⌉], the shared ones' sds [⌈D/SB_R⌉, ⌈FS/SB_C⌉]
    (BLOCK_D dividing SB_R), folded into hmid's columns."""
    _launch_next(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1) * BLOCK_D
    d = d0 + tl.arange(0, BLOCK_D)
    dmask = d < D
    hm_ptr = hmid_ptr + b * stride_hm_b
    out_ptr = h_ptr + b * stride_h + d
    if HAS_SHARED:
        fs = tl.arange(0, BLOCK_FS)
        w_s = tl.load(sd_ptr + d[:, None] * FS + fs[None, :], mask=dmask[:, None] & (fs < FS)[None, :], other=0.0)
    _wait_prev(USE_PDL)
    acc = tl.load(out_ptr, mask=dmask, other=0.0).to(tl.float32)
    if K > 0:
        pp = tl.arange(0, BLOCK_P)
        pmask = pp < K
        idx = tl.load(sel_idx_ptr + b * K + pp, mask=pmask, other=0).to(tl.int64)
        base = idx * D * F
        if FP8:
            s_base = (idx * tl.cdiv(D, SB_R) + d0 // SB_R) * tl.cdiv(F, SB_C)
        gate = tl.load(sel_gate_ptr + b * K + pp, mask=pmask, other=0.0)
        acc_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            fmask = f < F
            w = tl.load(wd_ptr + base[:, None, None] + d[None, :, None] * F + f[None, None, :],
                        mask=pmask[:, None, None] & dmask[None, :, None] & fmask[None, None, :], other=0.0)
            x = tl.load(hm_ptr + pp[:, None] * F + f[None, :], mask=pmask[:, None] & fmask[None, :], other=0.0)
            if FP8:
                x *= tl.load(wds_ptr + s_base[:, None] + f[None, :] // SB_C, mask=pmask[:, None] & fmask[None, :],
                             other=0.0)
            acc_p += tl.sum(w.to(tl.float32) * x[:, None, :], axis=2)
        acc += tl.sum(acc_p * gate[:, None], axis=0)
    if HAS_SHARED:
        if FP8:
            s_row = sds_ptr + (d0 // SB_R) * tl.cdiv(FS, SB_C)
        x_s = tl.load(hm_ptr + K * F + fs, mask=fs < FS, other=0.0)
        if FP8:
            x_s *= tl.load(s_row + fs // SB_C, mask=fs < FS, other=0.0)
        acc += tl.sum(w_s.to(tl.float32) * x_s[None, :], axis=1)
        for f0 in range(BLOCK_FS, FS, BLOCK_FS):  # shared experts wider than BLOCK_FS
            f = f0 + tl.arange(0, BLOCK_FS)
            fmask = f < FS
            w = tl.load(sd_ptr + d[:, None] * FS + f[None, :], mask=dmask[:, None] & fmask[None, :], other=0.0)
            x = tl.load(hm_ptr + K * F + f, mask=fmask, other=0.0)
            if FP8:
                x *= tl.load(s_row + f // SB_C, mask=fmask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr, acc, mask=dmask)


@triton.jit
def moe_down_split_kernel(h_ptr, stride_h, sel_idx_ptr, sel_gate_ptr, wd_ptr, F, sd_ptr, FS, D,
                          hmid_ptr, stride_hm_b, part_ptr, count_ptr, CF, Q,
                          K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_Q: tl.constexpr,
                          USE_PDL: tl.constexpr, wds_ptr=None, sds_ptr=None, FP8: tl.constexpr = False,
                          SB_R: tl.constexpr = 128, SB_C: tl.constexpr = 128):
    """moe_down_kernel's sum split over its slots: program (q, d-block, b) reads one slot's
    BLOCK_F columns of rows d, q = slot · CF + chunk (Q = slots · CF), and writes
    gate · W_down[d, f] · hmid[b, slot, f] into part[b, q, d]; the last of a d-block's Q
    programs (a counter, reset for the next use) adds them in order to h[b, d]. So a program
    loads a GEMV's tile, not every slot's rows at once: many small programs an SM (the up
    kernel's shape, ~95% of the bandwidth) where the fused sum held one (255 registers). FP8:
    moe_down_kernel's scales, each multiplying its block of columns' partial sums."""
    _launch_next(USE_PDL)
    q = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = q // CF
    f0 = (q % CF) * BLOCK_F
    f = f0 + tl.arange(0, BLOCK_F)
    d0 = blk * BLOCK_D
    d = d0 + tl.arange(0, BLOCK_D)
    fmask, dmask = f < F, d < D
    wmask = dmask[:, None] & fmask[None, :]
    routed = p < K
    # a shared slot's rows now (they depend on no routing), a routed slot's after the wait
    w = tl.load(sd_ptr + d[:, None] * FS + (p - K) * F + f[None, :], mask=wmask & (p >= K), other=0.0)
    if FP8:  # a scale a block of columns (BLOCK_F and SB_C powers of two: whole blocks, or within one)
        SBC: tl.constexpr = min(SB_C, BLOCK_F)
        cb = tl.arange(0, BLOCK_F // SBC)
        cbmask = cb * SBC + f0 < F
        scale = tl.load(sds_ptr + (d0 // SB_R) * tl.cdiv(FS, SB_C) + ((p - K) * F + f0) // SB_C + cb,
                        mask=cbmask & (p >= K), other=0.0)
    _wait_prev(USE_PDL)
    idx = tl.load(sel_idx_ptr + b * K + p, mask=routed, other=0).to(tl.int64)
    # a shared slot keeps its rows (the routed load's mask is empty): one tile, widened once
    w = tl.load(wd_ptr + idx * D * F + d[:, None] * F + f[None, :], mask=wmask & routed, other=w)
    gate = tl.load(sel_gate_ptr + b * K + p, mask=routed, other=1.0)
    x = tl.load(hmid_ptr + b * stride_hm_b + p * F + f, mask=fmask, other=0.0).to(tl.float32)
    if FP8:
        scale = tl.load(wds_ptr + (idx * tl.cdiv(D, SB_R) + d0 // SB_R) * tl.cdiv(F, SB_C) + f0 // SB_C + cb,
                        mask=cbmask & routed, other=scale)
        out = _scaled_rows(w, x, scale, BLOCK_D, BLOCK_F, SBC)
    else:
        out = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(part_ptr + (b * Q + q) * D + d, out * gate, mask=dmask)
    # every thread's stores before the counter's release (CUTLASS's split-K semaphore)
    tl.debug_barrier()
    counter = count_ptr + b * tl.num_programs(1) + blk
    if tl.atomic_add(counter, 1, sem="acq_rel") == Q - 1:
        qq = tl.arange(0, BLOCK_Q)
        parts = tl.load(part_ptr + (b * Q + qq)[:, None] * D + d[None, :], mask=(qq < Q)[:, None] & dmask[None, :],
                        other=0.0, cache_modifier=".cg")  # written by other SMs: not from this one's L1
        out_ptr = h_ptr + b * stride_h + d
        acc = tl.load(out_ptr, mask=dmask, other=0.0).to(tl.float32) + tl.sum(parts, axis=0)
        tl.store(out_ptr, acc, mask=dmask)
        tl.atomic_xchg(counter, 0)
