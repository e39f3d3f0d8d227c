"""Triton kernels for the routed experts of a small batch: decode steps of up to 64 tokens
(model/moe.py's "small_batch" expert path).

Legend: N tokens, K experts per token, E routed experts, D hidden_size, F an expert's width.

A batch of 32 decode tokens picks 192 (token, expert) pairs, which touch most of 64
experts: the step has to read nearly every expert's weights, and should read each one once,
at the GPU's bandwidth, with as few kernels as it can. The grouped GEMM (moe.Experts.
forward_grouped) sorts the pairs by expert, gathers the tokens, runs three grouped GEMMs
(each with a setup kernel) and scatters back: about a dozen kernels a layer. Here it is two,
expert-major, with no sort:

1. `expert_up`    per (expert, block of F): the rows whose top-K holds the expert, found
                  from the [N, K] routing table by the program itself; SiLU(x W_gate^T) ·
                  (x W_up^T) for them by tensor-core dot products over all N rows (rows that
                  did not choose the expert are masked to zero: at N <= 64 the extra
                  products cost nothing next to the weight reads) -> hmid [E, N, F];
2. `expert_down`  per (expert, block of D): hmid W_down^T, times each row's gate, stored at
                  the row's slot k of y [N, K, D] (float32). Every (row, slot) has exactly
                  one expert, so every entry is written once: no atomics, the same result
                  run to run.

The caller sums y over K (moe.Experts.forward_small_batch). An expert no row chose is
skipped whole: its weights are not read. The twin is moe.Experts.forward_loop.

FP8 weights (an FP8 checkpoint kept in FP8: infer/fp8_weights.FP8Experts) are read in place
with their block scales, weight-only: each weight tile, within one scale block, is widened to
the activations' dtype (exact for E4M3), its dot product taken, and the block's scale applied
to that float32 partial sum. So a decode step reads one byte a weight, where dequantising the
experts first would write and read them again in 16 bits. The twin is the dequantised model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64  # the rows one program takes in its dot products (BLOCK_N)
# launch shapes of expert_up and expert_down: the fastest of benchmarks/decode_step.py
# --moe-sweep (benchmarks/results/moe_sweep.json, where many shapes came within 5% of these)
SMALL_BATCH_EXPERTS_LAUNCH = {"up": dict(block_f=64, block_d=64, warps=4, stages=3),
                              "down": dict(block_d=128, block_f=64, warps=4, stages=3)}


@triton.jit
def _chosen(idx_ptr, e, N, K: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N] whether each row's top-K holds expert e."""
    rows = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, KP)
    idx = tl.load(idx_ptr + rows[:, None] * K + ks[None, :],
                  mask=(rows[:, None] < N) & (ks[None, :] < K), other=-1)
    return tl.sum((idx == e).to(tl.int32), 1) > 0


@triton.jit
def _scaled_dot(x, w, acc, s_ptr, s_off, SCALED: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x · w^T; with SCALED, w (FP8) widened to x's dtype and the product times the
    block's scale at s_ptr + s_off (the tile lies in one scale block)."""
    # (an else, not a return inside the if: the compiler still built the FP8 dot after it, which
    # Triton refuses, so FP8 weights did not compile for a GPU)
    if SCALED:
        out = acc + tl.load(s_ptr + s_off) * tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    else:
        out = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return out


@triton.jit
def expert_up_kernel(x_ptr, idx_ptr, w_gate_ptr, w_up_ptr, h_ptr, N,
                     D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, s_gate_ptr=None, s_up_ptr=None, SCALED: tl.constexpr = False,
                     QF: tl.constexpr = 128, QD: tl.constexpr = 128):
    """Program (expert, block of F); SCALED: FP8 weights, scales [E, ⌈F/QF⌉, ⌈D/QD⌉]."""
    e = tl.program_id(0)
    f0 = tl.program_id(1) * BLOCK_F
    sel = _chosen(idx_ptr, e, N, K, KP, BLOCK_N)
    if tl.sum(sel.to(tl.int32), 0) > 0:
        rows = tl.arange(0, BLOCK_N)
        fs = f0 + tl.arange(0, BLOCK_F)
        ds = tl.arange(0, BLOCK_D)
        w_off = e.to(tl.int64) * F * D + fs[:, None] * D + ds[None, :]
        s_row = (e * tl.cdiv(F, QF) + f0 // QF) * tl.cdiv(D, QD)
        acc_g = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            x = tl.load(x_ptr + rows[:, None] * D + d0 + ds[None, :], mask=sel[:, None], other=0.0)
            w_g = tl.load(w_gate_ptr + w_off + d0)
            w_u = tl.load(w_up_ptr + w_off + d0)
            acc_g = _scaled_dot(x, w_g, acc_g, s_gate_ptr, s_row + d0 // QD, SCALED, PRECISION)
            acc_u = _scaled_dot(x, w_u, acc_u, s_up_ptr, s_row + d0 // QD, SCALED, PRECISION)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(h_ptr + (e.to(tl.int64) * N + rows[:, None]) * F + fs[None, :],
                 h.to(h_ptr.dtype.element_ty), mask=sel[:, None])


@triton.jit
def expert_down_kernel(h_ptr, idx_ptr, route_gate_ptr, w_down_ptr, y_ptr, N,
                       D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                       PRECISION: tl.constexpr, s_down_ptr=None, SCALED: tl.constexpr = False,
                       QD: tl.constexpr = 128, QF: tl.constexpr = 128):
    """Program (expert, block of D); SCALED: FP8 weights, scales [E, ⌈D/QD⌉, ⌈F/QF⌉]."""
    e = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    sel = _chosen(idx_ptr, e, N, K, KP, BLOCK_N)
    if tl.sum(sel.to(tl.int32), 0) > 0:
        rows = tl.arange(0, BLOCK_N)
        ds = d0 + tl.arange(0, BLOCK_D)
        fs = tl.arange(0, BLOCK_F)
        w_off = e.to(tl.int64) * D * F + ds[:, None] * F + fs[None, :]
        h_off = (e.to(tl.int64) * N + rows[:, None]) * F + fs[None, :]
        s_row = (e * tl.cdiv(D, QD) + d0 // QD) * tl.cdiv(F, QF)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            h = tl.load(h_ptr + h_off + f0, mask=sel[:, None], other=0.0)
            w_d = tl.load(w_down_ptr + w_off + f0)
            acc = _scaled_dot(h, w_d, acc, s_down_ptr, s_row + f0 // QF, SCALED, PRECISION)
        for k in tl.static_range(K):
            hit = tl.load(idx_ptr + rows * K + k, mask=rows < N, other=-1) == e
            gate = tl.load(route_gate_ptr + rows * K + k, mask=hit, other=0.0)
            tl.store(y_ptr + (rows[:, None] * K + k) * D + ds[None, :], acc * gate[:, None],
                     mask=hit[:, None])


def launch_shapes(launch: dict | None = None) -> dict:
    """SMALL_BATCH_EXPERTS_LAUNCH with the given kernels' entries replaced; a key that is
    not a launch shape of these kernels is an error."""
    shapes = {part: dict(shape) for part, shape in SMALL_BATCH_EXPERTS_LAUNCH.items()}
    for part, shape in (launch or {}).items():
        if part not in shapes or set(shape) - set(shapes[part]):
            raise ValueError(f"small-batch experts launch {part}={shape}: the kernels take "
                             f"{SMALL_BATCH_EXPERTS_LAUNCH} (any of those keys)")
        shapes[part].update(shape)
    return shapes


def unsupported(n_tokens: int, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
                w_down_EDF: torch.Tensor, launch: dict | None = None,
                scales: tuple[torch.Tensor, ...] | None = None, block: tuple[int, int] | None = None) -> str | None:
    """Why these kernels cannot take a batch, or None: at most MAX_TOKENS rows, widths that
    the launch shapes' blocks divide (the weight loads are not masked), and weights of one
    dtype that they can read in place (contiguous, as moe.Experts stores them). FP8 weights
    come with their scales (gate, up, down) and scale block (rows, columns of a matrix): every
    weight tile must lie in one scale block."""
    E, F, D = w_gate_EFD.shape
    shapes = launch_shapes(launch)
    up, down = shapes["up"], shapes["down"]
    if not 0 < n_tokens <= MAX_TOKENS:
        return f"{n_tokens} tokens (it takes 1..{MAX_TOKENS})"
    if D % up["block_d"] or D % down["block_d"] or F % up["block_f"] or F % down["block_f"]:
        return f"hidden size {D}, expert width {F} (the launch's blocks must divide them: {shapes})"
    weights = (w_gate_EFD, w_up_EFD, w_down_EDF)
    if not all(w.is_contiguous() and w.dtype == w_gate_EFD.dtype for w in weights):
        return "expert weights not contiguous or not of one dtype (the kernels read them in place)"
    if scales is not None:
        r, c = block
        if w_gate_EFD.dtype != torch.float8_e4m3fn:
            return f"scales given with {w_gate_EFD.dtype} weights (FP8 E4M3 only)"
        if r % up["block_f"] or c % up["block_d"] or r % down["block_d"] or c % down["block_f"]:
            return f"scale block {block} (the launch's weight tiles must lie in one: {shapes})"
        want = [(E, -(-F // r), -(-D // c))] * 2 + [(E, -(-D // r), -(-F // c))]
        if [tuple(t.shape) for t in scales] != want or not all(t.is_contiguous() for t in scales):
            return f"scales of shapes {[tuple(t.shape) for t in scales]} (want {want}, contiguous)"
    return None


def small_batch_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, gate_NK: torch.Tensor,
                        w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                        launch: dict | None = None, scales: tuple[torch.Tensor, ...] | None = None,
                        block: tuple[int, int] | None = None) -> torch.Tensor:
    """y [N, K, D] float32: each (token, slot)'s expert output times its gate. idx_NK: each
    token's K distinct experts, in [0, E); x and the weights in one dtype, or FP8 weights with
    their float32 block scales (gate, up, down) and scale block (unsupported's), the weights
    contiguous as moe.Experts stores them (the kernels read them in place). launch: launch
    shapes over SMALL_BATCH_EXPERTS_LAUNCH."""
    shapes = launch_shapes(launch)
    flat = [shapes["up"][k] for k in ("block_f", "block_d", "warps", "stages")] + \
           [shapes["down"][k] for k in ("block_d", "block_f", "warps", "stages")]
    s_gate, s_up, s_down = scales if scales is not None else (None, None, None)
    return _small_batch_experts(x_ND, idx_NK, gate_NK, w_gate_EFD, w_up_EFD, w_down_EDF, flat,
                                s_gate, s_up, s_down, list(block or ()))


@torch.library.custom_op("nanoseek::small_batch_experts", mutates_args=())
def _small_batch_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, gate_NK: torch.Tensor,
                         w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                         launch: list[int], s_gate: torch.Tensor | None, s_up: torch.Tensor | None,
                         s_down: torch.Tensor | None, block: list[int]) -> torch.Tensor:
    """small_batch_experts as one opaque op (torch.compile traces it whole); launch: the up
    kernel's block_f, block_d, warps, stages, then the down kernel's block_d, block_f, warps,
    stages; the scales None and block empty for 16- or 32-bit weights."""
    N, D = x_ND.shape
    K = idx_NK.shape[1]
    E, F, _ = w_gate_EFD.shape
    up_f, up_d, up_warps, up_stages, down_d, down_f, down_warps, down_stages = launch
    shapes = {"up": dict(block_f=up_f, block_d=up_d), "down": dict(block_d=down_d, block_f=down_f)}
    scaled = s_gate is not None
    scales = (s_gate, s_up, s_down) if scaled else None
    reason = unsupported(N, w_gate_EFD, w_up_EFD, w_down_EDF, shapes, scales, tuple(block) if scaled else None)
    if reason is not None:
        raise ValueError(f"small_batch_experts cannot take {reason}")
    fp8 = dict(SCALED=True, QF=block[0], QD=block[1]) if scaled else {}
    x_ND, idx_NK = x_ND.contiguous(), idx_NK.contiguous()
    gate_NK = gate_NK.float().contiguous()
    block_n = max(16, triton.next_power_of_2(N))  # tl.dot takes M >= 16
    kp = triton.next_power_of_2(K)
    # float32 (the tests) as float32, not TF32; 16-bit operands are exact either way
    precision = "ieee" if x_ND.dtype == torch.float32 else "tf32"
    # every expert's rows for all N tokens, of which the N·K chosen are written and read: at
    # most 64 tokens, so a few MB
    h_ENF = torch.empty(E, N, F, dtype=x_ND.dtype, device=x_ND.device)
    y_NKD = torch.empty(N, K, D, dtype=torch.float32, device=x_ND.device)
    expert_up_kernel[(E, F // up_f)](
        x_ND, idx_NK, w_gate_EFD, w_up_EFD, h_ENF, N, D, F, K, kp, block_n, up_f, up_d,
        precision, s_gate, s_up, **fp8, num_warps=up_warps, num_stages=up_stages)
    # the down projection's matrices are [D, F]: its scale block's rows run along D
    fp8_down = dict(SCALED=True, QD=block[0], QF=block[1]) if scaled else {}
    expert_down_kernel[(E, D // down_d)](
        h_ENF, idx_NK, gate_NK, w_down_EDF, y_NKD, N, D, F, K, kp, block_n, down_d, down_f,
        precision, s_down, **fp8_down, num_warps=down_warps, num_stages=down_stages)
    return y_NKD


@_small_batch_experts.register_fake
def _(x_ND, idx_NK, gate_NK, w_gate_EFD, w_up_EFD, w_down_EDF, launch, s_gate, s_up, s_down, block):
    return x_ND.new_empty(x_ND.shape[0], idx_NK.shape[1], x_ND.shape[1], dtype=torch.float32)
