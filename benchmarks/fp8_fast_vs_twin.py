"""Where the fast FP8 path and its emulated twin part ways, GEMM by GEMM, and a tiny model's
loss (GPU). Prints one line per case: the relative error of the fast result against
the twin on the same quantized operands, and which kernel took it (cuBLAS or Triton).

    python benchmarks/fp8_fast_vs_twin.py [--out DIR]

The GEMM sweep crosses sizes that are multiples of 128, of 16 only, and smaller than 128,
since cuBLAS's block-scaled path and the Triton kernels split the shapes between them, and
⌈K/128⌉ of 2, 3, 5 (where cuBLAS needs the padded 128x128 scale layout). The model part gives
one forward's loss difference only: a tiny model with a router is chaotic (a 1e-6 change of its
embedding moves a BF16 run's expert gradients by ~20%), so gradients are compared op by op, in
tests/test_fp8.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import nanoseek
from nanoseek.fp8 import gemm
from nanoseek.fp8.convert import Fp8Config, convert_to_fp8
from nanoseek.fp8.quant import ACT_TILE, WEIGHT_BLOCK, dequantize, quantize, quantize_tokens


def rel(fast: torch.Tensor, twin: torch.Tensor) -> float:
    fast, twin = fast.double(), twin.double()
    return ((fast - twin).norm() / twin.norm().clamp_min(1e-30)).item()


def sum_err(fast, twin, a, b) -> float:
    """The largest |fast - twin| in units of that output's Σ|a·b|: the accumulation error
    (the tensor cores keep ~14 bits of a running sum inside each 128-long K block)."""
    mag = dequantize(a).abs() @ dequantize(b).abs().t()
    return ((fast - twin).abs() / mag.clamp_min(1e-30)).max().item()


def gemm_sweep() -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"cuBLAS 128x128 scale layout: {gemm.cublas_recipe(torch.device('cuda'))}")
    for M in (128, 200):
        for K in (48, 128, 160, 192, 256, 384, 512, 576, 2048):
            for N in (40, 128, 192, 256, 576, 1024):
                a = quantize(torch.randn(M, K, device="cuda", generator=g), ACT_TILE)
                for kind, b in (("act x block", quantize(torch.randn(N, K, device="cuda", generator=g), WEIGHT_BLOCK)),
                                ("act x act", quantize(torch.randn(N, K, device="cuda", generator=g), ACT_TILE))):
                    # the dgrad shape: the weight's blocks transposed
                    cases = [(kind, b)]
                    if kind == "act x block":
                        wt = quantize(torch.randn(K, N, device="cuda", generator=g), WEIGHT_BLOCK).t()
                        cases.append(("act x block^T", wt))
                    for name, bb in cases:
                        if bb.data.shape[1] != a.data.shape[1]:
                            continue
                        fast = gemm.scaled_mm(a, bb, torch.float32, fast=True)
                        twin = gemm.scaled_mm(a, bb, torch.float32, fast=False)
                        rows.append({"gemm": name, "M": M, "K": K, "N": bb.data.shape[0],
                                     "kernel": "cublas" if gemm.cublas_takes(a, bb) else "triton",
                                     "rel_err": rel(fast, twin), "sum_err": sum_err(fast, twin, a, bb)})
    # the wgrad shape: both operands along the tokens
    for M in (64, 128, 300):
        for C in (40, 192, 256):
            dy, x = torch.randn(M, C, device="cuda", generator=g), torch.randn(M, 256, device="cuda", generator=g)
            qa, qb = quantize_tokens(dy), quantize_tokens(x)
            fast = gemm.scaled_mm(qa, qb, torch.float32, fast=True)
            twin = gemm.scaled_mm(qa, qb, torch.float32, fast=False)
            rows.append({"gemm": "wgrad tokens", "M": C, "K": M, "N": 256,
                         "kernel": "cublas" if gemm.cublas_takes(qa, qb) else "triton", "rel_err": rel(fast, twin)})
    return rows


def model_loss_rel(hidden: int, inter: int) -> float:
    """One training forward of a tiny model, fast kernels vs twin: the loss's relative difference."""
    cfg = nanoseek.preset("tiny", hidden_size=hidden, moe_intermediate_size=inter, vocab_size=256)
    torch.manual_seed(0)
    fast, twin = nanoseek.Transformer(cfg).cuda(), nanoseek.Transformer(cfg).cuda()
    twin.load_state_dict(fast.state_dict())
    convert_to_fp8(fast, device="cuda")
    convert_to_fp8(twin, Fp8Config(backend="emulated"), device="cuda")
    ids = torch.randint(0, 256, (2, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast_loss, twin_loss = (m.train()(ids, labels=ids).loss.item() for m in (fast, twin))
    return abs(fast_loss - twin_loss) / abs(twin_loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    rows = gemm_sweep()
    bad = [r for r in rows if r["rel_err"] > 2 ** -8]
    print(f"GEMM sweep: {len(rows)} cases, {len(bad)} with rel. error > 2^-8")
    worst = sorted(rows, key=lambda r: -r.get("sum_err", 0))[:8]
    for r in bad + worst:
        print(f"  {r['gemm']:15s} M={r['M']:4d} K={r['K']:4d} N={r['N']:4d} {r['kernel']:6s} rel {r['rel_err']:.3e}"
              f" max/Σ|ab| {r.get('sum_err', float('nan')):.3e}")
    result = {"gemm": rows, "model_loss_rel": {}}
    for hidden, inter in ((256, 128), (512, 256)):
        result["model_loss_rel"][f"{hidden}x{inter}"] = loss_rel = model_loss_rel(hidden, inter)
        print(f"model hidden {hidden} moe {inter}: loss rel. diff {loss_rel:.2e}")
    with open(os.path.join(args.out, "fp8_fast_vs_twin.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
