"""The fused decode step (infer/fused.py) on a GPU: accurate, and how much faster per step.

bench-1b (or `--preset NAME [--layers N]`: a preset's real layer shapes, its first N layers)
with random weights (seeded), BF16, every cache row prefilled with a prompt of `--prompt`
tokens (max_len prompt + 128, as benchmarks/decode.py).

- accuracy, per bucket: the next-token logits of the fused step and of the model's own
  absorbed decode forward (both BF16), each against the same forward of a float32 copy of
  the model and cache: relative error ||x - x32|| / ||x32|| and argmax agreement;
- speed, per bucket: a captured decode burst of `--steps` steps (graph replays, tokens
  chosen inside) timed by CUDA events, median of `--repeat` after a warm-up (capture and
  compilation): µs per step for the fused step and for the compiled model step
  (torch.compile + CUDA graph, the engine's path without fused_decode), and their ratio;
  the weight bytes a batch-1 step must read, over its time: the bandwidth it reaches;
- `--tune PASSES`: before all that, the launch shapes (fused.fused_step_launch) by
  coordinate descent at batch 1: each knob in turn over its candidates, the others held,
  keeping the fastest captured step (µs per step of 16 replayed steps, median of 5); the
  path and the best shapes go to the JSON and are used for the rest of the run, and the
  shapes alone to fused_tuning.json (fused_tuning_<preset>[_<N>L].json for another preset;
  benchmarks/decode.py --fused-tuning reads them), written again at each new best, so a run
  cut off mid-search keeps it; `--tune-budget SECONDS` starts no knob past that;
- `--profile`: the fused step's kernels at batch 1 (torch.profiler, uncaptured) in
  fused_profile.txt;
- `--no-reference`: no float32 twin and no accuracy rows, for a model whose twin does not fit
  beside it (the V3 slice on an H100);
- `--fp8`: the layer weights FP8 in 128x128 blocks, as an official checkpoint holds them
  (infer/fp8_weights.quantize_weights), everything above on them (no accuracy rows: the float32
  twin's weights are not FP8; tests/test_fused_decode.py holds the FP8 step to its twin).

    python benchmarks/fused_decode.py [--preset deepseek-v2-lite --layers 8] [--buckets 1 2 4 --steps 64
        --repeat 5 --tune 2 --profile]
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
                    result_tag, sliced_preset, time_cuda, write_json)  # noqa: E402

from nanoseek import Transformer  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.cuda_graph import GraphDecoder  # noqa: E402
from nanoseek.infer import fused as fused_module  # noqa: E402
from nanoseek.infer.fused import FusedDecoder  # noqa: E402
from nanoseek.model import StaticCache  # noqa: E402
from nanoseek.hf import to_dtype  # noqa: E402
from nanoseek.model.moe import MoE  # noqa: E402


def step_weight_bytes(model: Transformer) -> int:
    """Bytes of the weights one token's decode step reads (decode.step_bytes at one row without a
    cache: every main-layer weight but the routed experts it does not choose, the head, and the
    embedding's one row; FP8 weights with their scales)."""
    from decode import step_bytes
    moe_layers = sum(isinstance(layer.mlp, MoE) for layer in model.main_layers)
    return int(step_bytes(model, [model.config.num_experts_per_tok] * moe_layers, 1, 0, 0))


# the largest kernels' knobs first (fused.LAUNCH_KEYS; each list holds bench-1b's derived value)
CANDIDATES = dict(pdl=[True, False], up_dot=[0, 1, 2], up_rows=[2, 4, 8, 16, 32, 64], up_warps=[1, 2, 4, 8],
                  up_block=[64, 128, 256], down_split=[0, 1],
                  down_block=[256, 512, 1024, 2048], down_rows=[1, 2, 4, 8], down_warps=[1, 2, 4, 8],
                  query_split=[1, 2, 4, 8], query_warps=[2, 4, 8], gemv_rows=[2, 4, 8], gemv_warps=[2, 4, 8],
                  attend_split=[32, 64, 128], attend_warps=[4, 8], output_split=[1, 2, 4, 8],
                  output_warps=[2, 4, 8], route_warps=[1, 2, 4],
                  head_rows=[4, 8, 16, 32], head_warps=[4, 8])
# a knob that changes a kernel's shape: its trials take the rule's values of these for it (from the
# rest of the best launch so far); rows a program take the rule's warps for them (twice the rows at
# the same warps is twice the registers a thread)
DERIVED = dict(down_split=("down_rows", "down_warps"), down_block=("down_warps",), up_rows=("up_warps",),
               up_dot=("up_rows", "up_warps", "up_block"),
               gemv_rows=("gemv_warps",), head_rows=("head_warps",))


def fused_step_us(model, cache, launch, prompt, repeat=5) -> float:
    """µs per step of the batch-1 fused step with these launch shapes: 16 forwards captured
    in one graph (graph_us), median of repeat replays."""
    step = FusedDecoder(model, cache, 1, launch)
    ids = torch.ones(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), prompt, device="cuda")
    return graph_us(lambda: step.forward(ids, pos), repeat, calls=16)


def tune(model, cache, prompt, passes, budget: float | None = None, keep=None) -> tuple[dict, list]:
    """Coordinate descent over CANDIDATES from the derived launch shapes (fused_step_launch):
    each knob in turn over its values, the others held, keeping the fastest; returns the best
    shapes and the path. budget: seconds after which no further trial starts (the best so far
    stands); keep(best): called with each new best, so a run cut off mid-search keeps it."""
    start = time.monotonic()
    best = fused_module.fused_step_launch(model.config, cache.max_len)
    best_us = fused_step_us(model, cache, best, prompt)
    path = [{"tuning": dict(best), "us_per_step": best_us}]
    print(f"tune: start {best_us:.1f} us/step", flush=True)
    if keep:
        keep(best)
    tried = {tuple(sorted(best.items()))}
    def spent() -> bool:
        return budget is not None and time.monotonic() - start > budget
    for key, values in [kv for _ in range(passes) for kv in CANDIDATES.items()]:
        if spent():
            print(f"tune: {budget:.0f} s spent, stopping before {key}", flush=True)
            break
        for v in sorted(set(values) | {best[key]}):  # the rule's value for this model's widths too
            if spent():
                break
            trial = {**best, key: v}
            if key in DERIVED:
                kept = {k: x for k, x in trial.items() if k not in DERIVED[key] and not k.endswith("_warps")}
                rule = fused_module.fused_step_launch(model.config, cache.max_len, kept)
                trial.update({k: rule[k] for k in DERIVED[key]})
            if tuple(sorted(trial.items())) in tried:
                continue
            tried.add(tuple(sorted(trial.items())))
            try:
                us = fused_step_us(model, cache, trial, prompt)
            except Exception as e:  # noqa: BLE001 — a shape that does not compile: skip it, say so
                print(f"tune: {key}={v} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            path.append({"tuning": trial, "us_per_step": us})
            if us < best_us:
                best, best_us = trial, us
                print(f"tune: {key}={v} -> {us:.1f} us/step", flush=True)
                if keep:
                    keep(best)
    return best, path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--layers", type=int, default=None, help="the preset's first N layers (real shapes, no MTP)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tune", type=int, default=0, metavar="PASSES",
                    help="tune the launch shapes first: PASSES rounds of coordinate descent")
    ap.add_argument("--tune-budget", type=float, default=None, metavar="SECONDS",
                    help="start no tuning trial after this many seconds of search; the best so far stands")
    ap.add_argument("--no-compiled", action="store_true", help="time the fused step only")
    ap.add_argument("--fp8", action="store_true", help="the layer weights FP8 (implies --no-reference)")
    ap.add_argument("--no-reference", action="store_true",
                    help="no float32 twin, so no accuracy rows: the V3 slice's (~54 GB) beside its BF16 copy "
                         "passes an H100's 80 GB")
    args = ap.parse_args()
    args.no_reference |= args.fp8
    torch.manual_seed(0)
    cfg = sliced_preset(args.preset, args.layers)
    tag = result_tag(args.preset, args.layers) + ("_fp8" if args.fp8 else "")
    if args.no_reference:  # initialised in float32 on the host, as the twin is, then cast
        model_bf16 = to_dtype(Transformer(cfg).eval(), torch.bfloat16).cuda()
    else:
        model = Transformer(cfg).cuda().eval()   # float32 twin: the reference both are held to
        model_bf16 = to_dtype(copy.deepcopy(model), torch.bfloat16)  # as from_pretrained(dtype=) loads it
    if args.fp8:
        from nanoseek.infer.fp8_weights import quantize_weights
        quantize_weights(model_bf16)
    R = max(args.buckets)
    max_len = args.prompt + 128
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (R, args.prompt), generator=g).cuda()
    cache16 = StaticCache(cfg, R, max_len, dtype=torch.bfloat16, device="cuda")
    prefill(model_bf16, cache16, prompts)
    rows, tuning = {}, {}
    launch = fused_module.fused_step_launch(cfg, max_len)  # the shapes every fused step below runs
    if args.tune:
        launch, path = tune(model_bf16, copy.deepcopy(cache16), args.prompt, args.tune, args.tune_budget,
                            lambda best: write_json(best, f"fused_tuning{tag}.json"))
        tuning = {"best": launch, "path": path}
    for B in [] if args.no_reference else args.buckets:
        if B == args.buckets[0]:
            cache32 = StaticCache(cfg, R, max_len, dtype=torch.float32, device="cuda")
            prefill(model, cache32, prompts)
        ids = torch.randint(0, cfg.vocab_size, (B, 1), generator=g).cuda()
        pos = torch.full((B, 1), args.prompt, device="cuda")
        with torch.no_grad():
            ref = model(ids, positions=pos, cache=copy.deepcopy(cache32).prefix(B)).logits[:, -1].float()
            plain = model_bf16(ids, positions=pos, cache=copy.deepcopy(cache16).prefix(B)).logits[:, -1].float()
        fused = FusedDecoder(model_bf16, copy.deepcopy(cache16), B, launch).forward(ids, pos).float()
        rows[f"batch {B}"] = {
            "batch": B,
            "fused_rel_err_vs_fp32": rel_err(fused, ref), "model_bf16_rel_err_vs_fp32": rel_err(plain, ref),
            "fused_argmax_agrees_fp32": float((fused.argmax(-1) == ref.argmax(-1)).float().mean()),
            "model_bf16_argmax_agrees_fp32": float((plain.argmax(-1) == ref.argmax(-1)).float().mean()),
            "fused_vs_model_bf16_max_abs_diff": float((fused - plain).abs().max()),
        }
        print(rows[f"batch {B}"], flush=True)
    if not args.no_reference:
        del model, cache32
    torch.cuda.empty_cache()

    modes = ((("fused", dict(fused_rows=R, fused_launch=launch)),)
             + (() if args.no_compiled else (("compiled", dict(compile=True)),)))
    for name, kw in modes:
        for B in args.buckets:
            cache = copy.deepcopy(cache16)
            step = GraphDecoder(model_bf16, cache, None, **kw)
            slots = list(range(B))

            def burst(step=step, slots=slots):
                return step.decode_burst(slots, [1] * len(slots), [args.prompt] * len(slots), args.steps)
            us = time_cuda(burst, warmup=1, repeat=args.repeat)["median_ms"] * 1e3 / args.steps  # warm-up: capture
            row = rows.setdefault(f"batch {B}", {"batch": B})
            row[f"{name}_us_per_step"] = us
            row.update({f"{name}_{k}": v for k, v in graph_flags(step).items()})  # captured, compiled
            if name == "compiled":
                row["speedup_fused_vs_compiled"] = row["compiled_us_per_step"] / row["fused_us_per_step"]
            print(f"{name} batch {B}: {us:.1f} us/step", flush=True)
            del step, cache
            torch.cuda.empty_cache()
    rows["engine, batch 1"] = engine_overhead(model_bf16, prompts[0].tolist(), max_len, args.repeat, launch)
    weight_bytes = step_weight_bytes(model_bf16)
    if "batch 1" in rows:
        for name, _ in modes:
            us = rows["batch 1"][f"{name}_us_per_step"]
            rows["batch 1"][f"{name}_weight_bandwidth_TBps"] = weight_bytes / us / 1e6
    import triton
    pdl = fused_module.pdl_supported(torch.device("cuda")) and bool(launch["pdl"])
    result = {"benchmark": "fused_decode", **environment(), "triton": triton.__version__, "pdl": pdl,
              "preset": args.preset, "layers": cfg.num_hidden_layers, "fp8_weights": args.fp8,
              "prompt_tokens": args.prompt,
              "max_len": max_len, "steps_per_burst": args.steps, "repeat": args.repeat,
              "batch1_weight_bytes": weight_bytes, "launch_used": launch,
              "tuning_search": tuning, "rows": rows}
    print(f"wrote {write_json(result, f'fused_decode{tag}.json')}")
    if args.tune:  # for benchmarks/decode.py --fused-tuning
        print(f"wrote {write_json(launch, f'fused_tuning{tag}.json')}")
    if args.profile:
        profile(model_bf16, cache16, args, launch)


def engine_overhead(model, prompt, max_len, repeat, launch) -> dict:
    """The engine's batch-1 decode with the fused step, at decode bursts of 8, 16 and 32:
    µs per decoded token from the first token to the 128th inside each run (decode.py's
    engine_run), median of repeat runs after a warm-up: the engine's whole loop (scheduling,
    read-back, postprocess) on top of the graph replays."""
    from decode import engine_run

    from nanoseek.infer.engine import Engine
    out = {}
    for burst in (8, 16, 32):
        engine = Engine(model, None, max_batch=1, max_len=max_len,
                        config=InferenceConfig(fused_decode_rows=1, fused_launch=launch, decode_burst=burst))
        engine_run(engine, [prompt], 128)  # warm-up: capture
        span = statistics.median(engine_run(engine, [prompt], 128)[1] for _ in range(repeat))
        out[f"decode_burst_{burst}_us_per_token"] = span / 127 * 1e6
        print(f"engine batch 1, burst {burst}: {out[f'decode_burst_{burst}_us_per_token']:.1f} us/token", flush=True)
        del engine
    return out


def profile(model, cache, args, launch):
    fused = FusedDecoder(model, cache, 1, launch)
    ids = torch.ones(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), args.prompt, device="cuda")
    for _ in range(3):
        fused.forward(ids, pos)
    total, launches, table = profile_kernels(lambda: fused.forward(ids, pos), 10, rows=40)
    head = f"## fused step, batch 1: {total:.0f} us of kernels per step, {launches:.0f} kernel launches"
    out = out_dir() / "fused_profile.txt"
    out.write_text(head + "\n\n" + table + "\n")
    print(head, f"\nwrote {out}")


if __name__ == "__main__":
    main()
