"""Shared helpers for benchmark scripts: environment record, device-event timing, JSON out."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        # GIT_COMMIT first: a copied tree (the device's) can carry an older .git than its files
        "git_commit": os.environ.get("GIT_COMMIT") or commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeat: int, device: torch.device, warmup: int = 1) -> float:
    """Median host seconds of fn() (the device synchronised around each call) after warm-up
    calls (compilation, graph capture, autotuning)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeat: int = 5) -> float:
    """Bytes per second one device-to-device copy moves (each byte read once and written
    once), median of `repeat` after a warm-up: the memory bandwidth a decode step can reach on
    this device, measured in the same run as the step."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeat + 1):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def gemm_flops(fn, n: int) -> float:
    """FLOP/s of fn, an n^3 GEMM on the GPU (the median by CUDA events, after warm-up)."""
    import triton.testing
    return 2 * n**3 / (triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3)


def bf16_gemm_flops(device: torch.device, n: int = 8192) -> float:
    """FLOP/s of an n^3 BF16 matmul on this GPU: the tensor-core rate a compute-bound kernel
    can reach, measured in the same run."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return gemm_flops(lambda: a @ b.t(), n)


def result_tag(preset: str, layers: int | None) -> str:
    """What a benchmark's result file names carry for a model other than full bench-1b:
    "_<preset>[_<N>L]" (decode_deepseek-v2-lite_8L.json), else ""."""
    return "" if preset == "bench-1b" and not layers else f"_{preset}{f'_{layers}L' if layers else ''}"


def sliced_preset(name: str, layers: int | None = None, **overrides):
    """A preset's model with its real layer shapes, cut to its first `layers` decoder layers
    (the first min(first_k_dense_replace, layers - 1) of them dense, so an MoE model keeps a
    MoE layer), without MTP."""
    from nanoseek import preset
    cfg = preset(name, **overrides)
    if layers is not None:
        if layers < 1:
            raise SystemExit(f"--layers must be positive, got {layers}")
        cfg = cfg.replace(num_hidden_layers=layers, num_nextn_predict_layers=0,
                          first_k_dense_replace=min(cfg.first_k_dense_replace, max(layers - 1, 0)))
    return cfg


def time_cuda(fn, warmup: int = 3, repeat: int = 10, calls: int = 1) -> dict:
    """Median/min milliseconds of fn() by CUDA events, after warm-up; calls > 1: each run times
    that many back-to-back calls and counts their mean (no host gap between kernels)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def prefill(model, cache, prompts: torch.Tensor) -> None:
    """Row b of the cache holds prompts[b] (the model's own prefill, one row at a time)."""
    with torch.no_grad():
        for b, p in enumerate(prompts):
            model(p[None], positions=torch.arange(len(p), device=p.device)[None],
                  cache=cache.select([b], kv_len=len(p)), absorb=False)


def graph_us(fn, repeat: int, calls: int = 20) -> float:
    """µs per call of fn, captured `calls` times in one CUDA graph and replayed (CUDA events,
    median of repeat): the GPU's time, without the host's per-call launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_cuda(graph.replay, warmup=2, repeat=repeat)["median_ms"] * 1e3 / calls


def profile_kernels(fn, calls: int, rows: int = 60) -> tuple[float, float, str]:
    """fn() `calls` times under torch.profiler's CUDA activity: the kernels' µs and launches
    per call (kernels inside replayed CUDA graphs included), and their table by total time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90)
    return (sum(e.self_device_time_total for e in events) / calls, sum(e.count for e in events) / calls, table)


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (an observed value, as latency reports give them)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def out_dir() -> Path:
    """Where results go: $OUT (the device's returned folder) or benchmarks/results."""
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def graph_flags(graphs) -> dict:
    """How an engine's steps ran: from captured CUDA graphs (none failed), and compiled."""
    return {"cuda_graphs": bool(graphs and graphs.graphs and not graphs.failed),
            "compiled": bool(graphs and graphs.compile)}


def write_json(obj: dict, name: str) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path
