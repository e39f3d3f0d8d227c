"""What the grouped FP8 Triton kernel's launch shapes compile to, and how fast each runs: each
launch shape of nanoseek/fp8/kernels.py's grouped_mm_kernel compiled for one real shape, with
what the compiler made of it and its time.

For each (mode, launch shape), on DeepSeek-V2-Lite's gate projection at a 2,048-token chunk
(12,288 routed rows over 64 experts; the same rows as one group for the dense case):
- registers, spills and shared memory per program, and counts in the PTX of the instructions
  that say whether the loop runs on Hopper's path: wgmma (warpgroup MMA) against mma.sync
  (Ampere's), cp.async / TMA copies (pipelined loads) against plain global loads;
- the median time of 10 back-to-back launches (CUDA events, after warm-up), TFLOP/s and the
  fraction of the measured FP8 ceiling.
Peers in the same run: torch._grouped_mm in BF16 and cuBLAS's blockwise _scaled_mm on the dense
shape; and a candidate, the same kernel with its operand tiles loaded by TMA descriptors (Hopper's
tensor memory accelerator: no per-element pointers, ~60 fewer registers a thread, so three
programs an SM instead of two at 64x128).

    python benchmarks/fp8_kernel_probe.py            (a GPU; writes fp8_kernel_probe.json)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cuda, write_json  # noqa: E402
from fp8_grouped_gemm import problem  # noqa: E402
from kernel_resources import PTX  # noqa: E402

from nanoseek import preset  # noqa: E402
from nanoseek.fp8 import gemm, kernels  # noqa: E402
from nanoseek.fp8.quant import ACT_TILE, TILE, WEIGHT_BLOCK, first_tiles, quantize  # noqa: E402

_tile_rows = kernels._tile_rows


@triton.jit
def grouped_mm_tma_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, ends_ptr, first_tile_ptr, M, N, K, E,
                          EP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          WARP_SPECIALIZE: tl.constexpr = False):
    """kernels.grouped_mm_kernel (W8A8) with a's and b's tiles loaded through TMA descriptors. A
    tile's rows past its group's end hold the next group's tokens and a column block past N the
    next expert's rows: both are computed and not stored; past the tensors' ends TMA reads zeros.
    WARP_SPECIALIZE: Triton splits the loop into a warp that issues the loads and warps that
    multiply, where the compiler supports it (Triton >= 3.5 on Hopper)."""
    pid_n = tl.program_id(0)
    tile = tl.program_id(1) // (BLOCK // BLOCK_M)
    part = tl.program_id(1) % (BLOCK // BLOCK_M)
    e, row0, end = _tile_rows(ends_ptr, first_tile_ptr, tile, E, EP, BLOCK)
    row0 = (row0 + part * BLOCK_M).to(tl.int32)
    if row0 < end:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < end, cols < N
        nk = tl.cdiv(K, BLOCK)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK])
        sb_block = sb_ptr + (e.to(tl.int64) * tl.cdiv(N, BLOCK) + pid_n * BLOCK_N // BLOCK) * nk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in tl.range(0, nk, warp_specialize=WARP_SPECIALIZE):
            a = a_desc.load([row0, kb * BLOCK])
            b = b_desc.load([e * N + pid_n * BLOCK_N, kb * BLOCK])
            sa = tl.load(sa_ptr + rows * nk + kb, mask=row_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (sa * tl.load(sb_block + kb))[:, None]
        tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def events_ms(fn) -> float:
    """Median ms of one call over 10 back-to-back calls, 15 runs after warm-up."""
    return time_cuda(fn, warmup=3, repeat=15, calls=10)["median_ms"]


def probe(args: tuple, config: triton.Config, a_scaled: bool = True, tma: bool = False,
          warp_specialize: bool = False, reference: torch.Tensor | None = None) -> dict:
    """One kernel at one launch shape: what it compiled to and its time. args: the kernel's
    (a, sa, b, sb, offsets); tma: the candidate, whose output must be `reference`'s."""
    a, sa, b, sb, offs = args
    M, K = a.shape
    E, N, _ = b.shape
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    first = first_tiles(offs)
    meta = dict(config.kwargs)
    grid = kernels.grouped_grid(M, N, E)(meta)
    launch_options = dict(num_warps=config.num_warps, num_stages=config.num_stages)

    def launch():
        if tma:
            return grouped_mm_tma_kernel[grid](a, sa, b, sb, c, offs, first, M, N, K, E, triton.next_power_of_2(E),
                                               TILE, **meta, WARP_SPECIALIZE=warp_specialize, **launch_options)
        return kernels.grouped_mm_kernel[grid](a, sa, b, sb, c, offs, first, N, K, E, triton.next_power_of_2(E), TILE,
                                               **meta, A_SCALED=a_scaled, **launch_options)

    compiled = launch()
    diff = None
    if reference is not None:
        diff = ((c.float() - reference).norm() / reference.norm()).item()
        if not diff < 1e-2:
            raise RuntimeError(f"the TMA candidate differs from the kernel by {diff:.3g} of its norm")
    ptx = compiled.asm.get("ptx", "")
    row = {"config": f"{meta['BLOCK_M']}x{meta['BLOCK_N']} w{config.num_warps} s{config.num_stages}",
           "programs": grid[0] * grid[1], "n_regs": getattr(compiled, "n_regs", None),
           "n_spills": getattr(compiled, "n_spills", None), "rel_diff_from_kernel": diff,
           "shared_bytes": getattr(compiled.metadata, "shared", None),
           "ptx": {name: len(re.findall(pattern, ptx)) for name, pattern in PTX.items()}}
    row["ms"] = events_ms(launch)
    return row


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernel_probe: needs a CUDA GPU")
    device = torch.device("cuda")
    cfg = preset("deepseek-v2-lite")
    p = problem(cfg, 2048, device, torch.bfloat16)
    M, D, F_ = p["M"], p["D"], p["F"]
    flops = 2 * M * F_ * D
    x, wg = p["x"], p["w_gate"]
    xq, wgq = quantize(x, ACT_TILE), quantize(wg, WEIGHT_BLOCK)
    from train_throughput import gemm_ceilings
    ceiling = gemm_ceilings(device)["fp8"] / 1e12
    dense_offs = torch.full((1,), M, dtype=torch.int32, device=device)
    grouped = (xq.data, xq.scale, wgq.data, wgq.scale, p["offsets"])
    dense = (xq.data, xq.scale, wgq.data[:1].contiguous(), wgq.scale[:1].contiguous(), dense_offs)
    runs = {"grouped, W8A8": (grouped, {}),
            "grouped, weight-only": ((x, wgq.scale, wgq.data, wgq.scale, p["offsets"]), dict(a_scaled=False)),
            "dense (one group), W8A8": (dense, {})}
    for name, args in (("grouped, W8A8", grouped), ("dense (one group), W8A8", dense)):
        ref = kernels.grouped_mm_fp8(*args, first_tiles(args[4]), torch.bfloat16).float()  # once a problem
        runs[f"{name}, TMA loads"] = (args, dict(tma=True, reference=ref))
        runs[f"{name}, TMA loads, warp-specialized"] = (args, dict(tma=True, warp_specialize=True, reference=ref))
    # device-side TMA descriptors live in a global scratch buffer the launch asks for
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    rows = {}
    for name, (args, options) in runs.items():
        rows[name] = []
        for config in kernels._grouped_tuned.configs:
            if options.get("warp_specialize") and config.num_warps != 4:  # one warpgroup multiplying
                continue
            try:
                r = probe(args, config, **options)
            except Exception as e:  # a shape that does not compile here (shared memory): say so
                r = {"config": str(config), "error": f"{type(e).__name__}: {str(e)[:200]}"}
            if "ms" in r:
                r["tflops"] = flops / r["ms"] / 1e9
                r["of_fp8_ceiling"] = r["tflops"] / ceiling
            rows[name].append(r)
            print(name, r, flush=True)
    peers = {"bf16 torch._grouped_mm": events_ms(lambda: torch._grouped_mm(x, wg.transpose(-2, -1), offs=p["offsets"])),
             "bf16 dense torch.mm": events_ms(lambda: x @ wg[0].t())}
    w0 = gemm.Quantized(wgq.data[0], wgq.scale[0], wgq.block)
    if gemm.cublas_takes(xq, w0):
        peers["fp8 dense cuBLAS blockwise _scaled_mm"] = events_ms(lambda: gemm.scaled_mm(xq, w0, torch.bfloat16, True))
    peers = {k: {"ms": v, "tflops": flops / v / 1e9, "of_fp8_ceiling": flops / v / 1e9 / ceiling}
             for k, v in peers.items()}
    print("peers", peers)
    write_json({"benchmark": "fp8_kernel_probe", **environment(), "shape": {"M": M, "N": F_, "K": D, "E": p["E"]},
                "fp8_ceiling_tflops": ceiling, "rows": rows, "peers": peers, "command": " ".join(sys.argv)},
               "fp8_kernel_probe.json")


if __name__ == "__main__":
    main()
