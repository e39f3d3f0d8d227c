"""Where a training step's GPU time goes, by kind of kernel, from a kernel table.

Reads the tables that `train_throughput.py --profile` writes (torch.profiler's, top kernels
by self CUDA time, of `--calls` profiled steps) and sums each kind of kernel per step. The
first rule a kernel's name matches decides its kind. The table lists the top kernels only:
the "listed" line says how much of the profiled time that is.

    python benchmarks/profile_categories.py benchmarks/results/h100_fp8train/after/profile_train_*.txt
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# (kind, pattern): the first match wins, so the specific kinds come before the general ones
RULES = [
    ("FP8 grouped GEMMs, fprop and dgrad (Triton)", r"^grouped_mm_kernel"),
    ("FP8 grouped weight gradients (Triton)", r"^grouped_mm_tokens_kernel"),
    ("BF16 grouped GEMMs (CUTLASS)", r"cutlass"),
    ("dense GEMMs (cuBLAS)", r"nvjet|xmma|gemm"),
    ("attention (cuDNN)", r"sdpa|flash|cudnn"),
    ("float32 gradient accumulation", r"CUDAFunctor_add<float>"),
    ("AdamW and the gradient norm", r"multi_tensor_apply"),
    ("cross-entropy", r"nll_loss|log_softmax"),
    ("FP8 quantization", r"fp8|amax"),
    ("casts (to_copy)", r"^triton_\w+_fused__(grouped_mm__)?to_copy(_t)?(_transpose)?_\d+$"),
    ("other", r""),
]
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def kernel_rows(table: str) -> list[tuple[str, float, int]]:
    """(name, self CUDA ms, calls) of each kernel row of a torch.profiler table."""
    rows = []
    for line in table.splitlines():
        fields = re.split(r"\s{2,}", line.strip())
        if len(fields) < 11 or not fields[-1].isdigit():
            continue
        match = re.fullmatch(r"([\d.]+)(us|ms|s)", fields[-5])  # Self CUDA
        if match:
            rows.append((fields[0], float(match[1]) * UNITS[match[2]], int(fields[-1])))
    return rows


def total_ms(table: str) -> float | None:
    match = re.search(r"Self CUDA time total: ([\d.]+)(us|ms|s)", table)
    return float(match[1]) * UNITS[match[2]] if match else None


def categories(rows: list[tuple[str, float, int]], calls: int) -> dict[str, float]:
    """ms per profiled call (step) of each kind of kernel, largest first."""
    out: dict[str, float] = {}
    for name, ms, _ in rows:
        kind = next(k for k, pattern in RULES if re.search(pattern, name))
        out[kind] = out.get(kind, 0.0) + ms / calls
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tables", nargs="+", type=Path)
    ap.add_argument("--calls", type=int, default=3, help="steps the table profiled (train_throughput.py: 3)")
    args = ap.parse_args()
    for path in args.tables:
        table = path.read_text()
        rows = kernel_rows(table)
        per_kind = categories(rows, args.calls)
        listed, total = sum(per_kind.values()), total_ms(table)
        print(f"\n{path}: ms per step")
        for kind, ms in per_kind.items():
            print(f"  {kind:46s} {ms:7.1f}")
        print(f"  {'listed (top kernels)':46s} {listed:7.1f}"
              + (f" of {total / args.calls:.1f} profiled" if total else ""))


if __name__ == "__main__":
    main()
