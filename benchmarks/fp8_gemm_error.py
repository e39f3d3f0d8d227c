"""FP8 GEMM accumulation error: the promotion every 128 of K (V3 §3.3.2) against none.

The operands are quantized once (1x128 tiles for a, 128x128 blocks for b, nanoseek/fp8) and
the exact reference is the float64 product of the dequantized values, so only accumulation
error is measured (not quantization error). Rows, per K:

    twin                 float32 products and sums (the CPU's emulation)
    blockwise            torch._scaled_mm with 1x128 / 128x128 scales (cuBLAS): scales applied,
                         and partial sums promoted to float32, every 128 of K
    Triton               nanoseek's grouped kernel (the experts' path), the same promotion
    tensorwise, fast     torch._scaled_mm with one scale per tensor and use_fast_accum=True:
                         the whole K summed in the tensor cores' accumulator (~14 bits on
                         Hopper), V3's "limited accumulation precision" case
    tensorwise           the same with use_fast_accum=False (cuBLAS promotes on its own)

Error: max |out - exact| / max |exact| over the [M, N] output; every row outputs float32, so
no BF16 rounding hides the accumulation's.

    python benchmarks/fp8_gemm_error.py [--m 1024 --n 1024 --ks 512,2048,4096,8192,16384]
    python benchmarks/fp8_gemm_error.py --smoke     the CPU: the twin only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from nanoseek.fp8 import dequantize, gemm, quantize  # noqa: E402
from nanoseek.fp8.quant import ACT_TILE, FP8_MAX, WEIGHT_BLOCK  # noqa: E402


def tensorwise(x: torch.Tensor):
    scale = (x.abs().amax() / FP8_MAX).float()
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def rows_for(a, b, device, smoke: bool) -> dict:
    qa, qb = quantize(a, ACT_TILE), quantize(b, WEIGHT_BLOCK)
    exact = dequantize(qa).double() @ dequantize(qb).double().t()
    runs = {"twin": lambda: gemm.scaled_mm(qa, qb, torch.float32, fast=False)}
    if not smoke:
        from nanoseek.fp8.kernels import grouped_mm_fp8
        offs = torch.tensor([a.shape[0]], dtype=torch.int32, device=device)
        runs["blockwise"] = lambda: gemm.scaled_mm(qa, qb, torch.float32, fast=True)
        runs["Triton"] = lambda: grouped_mm_fp8(qa.data, qa.scale, qb.data[None], qb.scale[None], offs,
                                                torch.float32)
        (ta, sa), (tb, sb) = tensorwise(a), tensorwise(b)
        # the tensorwise rows have their own (coarser) quantization: their exact product is theirs
        exact_t = (ta.double() * sa.double()) @ (tb.double() * sb.double()).t()
        for name, fast in (("tensorwise, fast", True), ("tensorwise", False)):
            runs[name] = (lambda fast=fast: torch._scaled_mm(ta, tb.t(), scale_a=sa, scale_b=sb,
                                                            out_dtype=torch.float32, use_fast_accum=fast), exact_t)
    out = {}
    for name, run in runs.items():
        fn, ref = run if isinstance(run, tuple) else (run, exact)
        err = (fn().double() - ref).abs().max() / ref.abs().max()
        out[name] = float(err)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--ks", default="512,2048,4096,8192,16384")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    smoke = device.type == "cpu"
    if smoke:
        args.m, args.n, args.ks = 128, 128, "512,2048"
    g = torch.Generator(device=device).manual_seed(0)
    table = {}
    for K in map(int, args.ks.split(",")):
        # positive-mean operands: a long sum grows, which is where a short accumulator loses bits
        a = torch.randn(args.m, K, device=device, generator=g).abs() + 0.1
        b = torch.randn(args.n, K, device=device, generator=g).abs() + 0.1
        table[K] = rows_for(a, b, device, smoke)
        print(f"K={K:6d}  " + "  ".join(f"{k}: {v:.2e}" for k, v in table[K].items()), flush=True)
    result = {"benchmark": "fp8_gemm_error", **environment(), "m": args.m, "n": args.n,
              "relative_max_error": table, "command": " ".join(sys.argv)}
    print(f"wrote {write_json(result, 'fp8_gemm_error' + ('_smoke' if smoke else '') + '.json')}")


if __name__ == "__main__":
    main()
