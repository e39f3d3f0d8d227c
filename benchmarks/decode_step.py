"""Where a batch's decode step time goes, on a GPU: the compiled model step (the engine's
path for buckets above the fused step's rows) per bucket, bench-1b BF16 with random weights,
every cache row prefilled with its own prompt of `--prompt` tokens (max_len prompt + 128, as
benchmarks/decode.py) and each row decoding its own token, so that rows route to different
experts as in the engine.

Per bucket and variant, in one job:
- `kernels_us`: the GPU time of the step's kernels, summed, inside captured replays
  (torch.profiler over `--steps` replays), and `launches` per step;
- `replay_us`: µs per step of `--steps` back-to-back graph replays from the prompt's end
  (CUDA events, median of `--repeat` after the capture): `gap_us` = replay − kernels is the
  time between kernels;
- `burst_us`: µs per step of `GraphDecoder.decode_burst` (the replays, plus its per-step
  token copy, plus the read-back of the tokens);
- `engine_burst{n}_*`: the compiled engine at that batch (decode.py's compiled mode) at
  decode bursts `--engine-bursts` (default 8; first variant only): µs per decoded token (decode.py's
  `engine_run`: first token to the 128th, scheduling, read-back and postprocess included),
  and the host's time per burst in its parts (`engine_breakdown`).

Variants (`--variants`) put an expert path side by side in the same job (model/moe.py):
- `base`: the default ("auto");
- `grouped_experts`: the routed experts always through the grouped GEMM.

`--moe-sweep` first times kernels/moe.py's launch shapes on one MoE layer and writes the
fastest to moe_tuning.json (decode.py --moe-tuning reads it; the rows here run the code's
own shapes); `--profile` writes the first variant's kernels at the largest bucket.

    python benchmarks/decode_step.py [--buckets 8 32 --variants base grouped_experts --moe-sweep --profile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (environment, graph_flags, graph_us, out_dir, prefill, profile_kernels, rel_err,  # noqa: E402
                    time_cuda, write_json)  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.hf import to_dtype  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.cuda_graph import GraphDecoder  # noqa: E402
from nanoseek.model import StaticCache  # noqa: E402
from nanoseek.model.moe import ExpertPath  # noqa: E402

# --variants: the expert path each runs
VARIANTS = {"base": ExpertPath("auto"), "grouped_experts": ExpertPath("grouped")}


def graph_kernels(step: GraphDecoder, B: int, ids: list[int], position: int, steps: int,
                  table: bool) -> tuple[float, float]:
    """Kernel µs and launches per step inside `steps` replays of bucket B's graph (from the
    prompt's end); with table, the kernels by total time go to decode_step_profile.txt."""
    bucket = step.load([step.ids, step.positions], list(range(B)), ids, [position] * B)
    kernels, launches, text = profile_kernels(lambda: step.run((bucket, False)), steps)
    if table:
        head = f"## batch {B}, captured replays: {kernels:.0f} us of kernels per step, {launches:.0f} launches"
        (out_dir() / "decode_step_profile.txt").write_text(head + "\n\n" + text + "\n")
    return kernels, launches


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


def engine_breakdown(model, prompts, max_len: int, burst: int, repeat: int, expert_path: str) -> dict:
    """The compiled engine (decode.py's compiled mode: fused_decode=0) at this batch and decode
    burst: µs per decoded token (decode.py's engine_run, median of repeat after a warm-up),
    and per burst of the last run the host's time in each part of a decode step: the graph
    launches (GraphDecoder.decode_burst, which returns before the GPU is done), the whole
    ModelRunner.decode_burst (launches + waiting for the GPU + read-back), postprocess."""
    from decode import engine_run

    from nanoseek.infer.engine import Engine
    engine = Engine(model, None, max_batch=len(prompts), max_len=max_len,
                    config=InferenceConfig(compile=True, fused_decode_rows=0, decode_burst=burst,
                                           expert_path=expert_path))
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


def moe_sweep(model, n_tokens: int, repeat: int) -> dict:
    """kernels/moe.py's launch shapes at n_tokens rows of one MoE layer of the model, routed
    by its own router on random hidden states: µs per call of each shape in a grid, first of
    expert_up's, then of expert_down's with the best up (graph_us), and of the grouped GEMM;
    the fastest go to moe_tuning.json (decode.py --moe-tuning reads it)."""
    from nanoseek.kernels import moe as moe_kernels
    from nanoseek.model.moe import MoE
    layer = next(m for m in model.modules() if isinstance(m, MoE))
    ex = layer.experts
    x = torch.randn(n_tokens, ex.gate_proj.shape[2], device="cuda", dtype=ex.gate_proj.dtype)
    with torch.no_grad():
        weight, idx, _ = layer.gate(x)
        ref = ex.forward_grouped(x, weight, idx)
        out = {"tokens": n_tokens, "experts_chosen": int(idx.unique().numel()),
               "grouped_us": graph_us(lambda: ex.forward_grouped(x, weight, idx), repeat)}
        best = moe_kernels.launch_shapes()

        def kernels(launch):
            return moe_kernels.small_batch_experts(x, idx, weight, ex.gate_proj, ex.up_proj, ex.down_proj,
                                                   launch=launch).sum(1).to(x.dtype)
        for part, (outer, inner) in (("up", ("block_f", "block_d")), ("down", ("block_d", "block_f"))):
            times, shapes = {}, {}
            for a in (32, 64, 128):
                for b in (64, 128, 256):
                    for w in (4, 8):
                        for st in (3, 4):
                            shapes[f"{outer} {a}, {inner} {b}, warps {w}, stages {st}"] = {
                                outer: a, inner: b, "warps": w, "stages": st}
            for label, shape in shapes.items():
                trial = {**best, part: shape}
                try:
                    err = rel_err(kernels(trial), ref)
                    if err > 2e-2:
                        raise RuntimeError(f"rel err {err:.3g}")
                    times[label] = graph_us(lambda trial=trial: kernels(trial), repeat)
                except Exception as e:  # noqa: BLE001 — a shape that does not compile or fit: skipped
                    times[label] = f"{type(e).__name__}: {str(e)[:80]}"
            ok = {k: v for k, v in times.items() if isinstance(v, float)}
            best[part] = shapes[min(ok, key=ok.get)]
            out[f"{part}_us"] = times
        out["best"] = best
        out["best_us"] = graph_us(lambda: kernels(best), repeat)
        out["rel_err_vs_grouped"] = rel_err(kernels(best), ref)
    print({k: v for k, v in out.items() if not k.endswith("_us") or isinstance(v, float)}, flush=True)
    print(f"wrote {write_json(out['best'], 'moe_tuning.json')}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--buckets", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--variants", nargs="*", default=["base", "grouped_experts"], choices=list(VARIANTS),
                    help="none: only the --moe-sweep")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true", help="skip the engine runs")
    ap.add_argument("--engine-bursts", type=int, nargs="+", default=[8], help="the engine's decode bursts")
    ap.add_argument("--moe-sweep", action="store_true",
                    help="first tune kernels/moe.py's launch shapes at the largest bucket's tokens")
    ap.add_argument("--profile", action="store_true",
                    help="the first variant's kernels at the largest bucket, inside graph replays: "
                         "decode_step_profile.txt")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset("bench-1b")
    model = to_dtype(Transformer(cfg), torch.bfloat16).cuda().eval()
    R, max_len = max(args.buckets), args.prompt + 128
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (R, args.prompt), generator=g)
    first = torch.randint(0, cfg.vocab_size, (R,), generator=g).tolist()
    # every row its own prompt: rows route to different experts, as in the engine
    prefilled = StaticCache(cfg, R, max_len, dtype=torch.bfloat16, device="cuda")
    prefill(model, prefilled, prompts.cuda())
    rows = {"moe_sweep": moe_sweep(model, R, args.repeat)} if args.moe_sweep else {}
    for name in args.variants:
        model.set_expert_path(VARIANTS[name])
        torch._dynamo.reset()  # each variant compiles its own step
        for B in args.buckets:
            cache = copy.deepcopy(prefilled)
            step = GraphDecoder(model, cache, None, compile=True)
            slots = list(range(B))

            def replays(step=step, B=B):  # each from the prompt's end again: the same steps each run
                bucket = step.load([step.ids, step.positions], slots, first[:B], [args.prompt] * B)
                for _ in range(args.steps):
                    step.run((bucket, False))

            def burst(step=step, B=B):
                step.decode_burst(slots, first[:B], [args.prompt] * B, args.steps).tolist()
            with torch.no_grad():
                replay = time_cuda(replays, warmup=1, repeat=args.repeat)["median_ms"] * 1e3 / args.steps
                burst_us = time_cuda(burst, warmup=1, repeat=args.repeat)["median_ms"] * 1e3 / args.steps
                kernels, launches = graph_kernels(step, B, first[:B], args.prompt, args.steps,
                                                  args.profile and name == args.variants[0] and B == R)
            row = {"variant": name, "batch": B, "kernels_us": kernels, "launches": launches,
                   "replay_us": replay, "gap_us": replay - kernels, "burst_us": burst_us,
                   **graph_flags(step)}
            del step, cache
            torch.cuda.empty_cache()
            if not args.no_engine and name == args.variants[0]:
                for n in args.engine_bursts:
                    row.update(engine_breakdown(model, prompts[:B], max_len, n, args.repeat, VARIANTS[name].kind))
            rows[f"{name}, batch {B}"] = row
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            write(args, max_len, rows)  # after every row: a job cut short keeps what it measured
    print(f"wrote {write(args, max_len, rows)}")


def write(args, max_len: int, rows: dict):
    from nanoseek.kernels import moe as moe_kernels
    result = {"benchmark": "decode_step", **environment(), "preset": "bench-1b", "prompt_tokens": args.prompt,
              "max_len": max_len, "steps": args.steps, "repeat": args.repeat,
              "small_batch_experts_launch": moe_kernels.SMALL_BATCH_EXPERTS_LAUNCH, "rows": rows}
    return write_json(result, "decode_step.json")


if __name__ == "__main__":
    main()
