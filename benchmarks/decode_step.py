"""Where a batch's decode step time goes, on a GPU: the compiled model step (the engine's
path for buckets above the fused step's rows) per bucket, bench-1b BF16 with random weights,
every cache row prefilled with a prompt of `--prompt` tokens (max_len prompt + 128, as
benchmarks/decode.py).

Per bucket and variant, in one job:
- `kernels_us`: the GPU time of the step's kernels, summed, inside captured replays
  (torch.profiler over `--steps` replays), and `launches` per step;
- `replay_us`: µs per step of `--steps` back-to-back graph replays (CUDA events, median of
  `--repeat` after the capture): `gap_us` = replay − kernels is the time between kernels;
- `burst_us`: µs per step of `GraphDecoder.decode_burst` (the replays, plus its per-step
  token copy, plus the read-back of the tokens);
- `engine_burst{8,32}_*`: the compiled engine at that batch (decode.py's compiled mode) at
  decode bursts 8 and 32 (first variant only): µs per decoded token (decode.py's
  `engine_run`: first token to the 128th, scheduling, read-back and postprocess included),
  and the host's time per burst in its parts (`engine_breakdown`).

Variants (`--variants`) put a code choice side by side in the same job:
- `base`: the code as it is;
- `scatter_cache_write`: the cache write as it was up to 2e31b10 (`scatter_` into the slice
  view of the rows, which Inductor compiles as a copy of the whole view, the scatter, and a
  copy back).

    python benchmarks/decode_step.py [--buckets 8 32 --variants base scatter_cache_write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_cuda, write_json  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.hf import to_dtype  # noqa: E402
from nanoseek.infer.cuda_graph import GraphDecoder  # noqa: E402
from nanoseek.model import StaticCache  # noqa: E402
from nanoseek.model import cache as cache_module  # noqa: E402


def _scatter_update(self, layer_idx, positions, *entries):
    """CacheView.update as it was: scatter_ into the rows' slice view."""
    out = []
    for buf, new in zip(self.cache.layers[layer_idx], entries):
        if self.rows is None:
            raise NotImplementedError("only contiguous rows in this variant")
        rows = buf[self.rows]
        idx = positions.reshape(*positions.shape, *([1] * (new.dim() - 2))).expand_as(new)
        rows.scatter_(1, idx, new.to(buf.dtype))
        out.append(rows[:, : self.kv_len])
    return out


@contextmanager
def variant(name: str):
    saved = cache_module.CacheView.update
    if name == "scatter_cache_write":
        cache_module.CacheView.update = _scatter_update
    elif name != "base":
        raise SystemExit(f"unknown variant {name!r}")
    try:
        yield
    finally:
        cache_module.CacheView.update = saved
        torch._dynamo.reset()  # the next variant compiles its own code


def graph_kernels(step: GraphDecoder, key: tuple, steps: int) -> tuple[float, float]:
    """Kernel µs and launches per step inside `steps` replays of key's graph."""
    from torch.profiler import ProfilerActivity, profile
    step.run(key)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step.run(key)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return (sum(e.self_device_time_total for e in events) / steps,
            sum(e.count for e in events) / steps)


class Timer:
    """Host seconds spent inside a wrapped callable, summed."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


def engine_breakdown(model, prompts, max_len: int, burst: int, repeat: int) -> dict:
    """The compiled engine (decode.py's compiled mode: fused_decode=0) at this batch and decode
    burst: µs per decoded token (decode.py's engine_run, median of repeat after a warm-up),
    and per burst of the last run the host's time in each part of a decode step: the graph
    launches (GraphDecoder.decode_burst, which returns before the GPU is done), the whole
    ModelRunner.decode_burst (launches + waiting for the GPU + read-back), postprocess."""
    from decode import engine_run

    from nanoseek.infer.engine import Engine
    engine = Engine(model, None, max_batch=len(prompts), max_len=max_len, compile=True, fused_decode=0,
                    decode_burst=burst)
    plist = [p.tolist() for p in prompts]
    engine_run(engine, plist, 128)  # warm-up: compile, capture
    spans = []
    for i in range(repeat):
        if i == repeat - 1:
            launch = engine.runner.graphs.decode_burst = Timer(engine.runner.graphs.decode_burst)
            runner = engine.runner.decode_burst = Timer(engine.runner.decode_burst)
            post = engine._postprocess = Timer(engine._postprocess)
            step = engine.step = Timer(engine.step)
        spans.append(engine_run(engine, plist, 128)[1])
    bursts = max(runner.calls, 1)
    out = {f"engine_burst{burst}_us_per_token": statistics.median(spans) / 127 * 1e6,
           f"engine_burst{burst}_bursts": runner.calls,
           f"engine_burst{burst}_host_launch_ms_per_burst": launch.seconds / bursts * 1e3,
           f"engine_burst{burst}_runner_ms_per_burst": runner.seconds / bursts * 1e3,
           f"engine_burst{burst}_postprocess_ms_per_burst": post.seconds / bursts * 1e3,
           f"engine_burst{burst}_steps_ms_total": step.seconds * 1e3, f"engine_burst{burst}_steps": step.calls}
    del engine
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--buckets", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--variants", nargs="+", default=["base", "scatter_cache_write"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true", help="skip the engine runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset("bench-1b")
    model = to_dtype(Transformer(cfg), torch.bfloat16).cuda().eval()
    R, max_len = max(args.buckets), args.prompt + 128
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (R, args.prompt), generator=g)
    rows = {}
    for name in args.variants:
        with variant(name):
            for B in args.buckets:
                cache = StaticCache(cfg, B, max_len, dtype=torch.bfloat16, device="cuda")
                step = GraphDecoder(model, cache, None, compile=True)
                slots = list(range(B))
                bucket = step.load([step.ids, step.positions], slots, [1] * B, [args.prompt] * B)
                key = (bucket, False)

                def replays(step=step, key=key):
                    for _ in range(args.steps):
                        step.run(key)

                def burst(step=step, slots=slots):
                    step.decode_burst(slots, [1] * len(slots), [args.prompt] * len(slots), args.steps).tolist()
                with torch.no_grad():
                    replay = time_cuda(replays, warmup=1, repeat=args.repeat)["median_ms"] * 1e3 / args.steps
                    burst_us = time_cuda(burst, warmup=1, repeat=args.repeat)["median_ms"] * 1e3 / args.steps
                    kernels, launches = graph_kernels(step, key, args.steps)
                row = {"variant": name, "batch": B, "kernels_us": kernels, "launches": launches,
                       "replay_us": replay, "gap_us": replay - kernels, "burst_us": burst_us,
                       "compiled": step.compile, "captured": bool(step.graphs) and not step.failed}
                del step, cache
                torch.cuda.empty_cache()
                if not args.no_engine and name == args.variants[0]:
                    for n in (8, 32):
                        row.update(engine_breakdown(model, prompts[:B], max_len, n, args.repeat))
                rows[f"{name}, batch {B}"] = row
                print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    result = {"benchmark": "decode_step", **environment(), "preset": "bench-1b", "prompt_tokens": args.prompt,
              "max_len": max_len, "steps": args.steps, "repeat": args.repeat, "rows": rows}
    print(f"wrote {write_json(result, 'decode_step.json')}")


if __name__ == "__main__":
    main()
