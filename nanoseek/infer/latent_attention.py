"""MLA decode attention over the latent cache by Triton kernels, each row reading its own positions.

The model's absorbed attention (mla.MLA.absorbed) scores every position of the cache view it
is given and masks the ones past a row's position: a step captured for a cache of max_len
positions reads max_len positions a row, however short the rows are. The fused step's
attention kernels (kernels/decode.py: mla_attend cuts the rows' positions, all rows together,
into units of one length, mla_output merges a row's units and applies W_UV) read only those.
`attend_latent` launches them; the fused step calls it with its own buffers, and the engine's
steps through the custom op `nanoseek::mla_decode_attention` (opaque to Inductor, capturable
in a CUDA graph), which `LatentDecodeAttention` puts in place of the absorbed attention for one
new token a row (MLA.decode_attention, set around the engine's forwards).

Launch shapes follow fused.fused_step_launch's rule for the model's widths and cache length.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..kernels import decode as kernels

# Attention programs (head blocks x units) are sized as if a step had at most this many rows
# of the cache's length: a step of more rows gets more units, each a share of their positions.
ATTEND_ROWS = 4


def pow2(n: int, at_least: int = 1) -> int:
    """The power of two at or above n, and at least `at_least`: a Triton block size."""
    return max(at_least, triton.next_power_of_2(n))


def attention_units(t: dict, heads: int, max_len: int, B: int) -> int:
    """Units of attention a step of B rows aims for (kernels._row_units cuts the rows'
    positions into about that many): enough for about attend_programs programs (head blocks x
    units) a row-full of the cache, rows counted up to ATTEND_ROWS, and no more a row than a
    full row holds of the least length (attend_split positions)."""
    blocks = triton.cdiv(heads, t["attend_heads"])
    per_row = min(triton.cdiv(max_len, t["attend_split"]), t["attend_programs"] // (blocks * min(B, ATTEND_ROWS)))
    return B * max(1, per_row)


def attention_parts(t: dict, heads: int, max_len: int, B: int) -> int:
    """Partial sums a step of B rows may write: its units, at most B more than it aims for."""
    return attention_units(t, heads, max_len, B) + B


def attend_warps_stages(t: dict, B: int, C: int) -> dict:
    """The attention's warps and pipeline stages at B rows over a latent C wide: the launch's
    while its programs fit one wave (rows up to ATTEND_ROWS); past that, a wave of several
    programs an SM runs faster on half the warps (V3's widths, 16 rows: 1.3x) and 2 stages.
    Never fewer than 4 warps, nor than hold a program's [heads, C] float32 accumulator in 128
    registers a thread (at most the launch's warps): a 64-head program at C = 512 keeps 8."""
    warps, stages = t["attend_warps"], t["attend_stages"]
    if B <= ATTEND_ROWS:
        return dict(num_warps=warps, num_stages=stages)
    holds = min(warps, t["attend_heads"] * pow2(C) // (128 * 32))
    return dict(num_warps=max(4, warps // 2, holds), num_stages=min(2, stages))


@functools.cache
def _has_tma(device: int) -> bool:
    """Whether the CUDA device (-1: the current one) copies by TMA: asked once, not every layer."""
    return torch.cuda.get_device_capability(None if device < 0 else device) >= (9, 0)


def positions_descriptor(rows: torch.Tensor, block: list[int]):
    """A TMA descriptor of the cache rows [n, S, X] (positions contiguous, channels packed, the
    row stride a multiple of X) as one [positions, X] matrix read in `block`s: row b's
    positions start at b · stride / X (mla_attend_tma_kernel)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    n, S, X = rows.shape
    if rows.stride(0) % X or rows.data_ptr() % 16 or (X * rows.element_size()) % 16:
        raise ValueError(f"the TMA attention reads a cache of rows {tuple(rows.shape)}, strides {rows.stride()}: "
                         "its row stride must be a multiple of its width, 16-byte aligned")
    if rows.is_cuda and not _has_tma(rows.device.index if rows.device.index is not None else -1):
        raise ValueError("launch attend_tma=1 needs TMA copies (Hopper, sm_90, or later); leave it at 0 on this GPU")
    return TensorDescriptor(rows, shape=[(n - 1) * (rows.stride(0) // X) + S, X], strides=[X, 1], block_shape=block)


def attend_latent(q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
                  positions_B: torch.Tensor, w_kvb: torch.Tensor, scale: float, V: int, t: dict, launch: dict,
                  idle: int = -1, out: torch.Tensor | None = None,
                  parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """o [B, H·V] float32 of rows 0..B-1 at positions_B over the latent cache ckv [>= B, S, C] /
    kpe [>= B, S, R] (row stride free, positions contiguous), from the absorbed queries q_lat
    [>= B, H, C] and q_pe [>= B, H, R] (contiguous; rounded to the cache's dtype for the dots, so
    best handed in it): the rows' positions cut into about
    attention_units units (kernels._row_units) attended (mla_attend) into partial sums, then
    merged per row with W_UV (V wide a head) from w_kvb, kv_b_proj's weight (mla_output). A row
    at position `idle` (a CUDA-graph bucket's padding row; -1: none) attends to it only. `out`
    [>= B, H·V] and `parts` (acc [>= attention_parts, H, C], m and l [>= attention_parts, H]),
    float32, are allocated here unless given (the fused step keeps its own)."""
    B = positions_B.shape[0]
    H, C = q_lat.shape[1], q_lat.shape[2]
    R = q_pe.shape[2]
    heads, split = t["attend_heads"], t["attend_split"]
    units = attention_units(t, H, ckv.shape[1], B)
    f32 = dict(dtype=torch.float32, device=q_lat.device)
    if parts is None:
        n = units + B
        parts = (torch.empty(n, H, C, **f32), torch.empty(n, H, **f32), torch.empty(n, H, **f32))
    part_acc, part_m, part_l = parts
    # float32 caches (CPU tests): exact dot products, not TF32
    precision = "ieee" if ckv.dtype == torch.float32 else "tf32"
    rows = pow2(B, 2)  # the rows' positions as one block (not a 1-element one, which reductions may not take)
    blocks = triton.cdiv(H, heads)
    if t["attend_tma"]:
        block_s = t["attend_block"]
        kernels.mla_attend_tma_kernel[(blocks * (units + B),)](
            q_lat, q_pe, positions_descriptor(ckv, [block_s, C // 2]), positions_descriptor(kpe, [block_s, R]),
            ckv, kpe, ckv.stride(0), kpe.stride(0), positions_B, part_acc, part_m, part_l, scale, H, B, split, units,
            idle, blocks, HALF=C // 2, R=R, BLOCK_H=heads, BLOCK_S=block_s, BLOCK_B=rows, DOT_PRECISION=precision,
            **attend_warps_stages(t, B, C), **launch)
    else:
        kernels.mla_attend_kernel[(blocks * (units + B),)](
            q_lat, q_pe, ckv, kpe, ckv.stride(0), kpe.stride(0), positions_B,
            part_acc, part_m, part_l, scale, H, C, R, B, split, units, idle, blocks,
            BLOCK_H=heads, BLOCK_C=pow2(C, 16), BLOCK_R=pow2(R, 16), BLOCK_S=t["attend_block"], BLOCK_B=rows,
            DOT_PRECISION=precision, TRANSPOSED=bool(t["attend_transposed"]), **attend_warps_stages(t, B, C), **launch)
    o = out[:B] if out is not None else torch.empty(B, H * V, **f32)
    N = w_kvb.shape[0] // H - V  # kv_b_proj holds W_UK (N rows) then W_UV (V rows) a head
    # the most units one row gets: no more than aimed for, nor than its positions in the least chunk
    most = pow2(min(units, triton.cdiv(ckv.shape[1], split)), 2)
    block_v = max(1, pow2(V) // t.get("output_split", 1))
    kernels.mla_output_kernel[(B, H, triton.cdiv(V, block_v))](
        part_acc, part_m, part_l, w_kvb, o, positions_B, H, C, N, V, B, split, units, idle, BLOCK_B=rows,
        BLOCK_SP=most, CHUNK_SP=min(t["merge_splits"], most), BLOCK_C=pow2(C),
        BLOCK_V=block_v, num_warps=t["output_warps"], **launch)
    return o


# the launch keys the custom op takes, in this order (a list of ints: an op's schema holds no dict)
OP_LAUNCH = ("attend_heads", "attend_split", "attend_block", "attend_programs", "attend_warps", "attend_stages",
             "merge_splits", "output_warps", "attend_transposed", "output_split", "attend_tma")


def packed_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows [B, S, X] with each row's positions and channels packed, as the kernels index them:
    a copy only if they are not. The row stride stays free (attend_latent takes it), so the rows
    of a view cut to fewer positions than the cache holds (an eager step's) are read in place,
    where .contiguous() would copy every row's cache at every layer and step."""
    return rows if rows.stride(-1) == 1 and rows.stride(-2) == rows.shape[-1] else rows.contiguous()


@torch.library.custom_op("nanoseek::mla_decode_attention", mutates_args=())
def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor,
                         positions_B: torch.Tensor, w_kvb: torch.Tensor, scale: float, v_dim: int,
                         launch: list[int], idle: int) -> torch.Tensor:
    """attend_latent, its scratch allocated per call (from the graph's pool when captured):
    o [B, H·v_dim] float32; launch: the values of OP_LAUNCH; idle: attend_latent's. What it
    reads is packed first (a no-op in eager steps): a compiled graph may hand an op other
    strides than eager's, and the kernels index every row packed."""
    return attend_latent(q_lat.contiguous(), q_pe.contiguous(), packed_rows(ckv), packed_rows(kpe),
                         positions_B.contiguous(), w_kvb, scale, v_dim, dict(zip(OP_LAUNCH, launch)),
                         dict(USE_PDL=False), idle)


@mla_decode_attention.register_fake
def _(q_lat, q_pe, ckv, kpe, positions_B, w_kvb, scale, v_dim, launch, idle):
    return q_lat.new_empty(q_lat.shape[0], q_lat.shape[1] * v_dim, dtype=torch.float32)


# With one row at V3's widths, 64 heads a program in blocks of 32 positions ran 1.19x (32K) and
# 1.39x (128K) faster than the rule's 32 heads; at 16 rows 32 stayed faster (H100,
# benchmarks/results/h100_attention/captured)
ONE_ROW_HEADS = 64


def one_row_launch(config, max_len: int, rule: dict, launch: dict | None = None) -> dict:
    """The launch for a step of one row, from fused_step_launch's (`rule`, for the same
    `launch`): ONE_ROW_HEADS heads a program for a long cache, where the rule holds fewer for
    its accumulator's sake (its warps then follow the wider program); the rule itself where
    it holds as many, the model has fewer heads or `launch` sets them."""
    from .fused import ATTEND_BLOCK, SHORT_CACHE, fused_step_launch
    given = dict(launch or {})
    if ("attend_heads" in given or max_len <= SHORT_CACHE or rule["attend_heads"] >= ONE_ROW_HEADS
            or config.num_attention_heads < ONE_ROW_HEADS):
        return rule
    return fused_step_launch(config, max_len, {"attend_block": 32, "attend_split": ATTEND_BLOCK, **given,
                                               "attend_heads": ONE_ROW_HEADS})


class LatentDecodeAttention:
    """In place of MLA.absorbed for one new token a row (MLA.decode_attention): W_UK folded
    into the query as the absorbed attention does, then mla_decode_attention over each row's
    own positions. Launch shapes: fused.fused_step_launch's for the model's widths and the
    cache's length (one_row_launch's for one row), `launch` replacing any of them; idle: the
    position of a CUDA-graph bucket's padding rows (attend_latent), -1 for none."""

    def __init__(self, config, max_len: int, launch: dict | None = None, idle: int = -1):
        from .fused import fused_step_launch
        t = fused_step_launch(config, max_len, launch)
        self.launch, self.idle = [int(t[k]) for k in OP_LAUNCH], idle
        one = one_row_launch(config, max_len, t, launch)
        self.one_row = [int(one[k]) for k in OP_LAUNCH]

    def __call__(self, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """q_nope [B, 1, H, N], q_pe [B, 1, H, R], the rows' cache c_kv [B, S, C] and k_pe
        [B, S, R], positions [B, 1] -> o [B, 1, H, V] in q_nope's dtype."""
        B, _, H, _ = q_nope.shape
        w_uk_HNC = attn.kv_b_proj.weight.unflatten(0, (H, -1))[:, : attn.nope_dim]
        # the queries in the cache's dtype, to which the kernel rounds them (fused.FusedDecoder's q_lat)
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope[:, 0], w_uk_HNC.to(q_nope.dtype)).to(c_kv.dtype)
        # B is static in a captured step: each bucket's graph holds its own launch
        launch = self.one_row if B == 1 else self.launch
        o = mla_decode_attention(q_lat, q_pe[:, 0].to(c_kv.dtype), c_kv, k_pe, positions[:, 0], attn.kv_b_proj.weight,
                                 attn.scale, attn.v_dim, launch, self.idle)
        return o.to(q_nope.dtype).view(B, 1, H, attn.v_dim)

    @staticmethod
    def unsupported(config, model=None) -> str | None:
        """Why this model's decode attention cannot take the kernels, or None (an FP8 checkpoint's
        too: its kv_b_proj, the one weight the attention reads, is dequantised at load)."""
        if config.attention_type != "mla":
            return f"attention_type {config.attention_type!r} (MLA only)"
        return None
