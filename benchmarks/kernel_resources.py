"""What a Hopper GPU would run, without one: the grouped FP8 kernels (nanoseek/fp8/kernels.py) per
launch shape their autotuners may pick, and the MLA decode attention (nanoseek/kernels/decode.py) at
the launch the engine derives for V2-Lite's and V3's widths, compiled for sm_90 by the ptxas that
ships with Triton.

Each row: registers a thread and spill stack (from cuobjdump's resource usage), shared memory, how
many programs an SM holds by registers, by shared memory and by warps (the least of them is the
occupancy), and counts in the PTX that say which path the compiler took: wgmma (Hopper's
warpgroup MMA) or mma.sync (Ampere's), cp.async (pipelined pointer loads) or TMA copies. Device
time is scarce; this shows on any machine whether a change keeps the loop on the fast path, spills
or loses occupancy before it is timed. The device's Triton may be older than the one here, so its
code can differ in detail.

    python benchmarks/kernel_resources.py [--candidates] [--attention]   (writes kernel_resources.json to $OUT,
                                                                         else benchmarks/results)
    python benchmarks/kernel_resources.py --attention-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.tools.tensor_descriptor import TensorDescriptor

try:
    from triton._C.libtriton import native_specialize_impl
except ImportError:
    native_specialize_impl = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from nanoseek.fp8 import kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
REGISTERS, SHARED, MAX_WARPS = 65536, 233472, 64  # an H100/H200 SM: registers, shared bytes, resident warps
PTX = {"wgmma": r"wgmma\.mma_async", "mma.sync": r"\bmma\.sync", "cp.async": r"cp\.async\.(?:ca|cg)",
       "tma": r"cp\.async\.bulk\.tensor"}

# the kernels' pointer and integer arguments as Triton types
GROUPED = {"a_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "b_ptr": "*fp8e4nv", "sb_ptr": "*fp32", "c_ptr": "*bf16",
           "ends_ptr": "*i32", "first_tile_ptr": "*i64", "N": "i32", "K": "i32", "E": "i32"}
TOKENS = {"a_ptr": "*fp8e4nv", "sa_ptr": "*fp32", "b_ptr": "*fp8e4nv", "sb_ptr": "*fp32", "c_ptr": "*fp32",
          "first_tile_ptr": "*i64", "N": "i32", "K": "i32", "P": "i32", "T": "i32"}
# the integers V2-Lite's expert GEMMs pass at a 2,048-token prefill (the shape the H100 tuned for):
# N and K its expert widths, E its experts, P the padded token rows (a multiple of 128); T, M unset
# (a tile count and a token count with no divisibility to rely on)
EXPERT_VALUES = {"N": 1408, "K": 2048, "E": 64, "P": 14336}


def specialize(value: int) -> tuple[str, object]:
    """How Triton's launcher specializes an integer argument: ("constexpr", 1) for 1, (type, "D")
    for a multiple of 16, else (type, ""); its own function where this Triton has it."""
    if native_specialize_impl is None:  # older Triton: the same rule
        return ("constexpr", 1) if value == 1 else ("i32", "D" if value % 16 == 0 else "")
    return native_specialize_impl(BaseBackend, value, False, True, True)[:2]


def compile_for_hopper(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int,
                       values: dict | None = None):
    """fn compiled for sm_90: Triton's CompiledKernel (asm: ttgir, ptx, cubin). Specialized as a
    launch would be: pointers 16-byte aligned (as torch allocates), and each integer in `values`
    as Triton's launcher treats it (1 becomes a constant, a multiple of 16 is marked divisible,
    which lets masks and strides keep vector loads: without it a [64, 512] tile's loads go one
    element at a time and are not pipelined)."""
    values = values or {}
    # in the kernel's argument order, which attrs' indices count in (a pointer may follow constexprs)
    names = [name for name in fn.arg_names if name in signature]
    attrs, constants = {}, {}
    for i, name in enumerate(names):
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in values:
            kind, spec = specialize(values[name])
            if kind == "constexpr":
                constants[name] = spec
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    kinds = {**signature, **{name: "constexpr" for name in {**constexprs, **constants}}}
    sig = {name: kinds[name] for name in fn.arg_names if name in kinds}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs={**constexprs, **constants}, attrs=attrs),
                          target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})


def cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resources(compiled, num_warps: int) -> dict:
    """Registers, spill stack, shared memory, programs an SM, the PTX counts and the machine
    instructions (SASS, static: a loop's body counts once) of one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump()), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(cuobjdump()), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    shared = compiled.metadata.shared
    warp_regs = -(-regs * 32 // 256) * 256  # allocated per warp in 256-register units
    per_sm = {"by_registers": REGISTERS // (warp_regs * num_warps), "by_shared": SHARED // (shared + 1024),
              "by_warps": MAX_WARPS // num_warps}
    ptx = compiled.asm["ptx"]
    return {"registers": regs, "spill_stack_bytes": stack, "shared_bytes": shared, "programs_per_sm": per_sm,
            "occupancy_programs": min(per_sm.values()),
            "ptx": {name: len(re.findall(pattern, ptx)) for name, pattern in PTX.items()},
            "sass_instructions": len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[@A-Z]", sass)),
            "loop_sass_instructions": loop_instructions(sass)}


def loop_instructions(sass: str) -> int:
    """Machine instructions in the main loop's body: of the innermost loops (from a backward
    branch's target to the branch, holding no other such span), the one with the most tensor-core
    instructions, else the longest; 0 without a loop. What a program issues per trip. Innermost,
    as TMA kernels wrap their main loop in a span of barrier waits; by its products, as the W8A8
    up kernel's quantization loop before it is longer."""
    code = [(int(a, 16), rest) for a, rest in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([@A-Z].*)", sass)]
    spans = []
    for addr, rest in code:
        branch = re.match(r"(?:@!?U?P\w+\s+)?BRA\b.*?0x([0-9a-f]+)", rest)
        if branch and int(branch.group(1), 16) < addr:
            spans.append((int(branch.group(1), 16), addr))
    innermost = [(t, e) for t, e in spans if not any((t, e) != (t2, e2) and t <= t2 and e2 <= e for t2, e2 in spans)]
    def body(t, e):
        return [rest for a, rest in code if t <= a <= e]
    return max(((sum("MMA" in x for x in body(t, e)), len(body(t, e))) for t, e in innermost), default=(0, 0))[1]


def rows(only: str | None = None) -> list[dict]:
    """Every launch shape of the grouped forward/dgrad kernel (W8A8 and weight-only) and of the
    weight-gradient kernel (overwriting and adding into a gradient), as the autotuners list them;
    only: the grouped W8A8 kernel at that launch (e.g. "64x128 w4 s3")."""
    out = []
    for a_scaled in (True, False):
        signature = {**GROUPED, "a_ptr": "*fp8e4nv" if a_scaled else "*bf16"}
        for config in kernels._grouped_tuned.configs:
            if only and (launch_name(config) != only or not a_scaled):
                continue
            constexprs = {"EP": 64, "BLOCK": 128, **config.kwargs, "A_SCALED": a_scaled}
            k = compile_for_hopper(kernels.grouped_mm_kernel, signature, constexprs, config.num_warps,
                                   config.num_stages, EXPERT_VALUES)
            out.append({"kernel": "grouped_mm " + ("W8A8" if a_scaled else "weight-only"),
                        "config": launch_name(config), **resources(k, config.num_warps)})
    for accumulate in (False, True) if only is None else ():
        for config in kernels._tokens_tuned.configs:
            k = compile_for_hopper(kernels.grouped_mm_tokens_kernel, TOKENS,
                                   {"BLOCK": 128, **config.kwargs, "ACCUMULATE": accumulate}, config.num_warps,
                                   config.num_stages, EXPERT_VALUES)
            out.append({"kernel": "wgrad" + (", adding into .grad" if accumulate else ""),
                        "config": launch_name(config), **resources(k, config.num_warps)})
    return out


ATTEND = {"qlat_ptr": "*bf16", "qpe_ptr": "*bf16", "ckv_ptr": "*bf16", "kpe_ptr": "*bf16", "stride_ckv": "i32",
          "stride_kpe": "i32", "pos_ptr": "*i64", "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
          "scale": "fp32", "H": "i32", "C": "i32", "R": "i32", "B": "i32", "SPLIT": "i32", "UNITS": "i32",
          "IDLE": "i32", "HEAD_BLOCKS": "i32"}


# mla_attend_tma_kernel's: the descriptors in place of the cache pointers' ints
ATTEND_TMA = {**{k: v for k, v in ATTEND.items() if k not in ("C", "R")}, "ckv_ptr": "*bf16", "kpe_ptr": "*bf16"}

# launches beside the rule's: 64 heads a program (wgmma's rows) at the block and stages that fit
# an SM's shared memory, and the TMA kernel (attend_tma), as benchmarks/attention.py --sweep times them
ATTEND_CANDIDATES = {
    "deepseek-v3": [dict(attend_heads=64, attend_block=32, attend_stages=2, attend_warps=8),
                    dict(attend_heads=64, attend_block=16, attend_stages=2, attend_warps=8),
                    dict(attend_tma=1, attend_heads=64, attend_block=64, attend_stages=2, attend_warps=8),
                    dict(attend_tma=1, attend_heads=64, attend_block=32, attend_stages=3, attend_warps=8)]}


def attention_rows(max_len: int = 32768) -> list[dict]:
    """mla_attend_kernel as attend_latent launches it for a BF16 cache of max_len positions at 1 and
    16 rows, plain and with the transposed product (attend_transposed), per model's widths, its
    integers those attend_latent passes (no padding row: idle -1); then ATTEND_CANDIDATES' launches."""
    from nanoseek import preset
    from nanoseek.infer.fused import fused_step_launch
    from nanoseek.infer.latent_attention import attend_warps_stages, attention_units, pow2
    from nanoseek.kernels.decode import mla_attend_kernel, mla_attend_tma_kernel
    out = []
    for name in ("deepseek-v2-lite", "deepseek-v3"):
        cfg = preset(name)
        H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        for given in [None] + ATTEND_CANDIDATES.get(name, []):
            t = fused_step_launch(cfg, max_len, given)
            for rows_b in (1, 16):
                launch = attend_warps_stages(t, rows_b, C)
                values = {"stride_ckv": max_len * C, "stride_kpe": max_len * R, "H": H, "C": C, "R": R,
                          "B": rows_b, "SPLIT": t["attend_split"], "UNITS": attention_units(t, H, max_len, rows_b),
                          "IDLE": -1, "HEAD_BLOCKS": triton.cdiv(H, t["attend_heads"])}
                for transposed in (False, True) if given is None else (False,):
                    common = {"BLOCK_H": t["attend_heads"], "BLOCK_S": t["attend_block"], "BLOCK_B": pow2(rows_b, 2),
                              "DOT_PRECISION": "tf32", "USE_PDL": True}
                    if t["attend_tma"]:
                        descs = {"ckv_desc": f"tensordesc<bf16[{t['attend_block']}, {C // 2}]>",
                                 "kpe_desc": f"tensordesc<bf16[{t['attend_block']}, {R}]>"}
                        k = compile_for_hopper(mla_attend_tma_kernel, {**ATTEND_TMA, **descs},
                                               {**common, "HALF": C // 2, "R": R}, launch["num_warps"],
                                               launch["num_stages"], values)
                    else:
                        k = compile_for_hopper(mla_attend_kernel, ATTEND,
                                               {**common, "BLOCK_C": pow2(C, 16), "BLOCK_R": pow2(R, 16),
                                                "TRANSPOSED": transposed}, launch["num_warps"], launch["num_stages"],
                                               values)
                    out.append({"kernel": ("candidate: " if given else "") + f"MLA attend, {name}, {rows_b} row"
                                          + ("s" if rows_b > 1 else "") + (", transposed" if transposed else "")
                                          + (", TMA" if t["attend_tma"] else ""),
                                "config": f"{t['attend_heads']}h x {t['attend_block']} w{launch['num_warps']} "
                                          f"s{launch['num_stages']}",
                                **resources(k, launch["num_warps"])})
    return out


PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.int32: "*i32", torch.int64: "*i64",
       torch.float8_e4m3fn: "*fp8e4nv"}
FUSED_KERNELS = ("gemv_kernel", "mla_query_kernel", "mla_attend_kernel", "mla_attend_tma_kernel", "mla_output_kernel",
                 "moe_route_kernel", "moe_up_kernel", "moe_up_dot_kernel", "moe_down_kernel", "moe_down_split_kernel")


def recorded_launches(module, names, run) -> list[tuple]:
    """The launches of `module`'s kernels `names` while run() runs (on meta tensors): (kernel, grid,
    arguments, keyword arguments), recorded instead of run."""
    launches, kernels = [], {name: getattr(module, name) for name in names}

    class Recorded:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, grid, args, kwargs))
    try:
        for name, fn in kernels.items():
            setattr(module, name, Recorded(fn))
        run()
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)
    return launches


def fused_step_launches(cfg, rows: int, max_len: int, launch: dict | None = None, fp8: bool = False) -> list[tuple]:
    """Every kernel launch of one fused decode step (fused.FusedDecoder.forward) of a BF16 model
    of cfg's shape built on the meta device; launch: over the rule's shapes; fp8: its layer weights
    FP8 in 128x128 blocks, as an official checkpoint's."""
    from nanoseek.infer.fp8_weights import quantize_weights
    from nanoseek.infer.fused import FusedDecoder
    from nanoseek.kernels import decode
    from nanoseek.model import StaticCache, Transformer
    meta = torch.device("meta")
    with meta:
        model = Transformer(cfg).to(torch.bfloat16).eval()
    if fp8:
        quantize_weights(model)
    cache = StaticCache(cfg, rows, max_len, dtype=torch.bfloat16, device=meta)
    ids = torch.zeros(rows, 1, dtype=torch.long, device=meta)
    return recorded_launches(decode, FUSED_KERNELS,
                             lambda: FusedDecoder(model, cache, rows, launch).forward(ids, ids.clone()))


def compile_launch(fn, grid, args, kwargs) -> dict:
    """A recorded launch compiled for sm_90 as Triton's launcher would specialize it: tensors as
    pointers, integers as i32 values, constexprs (and the defaults not given) as given; its
    resources, warps and programs."""
    signature, constexprs, values = {}, {}, {}
    for i, param in enumerate(fn.params):
        arg = args[i] if i < len(args) else kwargs.get(param.name, param.default)
        if param.is_constexpr or arg is None:
            constexprs[param.name] = arg
        elif isinstance(arg, torch.Tensor):
            signature[param.name] = PTR[arg.dtype]
        elif isinstance(arg, TensorDescriptor):
            signature[param.name] = f"tensordesc<{PTR[arg.base.dtype][1:]}{list(arg.block_shape)}>"
        elif isinstance(arg, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name], values[param.name] = "i32", arg
    warps = kwargs.get("num_warps", 4)
    k = compile_for_hopper(fn, signature, constexprs, warps, kwargs.get("num_stages", 3), values)
    return {"warps": warps, "programs": math.prod(grid), "constexprs": constexprs, "values": values,
            **resources(k, warps)}


def launch_row(label: str, launch: tuple) -> dict:
    """A recorded launch compiled for sm_90 as a table row: its label, warps and programs, and
    its resources."""
    r = compile_launch(*launch)
    r.pop("constexprs"), r.pop("values")
    return {"kernel": label, "config": f"w{r.pop('warps')}, {r.pop('programs')} programs", **r}


def meta_weight(*shape, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight on the meta device: FP8 with its 128x128 block scales, or BF16 and None."""
    if not scaled:
        return torch.empty(shape, dtype=torch.bfloat16, device="meta"), None
    blocks = (-(-shape[-2] // 128), -(-shape[-1] // 128))
    return (torch.empty(shape, dtype=torch.float8_e4m3fn, device="meta"),
            torch.empty(*shape[:-2], *blocks, dtype=torch.float32, device="meta"))


def gemv_rows(label: str, run) -> list[dict]:
    """fp8_linear.gemv's launches while run() calls it on meta tensors, compiled for sm_90."""
    from nanoseek.kernels import fp8_linear
    out = []
    for launch in recorded_launches(fp8_linear, ("fp8_weight_gemv_kernel",), run):
        r = compile_launch(*launch)
        c = r.pop("constexprs")
        r.pop("values")
        out.append({"kernel": label, "config": f"{c['BLOCK_N']}x{c['BLOCK_K']} w{r.pop('warps')}, "
                                               f"{r.pop('programs')} programs", **r})
    return out


FUSED_PRESETS = ("deepseek-v2-lite", "deepseek-v3")


def fused_step_rows(launch: dict | None = None, max_len: int = 4096, fp8: bool = False,
                    presets=FUSED_PRESETS) -> list[dict]:
    """The fused decode step's kernels as FusedDecoder launches them at one row for V2-Lite's and
    V3's widths (a dense and an MoE layer; each distinct launch once), launch over the rule's;
    fp8: on FP8 weights."""
    from nanoseek import preset
    out = []
    for name in presets:
        c = preset(name, num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
        seen = set()
        for fn, grid, args, kwargs in fused_step_launches(c, 1, max_len, launch, fp8):
            key = (fn.__name__, str(sorted(kwargs.items())), str([a for a in args if not isinstance(a, torch.Tensor)]))
            if key in seen:
                continue
            seen.add(key)
            out.append(launch_row(f"fused step{' FP8' if fp8 else ''}, {name}: {fn.__name__}",
                                  (fn, grid, args, kwargs)))
    return out


def decode_rows(max_len: int = 4096) -> list[dict]:
    """The fused decode step's kernels as FusedDecoder launches them at one row for V2-Lite's and
    V3's widths (a dense and an MoE layer; each distinct launch once), and the FP8 weight-only GEMV
    (kernels/fp8_linear.py) at one row on their projections, their MLPs' gate and up together and one
    token's routed experts, as fp8_weight_linear, fp8_swiglu_gemv and fp8_experts_gemv launch it."""
    from nanoseek import preset
    from nanoseek.kernels import fp8_linear
    out = fused_step_rows(max_len=max_len)
    for name in ("deepseek-v2-lite", "deepseek-v3"):
        c = preset(name, num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
        lora = c.q_lora_rank is not None
        H, C, R, N, V = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
        D = c.hidden_size
        projections = {"q_a_proj" if lora else "q_proj": (c.q_lora_rank if lora else H * (N + R), D),
                       "kv_a_proj": (C + R, D), "o_proj": (D, H * V), "dense up": (c.intermediate_size, D),
                       "dense down": (D, c.intermediate_size)}
        meta = dict(device="meta")
        bf16, f32 = dict(dtype=torch.bfloat16, **meta), dict(dtype=torch.float32, **meta)
        for proj, (rows_n, cols_k) in projections.items():
            w, sc = meta_weight(rows_n, cols_k)
            out += gemv_rows(f"FP8 GEMV, 1 row, {name} {proj} {rows_n}x{cols_k}", lambda w=w, sc=sc: fp8_linear.gemv(
                torch.empty(1, w.shape[1], **bf16), w, sc, torch.empty(1, w.shape[0], **bf16), (128, 128)))
        for proj, rows_n in (("shared", c.n_shared_experts * c.moe_intermediate_size), ("dense", c.intermediate_size)):
            (wg, sg), (wu, su) = meta_weight(rows_n, D), meta_weight(rows_n, D)
            out += gemv_rows(f"FP8 SwiGLU GEMV, 1 row, {name} {proj} gate+up {rows_n}x{D}", lambda: fp8_linear.gemv(
                torch.empty(1, D, **bf16), wg, sg, torch.empty(1, rows_n, **bf16), (128, 128), w2=wu, s2=su))
        E, F, K = c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
        idx, route = torch.empty(K, dtype=torch.int64, **meta), torch.empty(K, **f32)
        (wg, sg), (wu, su), (wd, sd) = meta_weight(E, F, D), meta_weight(E, F, D), meta_weight(E, D, F)
        out += gemv_rows(f"FP8 experts GEMV, 1 token, {name} gate+up {F}x{D} x{K}", lambda: fp8_linear.gemv(
            torch.empty(1, D, **bf16), wg, sg, torch.empty(K, F, **bf16), (128, 128), K, K, w2=wu, s2=su, idx=idx))
        for kind, (wd, sd) in (("FP8", (wd, sd)), ("BF16", meta_weight(E, D, F, scaled=False))):
            out += gemv_rows(f"{kind} experts GEMV, 1 token, {name} down {D}x{F} x{K}", lambda wd=wd, sd=sd:
                             fp8_linear.gemv(torch.empty(K, F, **bf16), wd, sd, torch.empty(K, D, **f32),
                                             (128, 128) if sd is not None else (D, F), K, idx=idx, route=route))
    return out


def batch_rows(tokens: int = 32, rows: int = 4) -> list[dict]:
    """The kernels of a decode step past one row at V2-Lite's and V3's widths: the small-batch
    experts (kernels/moe.py) for `tokens` tokens on BF16 and on FP8 weights, and the FP8
    tensor-core linear (fp8_weight_linear past one row) at `rows` rows on kv_a_proj and o_proj,
    and the one-pass dequantization of a prefill's FP8 linear, as their launchers launch them on
    meta tensors."""
    from nanoseek import preset
    from nanoseek.kernels import fp8_linear, moe
    out, meta = [], dict(device="meta")
    f32 = dict(dtype=torch.float32, **meta)
    for name in ("deepseek-v2-lite", "deepseek-v3"):
        c = preset(name)
        E, F, D, K = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size, c.num_experts_per_tok
        x = torch.empty(tokens, D, dtype=torch.bfloat16, **meta)
        idx, gate = torch.empty(tokens, K, dtype=torch.int64, **meta), torch.empty(tokens, K, **f32)
        launch = [moe.SMALL_BATCH_EXPERTS_LAUNCH[part][k] for part, keys in
                  (("up", ("block_f", "block_d", "warps", "stages")), ("down", ("block_d", "block_f", "warps", "stages")))
                  for k in keys]
        for kind, dtype in (("BF16", torch.bfloat16), ("FP8", torch.float8_e4m3fn)):
            (wg, sg), (wu, su), (wd, sd) = (meta_weight(*shape, scaled=kind == "FP8")
                                            for shape in ((E, F, D), (E, F, D), (E, D, F)))
            block = [128, 128] if kind == "FP8" else []
            run = lambda w=(wg, wu, wd), s=(sg, su, sd), block=block: moe._small_batch_experts._init_fn(  # noqa: E731
                x, idx, gate, *w, launch, *s, block)
            for launch_ in recorded_launches(moe, ("expert_up_kernel", "expert_down_kernel"), run):
                out.append(launch_row(f"small-batch experts, {tokens} tokens, {name} {kind}: {launch_[0].__name__}",
                                      launch_))
        H = c.num_attention_heads
        for proj, (N, K_) in (("kv_a_proj", (c.kv_lora_rank + c.qk_rope_head_dim, D)), ("o_proj", (D, H * c.v_head_dim))):
            w, sc = meta_weight(N, K_)
            xr = torch.empty(rows, K_, dtype=torch.bfloat16, **meta)
            run = lambda w=w, sc=sc, xr=xr: fp8_linear.fp8_weight_linear._init_fn(xr, w, sc, [128, 128])  # noqa: E731
            out += [launch_row(f"FP8 linear, {rows} rows, {name} {proj} {N}x{K_}", launch_)
                    for launch_ in recorded_launches(fp8_linear, ("fp8_weight_linear_kernel",), run)]
    # a prefill's FP8 linear past the kernels' rows: its weight dequantized in one pass (V3's o_proj)
    w, sc = meta_weight(7168, 16384)
    run = lambda: fp8_linear.fp8_dequantize._init_fn(w, sc, [128, 128], torch.bfloat16)  # noqa: E731
    return out + [launch_row("FP8 dequantize, deepseek-v3 o_proj 7168x16384", launch_)
                  for launch_ in recorded_launches(fp8_linear, ("fp8_dequantize_kernel",), run)]


def candidate_rows() -> list[dict]:
    """The TMA-loading candidates that benchmarks/fp8_kernel_probe.py times against the kernel."""
    from fp8_kernel_probe import grouped_mm_tma_kernel
    out = []
    for warp_specialize in (False, True):
        for config in kernels._grouped_tuned.configs:
            if warp_specialize and config.num_warps != 4:
                continue
            constexprs = {"EP": 64, "BLOCK": 128, **config.kwargs, "WARP_SPECIALIZE": warp_specialize}
            pointers = {name: kind for name, kind in GROUPED.items() if kind.startswith("*")}
            signature = {**pointers, "M": "i32", "N": "i32", "K": "i32", "E": "i32"}  # its argument order
            k = compile_for_hopper(grouped_mm_tma_kernel, signature, constexprs, config.num_warps, config.num_stages,
                                   EXPERT_VALUES)
            out.append({"kernel": "candidate: TMA loads" + (", warp-specialized" if warp_specialize else ""),
                        "config": launch_name(config), **resources(k, config.num_warps)})
    return out


def launch_name(config: triton.Config) -> str:
    blocks = "x".join(str(v) for v in config.kwargs.values())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", action="store_true", help="also the probe's TMA-loading candidates")
    ap.add_argument("--attention", action="store_true", help="also the MLA decode attention at real widths")
    ap.add_argument("--only", help='the grouped W8A8 kernel at one launch shape, e.g. "64x128 w4 s3"')
    ap.add_argument("--attention-only", action="store_true", help="the MLA decode attention alone")
    ap.add_argument("--decode", action="store_true",
                    help="also the fused step's query kernel and the FP8 GEMV at real widths")
    ap.add_argument("--decode-only", action="store_true", help="those alone")
    ap.add_argument("--batch-only", action="store_true",
                    help="the small-batch experts and the FP8 tensor-core linear past one row, alone")
    ap.add_argument("--fused-step", metavar="JSON",
                    help='the fused step\'s kernels alone with this launch over the rule\'s, e.g. \'{"down_split": 1}\'')
    ap.add_argument("--fp8", action="store_true", help="with --fused-step: the layer weights in FP8")
    ap.add_argument("--preset", action="append", choices=FUSED_PRESETS,
                    help="with --fused-step: this model's widths only (repeatable; default both)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels are Python, not compiled
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (the kernels must compile, not interpret)")
    alone = args.attention_only or args.decode_only or args.batch_only or args.fused_step
    table = [] if alone else rows(args.only) + (candidate_rows() if args.candidates else [])
    table += (fused_step_rows(json.loads(args.fused_step), fp8=args.fp8, presets=args.preset or FUSED_PRESETS)
              if args.fused_step else [])
    table += attention_rows() if args.attention or args.attention_only else []
    table += decode_rows() if args.decode or args.decode_only else []
    table += batch_rows() if args.decode or args.batch_only else []
    print(f"{'kernel':46s} {'launch':18s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} {'per SM':>6s} "
          f"{'wgmma':>5s} {'mma.sync':>8s} {'cp.async':>8s} {'tma':>4s} {'SASS':>6s} {'loop':>5s}")
    for r in table:
        print(f"{r['kernel']:46s} {r['config']:18s} {r['registers']:4d} {r['spill_stack_bytes']:5d} "
              f"{r['shared_bytes'] / 1024:7.1f} {r['occupancy_programs']:6d} {r['ptx']['wgmma']:5d} "
              f"{r['ptx']['mma.sync']:8d} {r['ptx']['cp.async']:8d} {r['ptx']['tma']:4d} {r['sass_instructions']:6d} "
              f"{r['loop_sass_instructions']:5d}")
    write_json({"benchmark": "kernel_resources", **environment(), "triton": triton.__version__, "target": "sm_90",
                "rows": table, "command": " ".join(sys.argv)}, "kernel_resources.json")


if __name__ == "__main__":
    main()
