"""FP8 weight-only linear layers at decode rows: `fp8_weight_linear` as the engine calls it
(kernels/fp8_linear.py: the GEMV at one row, past it the tensor-core kernel with K split where
few programs would run) against the tensor-core kernel unsplit, and against BF16
(cuBLAS) on the same weights dequantized, at DeepSeek-V2-Lite's and V3's projection shapes.

Each call is captured in a CUDA graph over enough copies of the weight to exceed the L2 cache
(a decode step reads every weight once), the replays timed by CUDA events; the weight's bytes
over that time, against the measured copy bandwidth. Every output is checked against the
float64 product of the same FP8 weights. Then the projections at a prefill chunk's rows
(prefill_rows: dequantized by torch or in one pass then cuBLAS, W8A8, BF16), a SwiGLU's gate and
up at one row in one launch against two (swiglu_rows), and one token's routed experts, each way
compiled as a batch-1 decode step runs them (experts_row).

    python benchmarks/fp8_gemv.py [--rows 1 4 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import copy_bandwidth, environment, graph_us, write_json  # noqa: E402

from nanoseek import preset  # noqa: E402
from nanoseek.hf import dequantize_fp8_blockwise, quantize_fp8_blockwise  # noqa: E402
from nanoseek.kernels import fp8_linear  # noqa: E402

L2_BYTES = 200 * 2**20  # more than an H100's or H200's L2 (50 / 60 MB), so no call finds its weight there


def projections(name: str) -> dict[str, tuple[int, int]]:
    """Name -> (N, K) of the linear layers a decode step runs per layer (FP8Linear's)."""
    c = preset(name)
    H, C, R, N, V, D = (c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim,
                        c.v_head_dim, c.hidden_size)
    S = c.n_shared_experts * c.moe_intermediate_size
    out = {"q_a_proj": (c.q_lora_rank, D), "q_b_proj": (H * (N + R), c.q_lora_rank)} if c.q_lora_rank else \
        {"q_proj": (H * (N + R), D)}
    return {**out, "kv_a_proj": (C + R, D), "o_proj": (D, H * V), "shared gate": (S, D), "shared down": (D, S),
            "dense up": (c.intermediate_size, D), "dense down": (D, c.intermediate_size)}


def dot_kernel(x, w, scale):
    """The tensor-core kernel of fp8_weight_linear without a split over K: a program per 64
    outputs walks all of K."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_n = min(fp8_linear.BLOCK_N, 128)
    fp8_linear.fp8_weight_linear_kernel[(triton.cdiv(N, block_n), 1)](
        x, w, scale, y, M, N, K, x.stride(0), y.stride(0), scale.shape[1], triton.cdiv(K, 128), 0,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=128, SCALE_ROWS=128, PRECISION="tf32",
        num_warps=4)
    return y


def path(M: int, N: int, K: int) -> str:
    """What fp8_weight_linear runs for M rows of an N x K weight (128x128 blocks)."""
    if fp8_linear.takes_gemv(M, N, K, (128, 128)):
        return "gemv"
    shares, _ = fp8_linear.k_shares(N, K, (128, 128))
    return f"tensor-core kernel, K in {shares} shares" if shares > 1 else "tensor-core kernel"


# prefill_rows' ways: FP8Linear's kernel choice for each (None: BF16 cuBLAS on the BF16 weight)
PREFILL_WAYS = {"fp8 dequantized, cuBLAS": "twin", "fp8 one-pass dequantized, cuBLAS": "auto", "fp8 w8a8": "w8a8",
                "bf16 cuBLAS": None}


def prefill_rows(name: str, device: torch.device, repeat: int, rows: list[int]) -> list[dict]:
    """FP8Linear past the GEMV's rows (a prefill's chunk): the weight dequantized by torch then
    cuBLAS (the twin), dequantized in one pass by kernels/fp8_linear.fp8_dequantize then cuBLAS
    (what kernel "auto" runs there), W8A8 (activations in 1x128 FP8 tiles, cuBLAS's blockwise
    FP8 GEMM on Hopper: DeepSeek-V3's own inference), and BF16 cuBLAS on resident BF16 weights."""
    from nanoseek.fp8.gemm import cublas_recipe
    from nanoseek.infer.fp8_weights import FP8Linear
    cublas_recipe(device)  # probed before any capture
    out = []
    for proj, (N, K) in projections(name).items():
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
        fp8 = FP8Linear(lin, (128, 128), "twin").requires_grad_(False)
        w16 = fp8.dequantized_weight()
        for M in rows:
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            row = {"preset": name, "projection": proj, "N": N, "K": K, "rows": M}
            with torch.no_grad():
                want = (x.double() @ w16.double().T)
                for way, kernel in PREFILL_WAYS.items():
                    fp8.kernel = kernel or "twin"
                    fn = (lambda: x @ w16.T) if kernel is None else (lambda: fp8(x))
                    row[f"{way}_error"] = float((fn().double() - want).abs().max() / want.abs().max())
                    us = graph_us(fn, repeat, calls=4)
                    row[f"{way}_us"], row[f"{way}_TFLOPs"] = us, 2 * M * N * K / (us * 1e-6) / 1e12
            print(f"{name} {proj} {N}x{K} rows {M}: " + ", ".join(
                f"{way} {row[f'{way}_us']:.1f} us ({row[f'{way}_TFLOPs']:.0f} TFLOP/s, err {row[f'{way}_error']:.1e})"
                for way in PREFILL_WAYS), flush=True)
            out.append(row)
    return out


def swiglu_rows(name: str, device: torch.device, bandwidth: float, repeat: int) -> list[dict]:
    """A SwiGLU's gate and up at one row (the shared experts, a dense layer's MLP): fp8_swiglu_gemv
    (one launch, both FP8 weights) against two FP8 GEMVs and the product, and BF16 cuBLAS."""
    c = preset(name)
    D = c.hidden_size
    out = []
    for part, N in (("shared", c.n_shared_experts * c.moe_intermediate_size), ("dense", c.intermediate_size)):
        pairs = [quantize_fp8_blockwise(torch.randn(N, D) * D ** -0.5) for _ in range(2)]
        copies = max(1, -(-L2_BYTES // (2 * N * D)))
        ws = [[(w.to(device), s.to(device)) for w, s in pairs] for _ in range(copies)]
        w16 = [[dequantize_fp8_blockwise(w, s).to(device, torch.bfloat16) for w, s in pairs]
               for _ in range(max(1, copies // 2))]
        x = torch.randn(1, D, device=device).to(torch.bfloat16)

        def fused(i):
            (wg, sg), (wu, su) = ws[i % copies]
            return fp8_linear.fp8_swiglu_gemv(x, wg, sg, wu, su, [128, 128])

        def two(i):
            (wg, sg), (wu, su) = ws[i % copies]
            g = fp8_linear.fp8_weight_linear(x, wg, sg, [128, 128])
            return F.silu(g) * fp8_linear.fp8_weight_linear(x, wu, su, [128, 128])

        def bf16(i):
            wg, wu = w16[i % len(w16)]
            return F.silu(x @ wg.T) * (x @ wu.T)
        row = {"preset": name, "mlp": part, "N": N, "K": D}
        want = fused(0).double()
        for way, fn, calls, nbytes in (("fp8 swiglu gemv", fused, copies, 2 * N * D),
                                       ("fp8 two gemvs", two, copies, 2 * N * D),
                                       ("bf16 cuBLAS", bf16, len(w16), 4 * N * D)):
            row[f"{way}_difference"] = float((fn(0).double() - want).abs().max() / want.abs().max())
            it = iter(range(10**9))
            us = graph_us(lambda fn=fn, it=it: fn(next(it)), repeat, calls=calls)
            row[f"{way}_us"], row[f"{way}_bandwidth_fraction"] = us, nbytes / (us * 1e-6) / bandwidth
        print(f"{name} {part} gate+up {N}x{D}, 1 row: " + ", ".join(
            f"{way} {row[f'{way}_us']:.1f} us ({row[f'{way}_bandwidth_fraction']:.0%})"
            for way in ("fp8 swiglu gemv", "fp8 two gemvs", "bf16 cuBLAS")), flush=True)
        out.append(row)
    return out


def experts_row(name: str, device: torch.device, bandwidth: float, repeat: int) -> dict:
    """One decode token's routed experts (the gathered forward, as a compiled batch-1 step runs it)
    four ways: BF16 experts in Inductor's one-row reductions, the same with the down projection
    by the GEMV (the "gather_gemv" path), the FP8 experts through fp8_experts_gemv, and the FP8
    experts dequantized in the step (Inductor fuses the dequantization into its reductions).
    Each call takes the next K experts, so a capture of E / K calls reads them all, past L2."""
    from nanoseek.infer.fp8_weights import FP8Experts
    from nanoseek.model.moe import Experts
    c = preset(name)
    E, F, D, K = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size, c.num_experts_per_tok
    with torch.device("meta"):
        bf16 = Experts(E, D, F)
    for n in ("gate_proj", "up_proj", "down_proj"):  # made in BF16 on the GPU: V3's are 45 GB in float32
        shape = getattr(bf16, n).shape
        setattr(bf16, n, torch.nn.Parameter(torch.randn(shape, device=device, dtype=torch.bfloat16).mul_(
            shape[-1] ** -0.5), requires_grad=False))
    fp8 = FP8Experts(bf16, (128, 128), "auto")
    calls = E // K
    x = torch.randn(1, D, device=device).to(torch.bfloat16)
    route = torch.rand(1, K, device=device)
    idxs = [torch.arange(i * K, (i + 1) * K, device=device)[None] for i in range(calls)]
    row = {"preset": name, "experts": E, "expert_width": F, "hidden": D, "top_k": K}
    want = None
    with torch.no_grad():
        for way, fn, kernel in (("bf16", bf16.forward_gathered, None),
                                ("bf16, down by the GEMV", bf16.forward_gathered_gemv, None),
                                ("fp8 experts GEMV", fp8.forward_gathered, "auto"),
                                ("fp8 dequantized in the step", fp8.forward_gathered, "twin")):
            fp8.kernel = kernel or fp8.kernel  # each way's step is compiled and timed before the next
            step = torch.compile(fn, fullgraph=True, dynamic=False, options={"coordinate_descent_tuning": True})
            got = step(x, route, idxs[0]).double()
            want = got if want is None else want
            row[f"{way}_difference_from_bf16"] = float((got - want).abs().max() / want.abs().max())
            it = iter(range(10**9))
            us = graph_us(lambda step=step, it=it: step(x, route, idxs[next(it) % calls]), repeat, calls=calls)
            nbytes = 3 * K * F * D * (2 if way.startswith("bf16") else 1)
            row[f"{way}_us"], row[f"{way}_bandwidth_fraction"] = us, nbytes / (us * 1e-6) / bandwidth
    print(f"{name} routed experts, 1 token x {K}: " + ", ".join(
        f"{way} {row[f'{way}_us']:.1f} us ({row[f'{way}_bandwidth_fraction']:.0%})"
        for way in ("bf16", "bf16, down by the GEMV", "fp8 experts GEMV", "fp8 dequantized in the step")), flush=True)
    del bf16, fp8
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["deepseek-v2-lite", "deepseek-v3"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefill-rows", nargs="*", type=int, default=[512, 2048],
                    help="rows of a prefill chunk: FP8Linear dequantized vs W8A8 vs BF16 (none: skip)")
    ap.add_argument("--no-experts", dest="experts", action="store_false",
                    help="skip one token's routed experts (the gathered forward, compiled, four ways)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemv: times CUDA kernels; run it on a GPU")
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    rows_out = []
    for name in args.presets:
        for proj, (N, K) in projections(name).items():
            w, scale = quantize_fp8_blockwise(torch.randn(N, K))
            w64 = dequantize_fp8_blockwise(w, scale).double()
            copies = max(1, -(-L2_BYTES // (N * K)))
            ws = [w.to(device) for _ in range(copies)]
            scale = scale.to(device)
            w16 = dequantize_fp8_blockwise(w, scale.cpu()).to(device, torch.bfloat16)
            w16s = [w16] + [w16.clone() for _ in range(max(1, -(-L2_BYTES // (2 * N * K))) - 1)]
            for M in args.rows:
                x = torch.randn(M, K, device=device).to(torch.bfloat16)
                want = x.double().cpu() @ w64.T
                ways = {"fp8_weight_linear": lambda i, x=x: fp8_linear.fp8_weight_linear(x, ws[i % copies], scale,
                                                                                        [128, 128]),
                        "tensor-core kernel unsplit": lambda i, x=x: dot_kernel(x, ws[i % copies], scale),
                        "bf16 cuBLAS": lambda i, x=x: x @ w16s[i % len(w16s)].T}
                row = {"preset": name, "projection": proj, "N": N, "K": K, "rows": M, "fp8_bytes": N * K,
                       "fp8_weight_linear_path": path(M, N, K)}
                for way, fn in ways.items():
                    got = fn(0).double().cpu()
                    row[f"{way}_error"] = float((got - want).abs().max() / want.abs().max())
                    calls = copies if way != "bf16 cuBLAS" else len(w16s)
                    it = iter(range(10**9))
                    us = graph_us(lambda fn=fn, it=it: fn(next(it)), args.repeat, calls=calls)
                    nbytes = N * K * (2 if way == "bf16 cuBLAS" else 1)
                    row[f"{way}_us"] = us
                    row[f"{way}_bandwidth_fraction"] = nbytes / (us * 1e-6) / bandwidth
                rows_out.append(row)
                print(f"{name} {proj} {N}x{K} rows {M} ({row['fp8_weight_linear_path']}): " + ", ".join(
                    f"{way} {row[f'{way}_us']:.1f} us ({row[f'{way}_bandwidth_fraction']:.0%}, err "
                    f"{row[f'{way}_error']:.1e})" for way in ways if f"{way}_us" in row), flush=True)
    prefill = [r for name in args.presets for r in prefill_rows(name, device, args.repeat, args.prefill_rows)]
    swiglu = [r for name in args.presets for r in swiglu_rows(name, device, bandwidth, args.repeat)]
    experts = [experts_row(name, device, bandwidth, args.repeat) for name in args.presets] if args.experts else []
    written = write_json({"benchmark": "fp8_gemv", **environment(), "copy_bandwidth_GBps": bandwidth / 1e9,
                          "rows": rows_out, "prefill": prefill, "swiglu": swiglu, "experts": experts},
                         "fp8_gemv.json")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
