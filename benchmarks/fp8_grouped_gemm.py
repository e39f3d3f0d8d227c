"""The experts' GEMMs alone at a model's real shapes: FP8 (nanoseek/fp8's Triton kernels)
against BF16 (torch._grouped_mm), one GEMM at a time, with the quantizations apart.

A training step's expert GEMMs per MoE layer and micro-batch, for M = tokens x top-k routed
rows over E experts of width F and hidden size D (routing uniform at random):

    fprop  x [M, D] . W_gate[e]^T -> [M, F]     (up the same; down: h [M, F] . W_down[e]^T)
    dgrad  dh [M, F] . W_gate[e] -> [M, D]
    wgrad  dh^T . x over each expert's rows -> [E, F, D], float32 in FP8 (V3's FP32 gradients)

And inference's: a prefill of an FP8 checkpoint, its experts' weights read in place by the
weight-only kernel, against the BF16 model's weights and against dequantizing every expert first.

Each row: FP8's relative error against BF16 (a check that both compute the same product), the
median time by CUDA events after warm-up (the first calls autotune the Triton kernels),
TFLOP/s, the fraction of the GEMM ceilings measured in the same run (an 8192^3 BF16 matmul;
an 8192^3 blockwise FP8 _scaled_mm), and FP8's speed over BF16's. The quantization
rows time what the FP8 GEMMs need first, the activations' tiles by the quantizer compiled as a
training step compiles it; the launch shape the autotuner chose per (N, K) is
recorded.

    python benchmarks/fp8_grouped_gemm.py [--preset deepseek-v2-lite --tokens 4096]
    python benchmarks/fp8_grouped_gemm.py --smoke    the CPU: tiny shapes, each op once, no timing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, rel_err, time_cuda, write_json  # noqa: E402

from nanoseek import preset  # noqa: E402
from nanoseek.fp8 import gemm  # noqa: E402
from nanoseek.fp8.quant import ACT_TILE, WEIGHT_BLOCK, dequantize, first_tiles, quantize, quantize_tokens  # noqa: E402


def problem(cfg, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random activations, weights and a uniform random routing at the model's expert shapes."""
    g = torch.Generator().manual_seed(seed)
    E, k, D, F_ = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    M = tokens * k
    counts = torch.bincount(torch.randint(0, E, (M,), generator=g), minlength=E)
    t = {"x": torch.randn(M, D, generator=g), "h": torch.randn(M, F_, generator=g),
         "dh": torch.randn(M, F_, generator=g),
         "w_gate": torch.randn(E, F_, D, generator=g) / D**0.5, "w_down": torch.randn(E, D, F_, generator=g) / F_**0.5}
    t = {name: v.to(device, dtype) for name, v in t.items()}
    t["offsets"] = counts.cumsum(0).to(device, torch.int32)
    return {"E": E, "M": M, "D": D, "F": F_, **t}


def ops(p: dict, fast: bool) -> dict[str, dict]:
    """name -> (flops, bf16 fn, fp8 fn, its quantization fn) of each GEMM."""
    x, h, dh, wg, wd, offs = p["x"], p["h"], p["dh"], p["w_gate"], p["w_down"], p["offsets"]
    E, M, D, F_ = p["E"], p["M"], p["D"], p["F"]
    out = x.dtype
    xq, hq, dhq = (quantize(t, ACT_TILE) for t in (x, h, dh))
    # the activations' 1x128 quantizer as a training step runs it: inside its compiled graph
    # (eager torch takes several passes over the tensor; Inductor fuses them into one)
    tiles = torch.compile(quantize, dynamic=False) if fast else quantize
    wgq, wdq = quantize(wg, WEIGHT_BLOCK), quantize(wd, WEIGHT_BLOCK)
    wgq_t = wgq.t()
    dh_T, x_T = quantize_tokens(dh, offs, fast), quantize_tokens(x, offs, fast)
    grouped = torch._grouped_mm
    first = first_tiles(offs)
    return {
        # inference: an FP8 checkpoint's experts in a prefill, the weights read in place by the
        # weight-only kernel (no activation quantization), against the BF16 model's resident
        # weights and against dequantizing every expert first (FP8Experts' path before)
        "prefill gate, FP8 weights in place": dict(
            flops=2 * M * F_ * D, bf16=lambda: grouped(x, wg.transpose(-2, -1), offs=offs),
            fp8=lambda: weight_only(x, wgq, offs, first, fast), quantize=lambda: None,
            dequantized=lambda: grouped(x, dequantize(wgq).to(x.dtype).transpose(-2, -1), offs=offs)),
        "fprop gate (x . W_gate^T)": dict(
            flops=2 * M * F_ * D, bf16=lambda: grouped(x, wg.transpose(-2, -1), offs=offs),
            fp8=lambda: gemm.grouped_mm(xq, wgq, offs, out, fast), quantize=lambda: tiles(x, ACT_TILE)),
        "fprop down (h . W_down^T)": dict(
            flops=2 * M * D * F_, bf16=lambda: grouped(h, wd.transpose(-2, -1), offs=offs),
            fp8=lambda: gemm.grouped_mm(hq, wdq, offs, out, fast), quantize=lambda: tiles(h, ACT_TILE)),
        "dgrad gate (dh . W_gate)": dict(
            flops=2 * M * D * F_, bf16=lambda: grouped(dh, wg, offs=offs),
            fp8=lambda: gemm.grouped_mm(dhq, wgq_t, offs, torch.float32, fast),
            quantize=lambda: tiles(dh, ACT_TILE)),
        "wgrad gate (dh^T . x per expert)": dict(
            flops=2 * M * F_ * D, bf16=lambda: grouped(dh.t(), x, offs=offs),
            fp8=lambda: gemm.grouped_mm_tokens(dh_T, x_T, offs, E, torch.float32, fast),
            quantize=lambda: (quantize_tokens(dh, offs, fast), quantize_tokens(x, offs, fast))),
    }


def weight_only(x, wq, offs, first, fast: bool):
    """x · (the FP8 weights with their block scales)^T per group: the Triton kernel on a GPU,
    the dequantized float32 product on the CPU (the kernel's twin)."""
    if fast:
        from nanoseek.fp8.kernels import grouped_mm_fp8_weight
        return grouped_mm_fp8_weight(x, wq.data, wq.scale, offs, first)
    return torch._grouped_mm(x, dequantize(wq).transpose(-2, -1), offs=offs)


def chosen_configs() -> dict:
    """The launch shape the Triton autotuner kept for each (N, K) it met."""
    from nanoseek.fp8 import kernels
    return {tuner: {str(key): str(config) for key, config in getattr(getattr(kernels, tuner), "cache", {}).items()}
            for tuner in ("_grouped_tuned", "_tokens_tuned")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="deepseek-v2-lite")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of one micro-batch (M = tokens x top-k)")
    ap.add_argument("--smoke", action="store_true", help="the CPU, the tiny preset, 64 tokens, each op once")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    if args.smoke:
        args.preset, args.tokens = "tiny", 64
    cfg = preset(args.preset)
    p = problem(cfg, args.tokens, device, torch.bfloat16 if gpu else torch.float32)
    if gpu:
        from train_throughput import gemm_ceilings
        ceilings = {k: v / 1e12 for k, v in gemm_ceilings(device).items()}
    rows = {}
    for name, op in ops(p, fast=gpu).items():
        # the pair computes the same product: FP8's error against BF16 (or float32 on the CPU)
        # is its quantization's, a few percent; a wrong pairing would be ~100%
        try:
            op["quantize"]()
            row = {"flops": op["flops"], "fp8_rel_err": rel_err(op["fp8"](), op["bf16"]())}
        except (RuntimeError, ValueError) as e:  # one shape a kernel refuses: say so, time the others
            rows[name] = {"flops": op["flops"], "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{name}: {rows[name]['error']}")
            continue
        if row["fp8_rel_err"] > 0.1:
            raise SystemExit(f"{name}: FP8 differs from BF16 by {row['fp8_rel_err']:.1%} of its norm")
        if not gpu:  # each op once: the script's shapes and calls hold
            rows[name] = row
            continue
        for kind in ("bf16", "fp8", "quantize"):
            row[f"{kind}_ms"] = time_cuda(op[kind], warmup=3, repeat=20)["median_ms"]
        for kind in ("bf16", "fp8"):
            row[f"{kind}_tflops"] = op["flops"] / row[f"{kind}_ms"] / 1e9
            row[f"{kind}_of_ceiling"] = row[f"{kind}_tflops"] / ceilings[kind]
        if "dequantized" in op:
            row["dequantized_ms"] = time_cuda(op["dequantized"], warmup=3, repeat=20)["median_ms"]
            row["fp8_vs_dequantized"] = row["dequantized_ms"] / row["fp8_ms"]
        row["fp8_vs_bf16"] = row["bf16_ms"] / row["fp8_ms"]
        row["fp8_with_quantize_vs_bf16"] = row["bf16_ms"] / (row["fp8_ms"] + row["quantize_ms"])
        rows[name] = row
    print(f"{args.preset}: E={p['E']} experts, M={p['M']} routed rows ({args.tokens} tokens), D={p['D']}, "
          f"F={p['F']}, on {device}")
    if gpu:
        print(f"GEMM ceilings measured: bf16 {ceilings['bf16']:.0f}, fp8 {ceilings['fp8']:.0f} TFLOP/s")
        print(f"{'':34s} {'bf16 ms':>8s} {'TFLOP/s':>8s} {'ceil':>5s} {'fp8 ms':>8s} {'TFLOP/s':>8s} {'ceil':>5s} "
              f"{'quant ms':>8s} {'fp8/bf16':>8s} {'w/ quant':>8s}")
        for name, r in rows.items():
            if "error" in r:
                continue
            print(f"{name:34s} {r['bf16_ms']:8.3f} {r['bf16_tflops']:8.0f} {r['bf16_of_ceiling']:5.0%} "
                  f"{r['fp8_ms']:8.3f} {r['fp8_tflops']:8.0f} {r['fp8_of_ceiling']:5.0%} {r['quantize_ms']:8.3f} "
                  f"{r['fp8_vs_bf16']:7.2f}x {r['fp8_with_quantize_vs_bf16']:7.2f}x")
            if "dequantized_ms" in r:
                print(f"{'':34s} dequantizing every expert first: {r['dequantized_ms']:.3f} ms, the FP8 weights in "
                      f"place {r['fp8_vs_dequantized']:.2f}x faster")
    result = {"benchmark": "fp8_grouped_gemm", **environment(), "preset": args.preset, "tokens": args.tokens,
              "shape": {k: p[k] for k in ("E", "M", "D", "F")}, "smoke": args.smoke, "rows": rows,
              "gemm_ceilings_tflops": ceilings if gpu else None, "triton_configs": chosen_configs() if gpu else None,
              "command": " ".join(sys.argv)}
    path = write_json(result, f"fp8_grouped_gemm_{args.preset}{'_smoke' if args.smoke else ''}.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
