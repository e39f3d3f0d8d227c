"""The fused decode step: one new token for each of a few cache rows, every decoder layer in
nine Triton kernels (seven for a dense layer; kernels/decode.py), for batch-1 latency.

A decode step of one sequence reads each weight once and does almost no arithmetic, so its
time is the number of kernels it launches plus how near each comes to the memory bandwidth.
The model's PyTorch forward, even fused by Inductor, is dozens of kernels a layer, many of
them shorter than their launch (benchmarks/results/decode_profile.txt); this step is the
same computation in 9 (see kernels/decode.py for the list): norms recomputed inside the
projections that need them, RoPE and the cache write inside the query kernel, W_UK and W_UV
absorbed inside the query and output kernels, the shared experts as slots of the routed
experts' kernels, the residual adds inside the last projection of each half; each kernel
reads its weights while the one before it runs (programmatic dependent launch). Its twin is
the model's absorbed decode forward (`model(ids, positions=..., cache=...)`); tests compare
the logits.

It reads the model's own parameters (no copies), so it follows weight updates (GRPO) and
runs inside a CUDA graph. Scratch buffers are allocated once, for `max_rows` rows.

Supported: MLA (with a query LoRA as V3's, or without as V2-Lite's) and no attention bias,
SwiGLU dense and MoE layers (sigmoid or softmax routing, group-limited or not, up to 256
routed experts in groups, all powers of two), one token per row; 16- or 32-bit weights, or an
FP8 checkpoint's held FP8 (infer/fp8_weights.py: every layer weight but kv_b_proj float8 with
block scales; the kernels read the float8 bytes and fold the scales into the activations, so a
step reads about half the bytes of BF16's).
`FusedDecoder.unsupported(config)` says why not, and the engine then keeps the model's forward.
"""

from __future__ import annotations

import os

import torch
import triton

from ..config import ModelConfig
from ..hf import SCALE_SUFFIX
from ..kernels import decode as kernels
from ..model import StaticCache, Transformer
from ..model.moe import Experts, MoE, Router
from .latent_attention import LatentDecodeAttention, attend_latent, attention_parts, attention_units, pow2

MAX_EXPERTS = 256   # one program holds a token's E scores for the routing

# Launch shapes follow from the model's widths by one rule: a program streams about
# PROGRAM_ELEMENTS of a weight, WARP_ELEMENTS of them per warp (at most MAX_WARPS warps). At
# bench-1b's widths the rule gives back the fastest shapes benchmarks/fused_decode.py --tune
# found there (benchmarks/results/fused_tuning.json); wider models get fewer rows per program
# instead of more registers per thread, except the MoE down kernel's (DOWN_PROGRAMS below).
WARP_ELEMENTS = 2048
MAX_WARPS = 8
PROGRAM_ELEMENTS = dict(gemv=4096, head=8192, up=4096)
MAX_BLOCK = 2048     # widest row a program loads at once (wider ones are read in chunks)
ATTEND_BLOCK = 64    # cache positions an attention program scores at once (a split is one or more)
SHORT_CACHE = 4096   # caches up to this long score 32 positions at once (bench-1b's tuned shape)
# Attention programs (head blocks x units) a step aims for once the context is long (for up to
# latent_attention.ATTEND_ROWS rows): about one per SM of an H100/H200 (132), each one unit's
# partial sums, H x C float32 values written and read back by the merge. At V3's widths 128
# beat 256 to 1,024 at every context and batch measured (benchmarks/results/h100_attention/).
ATTEND_PROGRAMS = 128
MERGE_SPLITS = 16    # attention splits the merge reads at once
QUERY_CHUNK = 128    # columns of q_b and W_UK the query kernel reads at once: [128, 128] a head, no spill
# Without a query LoRA (V2-Lite) the query kernel only folds W_UK into the loaded query: its
# columns are shared among programs until about this many run (16 heads ran 17 programs, each
# reading 128 KB of W_UK). With a LoRA each share would read q_b again, so there it stays 1.
QUERY_PROGRAMS = 128
# The MoE down kernel's rows per program: about DOWN_PROGRAMS programs over the hidden size,
# each loading at most DOWN_ELEMENTS weights at once; the merge's blocks of V outputs: at most
# OUTPUT_ELEMENTS of W_UV a program (caches up to SHORT_CACHE). Both reproduce the tuned shapes
# at bench-1b's widths (2 rows, 1 block) and at V2-Lite's (4 rows, 4 blocks: 1.20x and 1.04x
# faster steps than 1 row and 1 block on an H100, benchmarks/results/h100_decode_shapes/v2lite_tuned)
DOWN_PROGRAMS = 512
DOWN_ELEMENTS = 65536
OUTPUT_ELEMENTS = 16384
# down_split: the down kernel split over its slots (kernels.moe_down_split_kernel), each program
# a GEMV's tile of about this many weights (the GEMV's fastest at V2-Lite's widths: 4 x 2,048)
DOWN_SPLIT_ELEMENTS = 8192
# up_dot: the up kernel's products on the tensor cores (kernels.moe_up_dot_kernel), rows of a
# program and columns a pipelined step. Compiled for sm_90 on V2-Lite's FP8 experts its loop
# issues 4.7 instructions a weight at 32 rows, 2.8 at 64, the register kernel 7.4
# (benchmarks/results/kernel_resources/fp8_fused_block_scales); off by default until timed
UP_DOT_ROWS, UP_DOT_BLOCK, UP_DOT_WARPS = 32, 256, 4
# up_dot=2 (W8A8, FP8 weights): the FP8 tiles multiplied as they are, which only Hopper's wgmma does
# (64+ rows a warpgroup; mma.sync widens them again): 64 rows, whose loop issues 1.5 instructions
# a weight on V2-Lite's experts against up_dot=1's 2.8 (benchmarks/results/kernel_resources/w8a8_up)
W8A8_ROWS = 64
# attend_tma: the shared memory a Hopper program may take (227 KB), which holds its BF16 queries
# [heads, C + R] once and a [block, C + R] tile of the cache per pipeline stage (64 heads, blocks
# of 64: 2 stages; of 32: 3)
TMA_SHARED = 227 * 1024
# rows of a weight per program (_rows), warps per program (_warps), the least cache positions
# of an attention split, heads per attention program, attention programs aimed for, the
# attention loop's software-pipeline stages, and the block sizes above
LAUNCH_KEYS = ("gemv_rows", "gemv_warps", "head_rows", "head_warps", "query_warps", "attend_split",
               "attend_heads", "attend_block", "attend_programs", "attend_stages", "attend_warps", "output_warps",
               "merge_splits", "route_warps", "up_rows", "up_warps", "down_rows", "down_warps", "max_block", "pdl",
               "attend_transposed", "query_split", "output_split", "down_split", "down_block", "up_dot", "up_block",
               "attend_tma")
# the rows a program of the kernels that read FP8 layer weights
FP8_ROW_KEYS = ("gemv_rows", "up_rows", "down_rows")
# those of the attention over the cache, whose best values depend on the cache's length
ATTENTION_KEYS = tuple(k for k in LAUNCH_KEYS if k.startswith(("attend_", "output_", "merge_")))


def fused_step_launch(config: ModelConfig, max_len: int, launch: dict | None = None,
                      block_rows: int | None = None) -> dict:
    """The fused step's launch shapes for this model and a cache of max_len positions (module
    constants' rule); `launch` replaces any of them (a benchmark's tuning, the interpreter's
    shapes in tests). Every block and warp count is a power of two. block_rows: FP8 weights'
    scale block rows (fp8_layout), which the weight kernels' rows a program may not pass (a
    program's rows take one row of block scales): the rule's are cut to it, given ones past it raise."""
    c, given = config, dict(launch or {})
    unknown = set(given) - set(LAUNCH_KEYS)
    if unknown:
        raise ValueError(f"unknown launch keys {sorted(unknown)}; known: {', '.join(LAUNCH_KEYS)}")
    max_block = given.get("max_block", MAX_BLOCK)

    def warps(elements: int) -> int:
        return min(MAX_WARPS, pow2(max(1, elements // WARP_ELEMENTS)))

    def rows(kind: str, row_elements: int) -> int:
        return max(1, PROGRAM_ELEMENTS[kind] // row_elements)

    H, C, R, N = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim
    D = min(max_block, pow2(c.hidden_size))
    # the down kernel loads [slots, rows, F] at once: an MoE layer's K routed slots of width
    # F, or a dense model's one MLP
    slots, F = ((pow2(c.num_experts_per_tok), c.moe_intermediate_size) if c.is_moe
                else (1, c.intermediate_size))
    F = min(max_block, pow2(F))
    block_s = given.get("attend_block", min(32 if max_len <= SHORT_CACHE else ATTEND_BLOCK,
                                            given.get("attend_split", ATTEND_BLOCK)))
    split = given.get("attend_split", block_s)
    # the running sum over the latent, heads x C float32 values, stays within 8 warps' registers
    # (64 a thread): 32 of V3's heads a program ran 1.2-1.4x faster than 16 from 32K on, 64 do not fit
    heads = given.get("attend_heads", min(pow2(H, 16), max(16, 8 * WARP_ELEMENTS // pow2(C))))
    # the query's column shares (see QUERY_PROGRAMS); the merge's blocks of V outputs and the
    # down kernel's rows (OUTPUT_ELEMENTS, DOWN_PROGRAMS)
    query_split = 1 if c.q_lora_rank else min(pow2(C) // 16, pow2(triton.cdiv(QUERY_PROGRAMS, H)))
    # each block merges the units' partial sums again: few at a short cache (as measured), but
    # at a long one (the engine's attention op past 4,096 positions) as many bytes as W_UV's
    output_split = (max(1, min(pow2(c.v_head_dim) // 16, pow2(c.v_head_dim) * pow2(C) // OUTPUT_ELEMENTS))
                    if max_len <= SHORT_CACHE else 1)
    down_split = given.get("down_split", 0)
    # the columns of a slot the down kernel reads at once (the rest in a loop, or more split programs)
    down_block = given.get("down_block", max_block)
    down_rows = (max(1, DOWN_SPLIT_ELEMENTS // F) if down_split else
                 max(1, min(pow2(c.hidden_size // DOWN_PROGRAMS + 1) // 2, DOWN_ELEMENTS // (slots * F))))
    up_dot = given.get("up_dot", 0)
    up_rows = {0: rows("up", D), 1: UP_DOT_ROWS}.get(up_dot, W8A8_ROWS)
    out = dict(gemv_rows=rows("gemv", D), head_rows=rows("head", D), up_rows=up_rows, up_dot=up_dot,
               up_block=UP_DOT_BLOCK, down_rows=down_rows, attend_split=split, attend_heads=heads, attend_block=block_s,
               attend_programs=ATTEND_PROGRAMS, attend_stages=3, merge_splits=MERGE_SPLITS, max_block=max_block,
               pdl=True, attend_transposed=0, attend_tma=0, query_split=query_split, output_split=output_split,
               down_split=down_split, down_block=down_block)
    if block_rows:
        out.update({k: min(out[k], block_rows) for k in FP8_ROW_KEYS})
        wide = {k: given[k] for k in FP8_ROW_KEYS if given.get(k, 0) > block_rows}
        if wide:
            raise ValueError(f"launch {wide}: FP8 weights in blocks of {block_rows} rows take at most "
                             f"{block_rows} rows a program")
    out.update({k: v for k, v in given.items() if k in out})  # the warps follow the rows given
    out.update(gemv_warps=warps(out["gemv_rows"] * D), head_warps=warps(out["head_rows"] * D),
               up_warps=UP_DOT_WARPS if up_dot else warps(2 * out["up_rows"] * D),
               down_warps=warps(out["down_rows"] * (1 if out["down_split"] else slots)
                                * min(F, out["down_block"])),
               query_warps=warps(N * (c.q_lora_rank or 0) + R * (c.q_lora_rank or 0) + N * C // out["query_split"]),
               attend_warps=warps(block_s * (C + R) + heads * C), output_warps=warps(c.v_head_dim * C // out["output_split"]),
               route_warps=warps(32 * (c.n_routed_experts or 0)))
    if given.get("attend_tma") and "attend_stages" not in given:
        row = 2 * (C + R)  # bytes of one head's query, or one position's cache, in BF16
        out["attend_stages"] = max(1, min(3, (TMA_SHARED - out["attend_heads"] * row) // (out["attend_block"] * row)))
    out.update(given)
    for key, value in out.items():
        not_pow2 = ("pdl", "attend_stages", "attend_programs", "attend_transposed", "attend_tma", "down_split",
                    "up_dot")
        if key not in not_pow2 and (value < 1 or value & (value - 1)):
            raise ValueError(f"launch {key}={value}: must be a power of two")
    if pow2(C) // out["query_split"] < 16 or pow2(c.v_head_dim) // out["output_split"] < 1:
        raise ValueError(f"launch query_split={out['query_split']} / output_split={out['output_split']}: "
                         f"at most {pow2(C) // 16} / {pow2(c.v_head_dim)} for this model's widths")
    for key in ("attend_split", "attend_heads", "attend_block", "down_block"):
        if out[key] < 16:  # tl.dot's smallest block; the reductions' too
            raise ValueError(f"launch {key}={out[key]}: must be at least 16")
    if out["attend_programs"] < 1:
        raise ValueError(f"launch attend_programs={out['attend_programs']}: must be at least 1")
    if out["up_dot"] and min(out["up_rows"], out["up_block"]) < 16:  # tl.dot's smallest block
        raise ValueError(f"launch up_dot with up_rows={out['up_rows']}, up_block={out['up_block']}: "
                         "the tensor-core up kernel takes at least 16 of each")
    for key in ("attend_transposed", "attend_tma", "down_split"):
        if out[key] not in (0, 1):
            raise ValueError(f"launch {key}={out[key]}: must be 0 or 1")
    if out["up_dot"] not in (0, 1, 2):
        raise ValueError(f"launch up_dot={out['up_dot']}: must be 0 (registers), 1 (tensor cores) or 2 "
                         "(tensor cores, W8A8)")
    if out["up_dot"] == 2 and not block_rows:
        raise ValueError("launch up_dot=2 multiplies FP8 weights by an FP8-quantized activation (W8A8); this "
                         "model's weights are not FP8: use up_dot=1")
    if out["attend_tma"]:  # TMA copies whole [block, width] tiles of the latent's halves and the RoPE key
        half = C // 2
        if C % 2 or half & (half - 1) or R & (R - 1) or not 8 <= min(half, R) <= max(half, R) <= 256:
            raise ValueError(f"launch attend_tma=1: the TMA attention takes a latent of twice a power of two and a "
                             f"power-of-two RoPE key, each 8 to 256 wide (half the latent); this model has "
                             f"kv_lora_rank={C}, qk_rope_head_dim={R}: leave attend_tma at 0")
        if out["attend_block"] > 256:
            raise ValueError(f"launch attend_tma=1 with attend_block={out['attend_block']}: a TMA copy is at most "
                             "256 positions")
        if out["attend_transposed"]:
            raise ValueError("launch attend_tma=1 with attend_transposed=1: the TMA attention's dots are heads x "
                             "positions; set one of them")
    if not 1 <= out["attend_stages"] <= 4:
        raise ValueError(f"launch attend_stages={out['attend_stages']}: must be 1 to 4")
    if out["attend_block"] > out["attend_split"]:
        raise ValueError(f"launch attend_block={out['attend_block']} exceeds attend_split={out['attend_split']}")
    return out


def _scale(module) -> torch.Tensor | None:
    """A linear layer's block scales if its weight is FP8 (fp8_weights.FP8Linear), else None."""
    return getattr(module, "weight" + SCALE_SUFFIX, None)


def fp8_layout(model: Transformer) -> tuple[tuple[int, int] | None, str | None]:
    """(The FP8 weights' scale block, or None for 16- or 32-bit weights; why the fused step cannot
    read them, or None). It reads FP8 weights where every weight its kernels read in the decoder
    layers is FP8 (an FP8 checkpoint's; the routers, kv_b_proj, the embedding and the head stay
    16-bit) with one power-of-two block, and several shared experts' chunks start at block rows."""
    from .fp8_weights import DEQUANTIZED, FP8Experts, FP8Linear
    fp8, plain, blocks = [], [], set()
    for layer in model.main_layers:
        for name, m in layer.named_modules():
            if isinstance(m, (FP8Linear, FP8Experts)):
                if m.kernel == "w8a8":
                    return None, f"FP8 weights with W8A8 kernels ({name}; the fused step reads them weight-only)"
                fp8.append(name)
                blocks.add(tuple(m.block))
            elif (isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] not in DEQUANTIZED) or type(m) is Experts:
                plain.append(name)
    if not fp8:
        return None, None
    if plain:
        return None, f"FP8 and 16-bit layer weights mixed ({plain[0]} is not FP8)"
    if len(blocks) > 1:
        return None, f"FP8 weights in blocks of several shapes {sorted(blocks)}"
    (rows, cols), = blocks
    if rows & (rows - 1) or cols & (cols - 1) or rows < 2:
        return None, f"FP8 scale blocks of {rows}x{cols} (powers of two, of at least 2 rows: a RoPE pair's rows " \
                     f"take one scale)"
    if model.config.qk_nope_head_dim % 2:  # (a head's RoPE rows would start at an odd row)
        return None, f"qk_nope_head_dim {model.config.qk_nope_head_dim} with FP8 weights (an even one only)"
    for layer in model.main_layers:
        P, F, shared = FusedDecoder._slots(layer)
        if isinstance(layer.mlp, MoE) and P - layer.mlp.gate.top_k > 1 and F % rows:
            return None, f"shared experts of width {F} in FP8 blocks of {rows} rows (a multiple needed)"
    return (rows, cols), None


def routing_groups(topk_method: str, n_group: int | None) -> int:
    """The groups the routing chooses among: greedy routing ignores them, as moe.Router does."""
    return 1 if topk_method == "greedy" else (n_group or 1)


def route(router: Router, logits_BE: torch.Tensor, idx_BK: torch.Tensor, gate_BK: torch.Tensor,
          rows: int, num_warps: int = 1, **launch) -> None:
    """kernels.moe_route_kernel for the first `rows` rows of the router logits: each row's K
    experts and gates into idx_BK / gate_BK, by the router's own rule."""
    bias = router.e_score_correction_bias
    kernels.moe_route_kernel[(rows,)](
        logits_BE, bias if bias is not None else logits_BE, router.scaling, idx_BK, gate_BK,
        E=router.n_experts, K=router.top_k, G=routing_groups(router.topk_method, router.n_group),
        TOPK_GROUP=router.topk_group, HAS_BIAS=bias is not None, SIGMOID=router.scoring_func == "sigmoid",
        GROUP_TOP2=router.topk_method == "noaux_tc", NORM_TOPK=router.norm_topk_prob,
        num_warps=num_warps, **({"USE_PDL": False} | launch))


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: a Hopper+ GPU, compiled kernels (not the interpreter)
    and a Triton whose launcher takes `launch_pdl`."""
    if device.type != "cuda" or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
        return False  # (griddepcontrol is NVIDIA PTX)
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and \
        torch.cuda.get_device_capability(device)[0] >= 9


class FusedDecoder:
    def __init__(self, model: Transformer, cache: StaticCache, max_rows: int, launch: dict | None = None,
                 idle: int = -1):
        """launch: launch shapes replacing those fused_step_launch derives; idle: the position of
        a CUDA-graph bucket's padding rows, whose attention reads only that position (-1: none)."""
        reason = self.unsupported(model.config, model)
        if reason:
            raise ValueError(f"the fused decode step does not support this model: {reason}")
        self.model, self.cache, self.max_rows, self.idle = model, cache, max_rows, idle
        self.fp8_block = fp8_layout(model)[0]
        self.t = fused_step_launch(model.config, cache.max_len, launch, self.fp8_block and self.fp8_block[0])
        # the kernels' FP8 arguments (the scales' pointers are given per launch)
        self.fp8 = (dict(FP8=True, SB_R=self.fp8_block[0], SB_C=self.fp8_block[1]) if self.fp8_block else {})
        c = self.config = model.config
        dev = model.model.embed_tokens.weight.device
        f32 = dict(dtype=torch.float32, device=dev)
        self.pdl = bool(self.t["pdl"]) and pdl_supported(dev)
        # every launch: the PDL flag for the kernel and, when on, the launch attribute
        self.launch = dict(USE_PDL=self.pdl, **({"launch_pdl": True} if self.pdl else {}))
        rotary = model.model.rotary
        self.inv_freq = rotary.inv_freq.float()  # derived from the config, never trained
        self.rope_factor = float(rotary.attention_factor)
        H, C, R = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        K = c.num_experts_per_tok if c.n_routed_experts else 0
        M = max_rows
        self.h = torch.empty(M, c.hidden_size, dtype=model.model.embed_tokens.weight.dtype, device=dev)
        if self.t["up_dot"] == 2:  # the W8A8 up kernel's quantized activation and its scales (16+ columns each)
            self.x_q = torch.empty(M, c.hidden_size, dtype=torch.float8_e4m3fn, device=dev)
            self.x_s = torch.empty(M, triton.cdiv(c.hidden_size, 16), **f32)
        # per row: q_a (or the query itself, without a query LoRA) then kv_a
        self.qkv = torch.empty(M, (c.q_lora_rank or H * (c.qk_nope_head_dim + R)) + C + R, **f32)
        # the absorbed queries in the cache's dtype: the attention rounds them to it anyway, and with
        # float32 ones a 64-head program spills (benchmarks/kernel_resources.py)
        q16 = dict(dtype=cache.layers[0][0].dtype, device=dev)
        self.q_lat = torch.empty(M, H, C, **q16)
        self.q_pe = torch.empty(M, H, R, **q16)
        # the attention's partial sums: a unit's each, B rows' units at a time
        parts = max(attention_parts(self.t, H, cache.max_len, B) for B in range(1, M + 1))
        self.part_acc = torch.empty(parts, H, C, **f32)
        self.part_m = torch.empty(parts, H, **f32)
        self.part_l = torch.empty(parts, H, **f32)
        self.o = torch.empty(M, H * c.v_head_dim, **f32)
        self.router_logits = torch.empty(M, max(c.n_routed_experts or 0, 1), **f32)
        self.sel_idx = torch.zeros(M, max(K, 1), dtype=torch.int32, device=dev)
        self.sel_gate = torch.zeros(M, max(K, 1), **f32)
        # per row: the slots' SiLU(gate)·up (routed and shared, or a dense layer's one slot)
        self.hmid = torch.empty(M * max(slots * width for slots, width, _ in map(self._slots, model.main_layers)),
                                **f32)
        if self.t["down_split"]:  # its per-slot sums and each d-block's count of them (zero between uses)
            chunks = max(slots * self._chunks(width)[1] for slots, width, _ in map(self._slots, model.main_layers))
            self.down_parts = torch.empty(M, chunks, c.hidden_size, **f32)
            self.down_count = torch.zeros(M, triton.cdiv(c.hidden_size, self.t["down_rows"]), dtype=torch.int32,
                                          device=dev)
        self.logits = torch.empty(M, c.vocab_size, **f32)

    def units(self, B: int) -> int:
        """Attention units a step of B rows aims for (latent_attention.attention_units)."""
        return attention_units(self.t, self.config.num_attention_heads, self.cache.max_len, B)

    @staticmethod
    def unsupported(config: ModelConfig, model: Transformer | None = None) -> str | None:
        """Why this model (its config; and the built model's weights, if given) cannot take
        the fused step, or None: its attention's reasons (LatentDecodeAttention), then its own."""
        why = LatentDecodeAttention.unsupported(config, model)
        if why:
            return why
        if model is not None:
            why = fp8_layout(model)[1]
            if why:
                return why
        c = config
        if c.attention_bias:
            return "attention_bias"
        E = c.n_routed_experts or 0
        G = routing_groups(c.topk_method, c.n_group)
        if E and (E & (E - 1) or G & (G - 1) or E % G):
            return f"{E} routed experts in {G} groups (powers of two, the groups dividing the experts)"
        if E > MAX_EXPERTS:
            return f"{E} routed experts (at most {MAX_EXPERTS})"
        return None

    @torch.no_grad()
    def forward(self, ids_B1: torch.Tensor, positions_B1: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (float32) of one token per cache row 0..B-1 at its position; writes
        each row's latent and RoPE key into the cache there, like the model's forward."""
        B = ids_B1.shape[0]
        if B > self.max_rows:
            raise ValueError(f"{B} rows, but scratch for at most {self.max_rows}")
        m = self.model
        h = self.h[:B]
        torch.index_select(m.model.embed_tokens.weight, 0, ids_B1[:, 0], out=h)
        positions_B = positions_B1[:, 0].contiguous()  # the kernels read row b's at offset b
        for i, layer in enumerate(m.main_layers):
            self._attention(layer, i, h, positions_B)
            self._mlp(layer, h)
        self._gemv(h, m.lm_head.weight, self.logits[:B], norm=m.model.norm, head=True)
        return self.logits[:B]

    # ------------------------------------------------------------------ pieces
    def _gemv(self, x, linear, out, norm=None, linear2=None, residual=None, head=False):
        """out = [norm(x)] @ [weight; weight2]^T (+ residual), the weights of two linear layers
        (FP8 with their block scales, or not: both alike) or a bare weight: kernels.gemv_kernel;
        head: the output head's launch shape (a far taller matrix than a layer's)."""
        weight = getattr(linear, "weight", linear)
        weight2 = getattr(linear2, "weight", linear2)
        s1, s2 = _scale(linear), _scale(linear2)
        # (without a second weight its pointer is never read, but must be a pointer)
        fp8 = dict(s1_ptr=s1, s2_ptr=s1 if s2 is None else s2, **self.fp8) if s1 is not None else {}
        B, K = x.shape
        n1 = weight.shape[0]
        n2 = 0 if weight2 is None else weight2.shape[0]
        block_o = self.t["head_rows" if head else "gemv_rows"]  # rows of the weight per program, all B rows of x
        grid = (triton.cdiv(n1, block_o) + triton.cdiv(n2, block_o),)
        kernels.gemv_kernel[grid](
            x, x.stride(0), B, K, norm.weight if norm is not None else x,
            norm.eps if norm is not None else 0.0,
            weight, n1, weight2 if weight2 is not None else weight, n2,
            residual if residual is not None else out, residual.stride(0) if residual is not None else 0,
            out, out.stride(0),
            HAS_NORM=norm is not None, HAS_RES=residual is not None,
            BLOCK_B=pow2(B), BLOCK_O=block_o, BLOCK_K=min(self.t["max_block"], pow2(K)),
            ONE_CHUNK=K <= self.t["max_block"],
            num_warps=self.t["head_warps" if head else "gemv_warps"], **self.launch, **fp8)

    def _attention(self, layer, i, h, positions_B):
        c, k, a = self.config, kernels, layer.self_attn
        B = h.shape[0]
        lora = c.q_lora_rank is not None
        H, C, R, N, V = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
        Q = c.q_lora_rank if lora else H * (N + R)  # the row's query part: q_a, or the query itself
        qkv = self.qkv[:B]
        self._gemv(h, a.q_a_proj if lora else a.q_proj, qkv, norm=layer.input_layernorm,
                   linear2=a.kv_a_proj_with_mqa)
        ckv, kpe = self.cache.layers[i]
        q_norm = a.q_a_layernorm if lora else a.kv_a_layernorm  # (unread without a query LoRA)
        shares = self.t["query_split"]
        share_c = pow2(C, 16) // shares
        fp8 = dict(sqb_ptr=_scale(a.q_b_proj), **self.fp8) if lora and self.fp8 else {}
        chunk_q = min(QUERY_CHUNK, pow2(Q, 16), *([self.fp8_block[1]] if fp8 else []))
        k.mla_query_kernel[(B, H + 1, shares)](
            qkv, qkv.stride(0), q_norm.weight, a.kv_a_layernorm.weight, q_norm.eps, a.kv_a_layernorm.eps,
            a.q_b_proj.weight if lora else a.kv_b_proj.weight, a.kv_b_proj.weight,
            self.inv_freq, self.rope_factor, positions_B, self.q_lat, self.q_pe, ckv, kpe, ckv.stride(0), kpe.stride(0),
            H, Q, C, N, R, V, CHUNK_Q=chunk_q, CHUNK_C=min(QUERY_CHUNK, share_c),
            BLOCK_N=pow2(N), BLOCK_C=pow2(C), BLOCK_R2=pow2(R // 2), Q_LORA=lora, num_warps=self.t["query_warps"],
            SHARE_C=share_c, **self.launch, **fp8)
        o = self.attend(a, i, positions_B, B)
        self._gemv(o, a.o_proj, h, residual=h)

    def attend(self, attn, i: int, positions_B: torch.Tensor, B: int) -> torch.Tensor:
        """Attention of rows 0..B-1 over layer i's latent cache from the absorbed queries in
        q_lat / q_pe (the cache's dtype) -> o [B, H·V] (float32): latent_attention.attend_latent."""
        ckv, kpe = self.cache.layers[i]
        return attend_latent(self.q_lat, self.q_pe, ckv, kpe, positions_B, attn.kv_b_proj.weight, attn.scale,
                             self.config.v_head_dim, self.t, self.launch, self.idle, self.o,
                             (self.part_acc, self.part_m, self.part_l))

    @staticmethod
    def _slots(layer) -> tuple[int, int, tuple | None]:
        """A layer's expert slots, their width F, and the linear layers (gate, up, down) of the
        shared slots, weights stacked [S·F, D] / [D, S·F]: the K routed experts then the shared
        experts in chunks of F; a dense layer's MLP is one slot of its own width."""
        mlp = layer.mlp
        shared = mlp.shared_experts if isinstance(mlp, MoE) else mlp
        weights = None if shared is None else (shared.gate_proj, shared.up_proj, shared.down_proj)
        if not isinstance(mlp, MoE):
            return 1, weights[0].weight.shape[0], weights
        F = mlp.experts.gate_proj.shape[1]
        return mlp.gate.top_k + (0 if shared is None else weights[0].weight.shape[0] // F), F, weights

    def _chunks(self, F: int) -> tuple[int, int]:
        """A slot's columns as the down kernels read them: blocks of at most down_block (a loop in
        moe_down_kernel, more programs in the split one), and how many."""
        block = min(self.t["down_block"], pow2(F))
        return block, triton.cdiv(F, block)

    def _mlp(self, layer, h):
        """h += the layer's MLP or MoE of RMSNorm(h): router logits (gemv), routing, expert
        gate/up, expert down + combine + residual."""
        k = kernels
        B, D = h.shape
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        P, F, shared = self._slots(layer)
        K = 0
        if isinstance(mlp, MoE):
            router, experts = mlp.gate, mlp.experts
            K = router.top_k
            self._gemv(h, router.weight, self.router_logits[:B], norm=norm)
            route(router, self.router_logits, self.sel_idx, self.sel_gate, B, self.t["route_warps"], **self.launch)
        # (weights, scales) of the routed and the shared slots; the side a layer lacks (routed in a
        # dense layer, shared without shared experts) takes the other's, whose pointers are never read
        if shared is not None:
            shared = tuple(m.weight for m in shared), tuple(_scale(m) for m in shared)
        routed = experts.small_batch_weights()[:2] if K else shared
        (routed, routed_scales), ((sg, su, sd), shared_scales) = routed, shared or routed
        up_fp8 = down_fp8 = {}
        if self.fp8:
            up_fp8 = dict(wgs_ptr=routed_scales[0], wus_ptr=routed_scales[1], sgs_ptr=shared_scales[0],
                          sus_ptr=shared_scales[1], **self.fp8)
            down_fp8 = dict(wds_ptr=routed_scales[2], sds_ptr=shared_scales[2], **self.fp8)
        S = P - K
        hmid = self.hmid[: B * P * F].view(B, P, F)
        rows = self.t["up_rows"]
        if self.t["up_dot"]:
            block = min(self.t["up_block"], pow2(D), self.fp8.get("SB_C", pow2(D)))
            k.moe_up_dot_kernel[(B, P, triton.cdiv(F, rows))](
                h, h.stride(0), norm.weight, norm.eps, D, self.sel_idx, routed[0], routed[1], sg, su, F, hmid,
                hmid.stride(0), K=K, BLOCK_F=rows, BLOCK_D=block, BLOCK_X=min(self.t["max_block"], pow2(D)),
                STAGES=3, HALF=h.dtype != torch.float32, num_warps=self.t["up_warps"], **self.launch, **up_fp8,
                **(dict(W8A8=True, xq_ptr=self.x_q, xs_ptr=self.x_s, stride_xq=self.x_q.stride(0),
                        stride_xs=self.x_s.stride(0)) if self.t["up_dot"] == 2 else {}))
        else:
            k.moe_up_kernel[(B, P, triton.cdiv(F, rows))](
                h, h.stride(0), norm.weight, norm.eps, D, self.sel_idx, routed[0], routed[1], sg, su, F, hmid,
                hmid.stride(0), K=K, BLOCK_F=rows, BLOCK_D=min(self.t["max_block"], pow2(D)),
                ONE_CHUNK=D <= self.t["max_block"],
                num_warps=self.t["up_warps"], **self.launch, **up_fp8)
        rows = self.t["down_rows"]
        if self.t["down_split"]:
            block_f, chunks = self._chunks(F)
            k.moe_down_split_kernel[(P * chunks, triton.cdiv(D, rows), B)](
                h, h.stride(0), self.sel_idx, self.sel_gate, routed[2], F, sd, S * F, D, hmid, hmid.stride(0),
                self.down_parts, self.down_count, chunks, P * chunks, K=K, BLOCK_D=rows, BLOCK_F=block_f,
                BLOCK_Q=pow2(P * chunks), num_warps=self.t["down_warps"], **self.launch, **down_fp8)
            return
        k.moe_down_kernel[(B, triton.cdiv(D, rows))](
            h, h.stride(0), self.sel_idx, self.sel_gate, routed[2], F, sd, S * F, D, hmid, hmid.stride(0),
            K=K, HAS_SHARED=S > 0, BLOCK_P=pow2(max(K, 1)), BLOCK_D=rows, BLOCK_F=self._chunks(F)[0],
            BLOCK_FS=min(2 * self.t["down_block"], pow2(max(S * F, 1))), num_warps=self.t["down_warps"],
            **self.launch, **down_fp8)
