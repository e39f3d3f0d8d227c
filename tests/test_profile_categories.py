"""benchmarks/profile_categories.py: a torch.profiler kernel table, summed per step by kind of
kernel, the first matching rule deciding each kernel's kind."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEP = "-" * 90 + "  " + "  ".join(["-" * 12] * 10)


def load():
    spec = importlib.util.spec_from_file_location("profile_categories", REPO / "benchmarks" / "profile_categories.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(name: str, self_cuda: str, calls: int) -> str:
    """One kernel row as torch.profiler's key_averages().table() prints it (no CPU time)."""
    cells = ["0.00%", "0.000us", "0.00%", "0.000us", "0.000us", self_cuda, "1.00%", self_cuda, "1.000us", str(calls)]
    return f"{name:>90s}  " + "  ".join(f"{c:>12s}" for c in cells)


TABLE = "\n".join([
    SEP,
    f"{'Name':>90s}  " + "  ".join(f"{h:>12s}" for h in (
        "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "Self CUDA", "Self CUDA %",
        "CUDA total", "CUDA time avg", "# of Calls")),
    SEP,
    row("grouped_mm_tokens_kernel", "81.000ms", 108),
    row("grouped_mm_kernel", "93.000ms", 408),
    row("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, s...", "79.500ms", 516),
    row("triton_poi_fused__grouped_mm__to_copy_transpose_25", "51.000ms", 144),
    row("triton_poi_fused__to_copy_clamp_div_fp8_grouped_mm_index_mul_unsqueeze_view_45", "21.000ms", 72),
    row("triton_poi_fused__to_copy_add_arange_clamp_max_clone_expand_index_lt_mul_nll_loss_forwa...", "900.000us", 36),
    row("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "30.000ms", 48),
    row("some_new_kernel", "3.000ms", 3),
    SEP,
    "Self CPU time total: 1.000ms",
    "Self CUDA time total: 400.000ms",
])


def test_a_kernel_table_sums_per_step_by_kind():
    pc = load()
    rows = pc.kernel_rows(TABLE)
    assert [r[0] for r in rows][:2] == ["grouped_mm_tokens_kernel", "grouped_mm_kernel"] and len(rows) == 8
    assert rows[5][1] == pytest.approx(0.9) and rows[5][2] == 36  # µs read as ms
    per_step = pc.categories(rows, calls=3)
    assert per_step == pytest.approx({
        "FP8 grouped GEMMs, fprop and dgrad (Triton)": 31.0,
        "FP8 grouped weight gradients (Triton)": 27.0,
        "float32 gradient accumulation": 26.5,
        "casts (to_copy)": 17.0,
        "dense GEMMs (cuBLAS)": 10.0,
        "FP8 quantization": 7.0,
        "other": 1.0,
        "cross-entropy": 0.3,  # a kernel with "clamp" and "nll_loss" in its name: the loss rule comes first
    })
    assert list(per_step)[0] == "FP8 grouped GEMMs, fprop and dgrad (Triton)"  # largest first
    assert pc.total_ms(TABLE) == pytest.approx(400.0)
