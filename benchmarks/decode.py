"""Decode speed: the nanoseek engine against transformers' `generate`, same weights, same job.

bench-1b with random weights (seeded) is saved in HF layout; transformers loads that
directory; both run in BF16 weights on random prompts of 512 tokens and generate exactly
128 new tokens greedily (EOS ignored), at batch 1 and batch 32.

- time to first token (TTFT): prefill + first token, timed as a 1-token generation;
- decode tokens/s: batch × 127 / (time from every row's first token to every row's last,
  within the same 128-token run: transformers' per-step logits, the engine's step loop);
- peak memory: torch.cuda.max_memory_allocated during the run.
nanoseek runs its engine as a server would (continuous-batching scheduler, latent cache,
absorbed MLA decode, the decode step compiled by torch.compile and captured as a CUDA
graph), with batches of up to 4 rows on the fused Triton step instead (infer/fused.py,
nine kernels a layer; `--modes fused`), then the same with the routed experts always on the
grouped GEMM (a decode step otherwise gathers the chosen experts' weights at batches 1-2 and
runs kernels/moe.py's two expert-major kernels at 3-64, bench-1b's K = 6: model/moe.py), then with the
graph of the uncompiled step, then eagerly; the greedy tokens of the others are compared
with the compiled engine's (same_tokens_as_compiled, per token: with random weights the
logits are near-tied, so BF16 rounding differences alone change tokens), and each engine's
warm-up run with its last timed run (same_tokens_run_to_run: 1.0 unless some kernel sums in
a run-dependent order).
Each figure is the median of `--repeat` runs after a warm-up run.

    python benchmarks/decode.py [--prompt 512 --new 128 --batches 1 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_flags, out_dir, profile_kernels, write_json  # noqa: E402

from nanoseek import Transformer, from_pretrained, preset, save_pretrained  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402


def timed(fn, repeat):
    fn()  # warm-up (graph capture, cudnn/cublas plans)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --modes: (row label suffix, the engine's InferenceConfig settings)
MODES = {"compiled": (" (compiled step)", dict(compile=True, fused_decode_rows=0)),
         # batches of up to 4 rows on the fused Triton step (infer/fused.py); larger ones compiled
         "fused": (" (fused Triton step)", dict(compile=True, fused_decode_rows=4)),
         "grouped": (" (compiled, grouped GEMM experts only)",
                     dict(compile=True, fused_decode_rows=0, expert_path="grouped")),
         "graphs": (" (CUDA graphs, not compiled)", dict(compile=False, fused_decode_rows=0)),
         "eager": (" (no CUDA graphs)", dict(cuda_graphs=False, compile=False))}


def launch_file(path: str | None) -> dict | None:
    """Launch shapes saved by a tuning run (fused_tuning.json, moe_tuning.json), or None."""
    return json.loads(Path(path).read_text()) if path else None


def same_tokens(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of positions at which two runs' token lists agree."""
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))


def inductor_option(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value as bool, int, float or string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--tuned-option wants KEY=VALUE, got {text!r}")
    for parse in (lambda v: {"true": True, "false": False}[v.lower()], int, float):
        try:
            return key, parse(value)
        except (KeyError, ValueError):
            pass
    return key, value


def measure(run, batch, new, repeat):
    """run(n) generates n tokens per row and returns the seconds from every row's first token
    to every row's last. TTFT and the whole run are medians of `repeat` timed runs after a
    warm-up; decode tokens/s is batch·(new − 1) over the median first-to-last span of the
    timed full runs. (Subtracting the TTFT runs' median from the full runs' median, kept as
    decode_tokens_per_s_total_minus_ttft, mixes two runs' prefill times: a few ms of
    prefill jitter are ±10% of a 50 ms decode.)"""
    torch.cuda.reset_peak_memory_stats()
    ttft = timed(lambda: run(1), repeat)
    spans = []
    total = timed(lambda: spans.append(run(new)), repeat)
    span = statistics.median(spans[1:])  # the timed runs, not the warm-up
    return {"ttft_s": ttft, "total_s": total, "decode_s": span,
            "decode_tokens_per_s": batch * (new - 1) / span,
            "decode_tokens_per_s_total_minus_ttft": batch * (new - 1) / max(total - ttft, 1e-9),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


class StepTimes:
    """A transformers logits processor that only notes when each step's logits are ready
    (one call per generated token; the synchronize is what transformers' own per-step
    stopping check does anyway)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def engine_run(engine, prompts, n):
    """Greedy run of the prompts to n tokens each through the engine's step loop: the token
    lists and the seconds from the step that gave every request its first token to the end
    (each step ends with the tokens read back to the host)."""
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
    first = None
    while engine.has_unfinished():
        engine.step()
        if first is None and all(s.output_ids for s in seqs):
            first = time.perf_counter()
    return [list(s.output_ids) for s in seqs], time.perf_counter() - first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                    help="engine settings to run: compiled + graphs, the fused Triton step at batches "
                         "up to 4, compiled with grouped-GEMM experts only, graphs not compiled, eager")
    ap.add_argument("--tuned-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an Inductor option for the batch-1 step's compilation, beside coordinate-descent "
                         "tuning (e.g. combo_kernels=true, aggressive_fusion=true); repeatable")
    ap.add_argument("--fused-tuning", metavar="JSON",
                    help="launch shapes for the fused step (fused_tuning.json of benchmarks/fused_decode.py --tune)")
    ap.add_argument("--moe-tuning", metavar="JSON",
                    help="launch shapes for the small-batch experts kernels (moe_tuning.json of "
                         "benchmarks/decode_step.py --moe-sweep)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the compiled decode step (uncaptured) per kernel: decode_profile.txt")
    args = ap.parse_args()
    # every mode's engine: these, then the mode's own settings
    common = dict(compile_options=dict(map(inductor_option, args.tuned_option)),
                  fused_launch=launch_file(args.fused_tuning), small_batch_launch=launch_file(args.moe_tuning))
    torch.manual_seed(0)
    cfg = preset("bench-1b")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (max(args.batches), args.prompt), generator=g)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(Transformer(cfg), tmp, dtype=torch.bfloat16)
        gc.collect()
        if not args.skip_hf:
            import transformers
            transformers.logging.set_verbosity_error()
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
            for B in args.batches:
                ids = prompts[:B].cuda()

                def run(n, ids=ids):
                    steps = StepTimes()
                    with torch.no_grad():
                        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                                    logits_processor=transformers.LogitsProcessorList([steps]))
                    assert len(steps.times) == n
                    return steps.times[-1] - steps.times[0]
                rows[f"transformers generate, batch {B}"] = {"batch": B, **measure(run, B, args.new, args.repeat)}
                print(f"transformers batch {B}: {rows[f'transformers generate, batch {B}']}", flush=True)
            del hf
            gc.collect()
            torch.cuda.empty_cache()
        model = from_pretrained(tmp, dtype=torch.bfloat16, device="cuda")
    tokens = {}
    for label, mode in (MODES[m] for m in args.modes):
        config = InferenceConfig(**{**common, **mode})
        engine = Engine(model, None, max_batch=max(args.batches), max_len=args.prompt + args.new, config=config)
        for B in args.batches:
            if B > (config.fused_decode_rows or B):
                continue  # the fused mode's larger batches are the compiled mode's
            plist = [p.tolist() for p in prompts[:B]]

            def run(n, plist=plist, B=B, label=label):
                outs, span = engine_run(engine, plist, n)
                assert all(len(o) == n for o in outs)
                if n == args.new:  # every full run's tokens: the first and last are compared below
                    tokens.setdefault((label, B), []).append(outs)
                return span
            name = f"nanoseek engine{label}, batch {B}"
            rows[name] = {"batch": B, **measure(run, B, args.new, args.repeat)}
            rows[name].update(graph_flags(engine.runner.graphs))
            runs = tokens[label, B]
            # the same greedy tokens in every run of this engine (deterministic kernels)?
            rows[name]["same_tokens_run_to_run"] = same_tokens(runs[0], runs[-1])
            compiled = MODES["compiled"][0]
            if label != compiled and (compiled, B) in tokens:  # the same greedy tokens as the compiled engine?
                rows[name]["same_tokens_as_compiled"] = same_tokens(runs[-1], tokens[compiled, B][-1])
            print(f"{name}: {rows[name]}", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    for B in args.batches:
        hf_row = rows.get(f"transformers generate, batch {B}")
        if hf_row:
            for name, r in rows.items():
                if r["batch"] == B:
                    r["decode_speedup_vs_transformers"] = r["decode_tokens_per_s"] / hf_row["decode_tokens_per_s"]
    result = {"benchmark": "decode", **environment(), "preset": "bench-1b", "prompt_tokens": args.prompt,
              "new_tokens": args.new, "dtype": "bfloat16", "greedy": True, "rows": rows}
    result["inference_config"] = common
    path = write_json(result, "decode.json")
    print(f"\n{'run':42s} {'TTFT ms':>8s} {'decode tok/s':>13s} {'peak GiB':>9s} {'vs HF':>7s}")
    for name, r in rows.items():
        print(f"{name:42s} {r['ttft_s'] * 1e3:8.1f} {r['decode_tokens_per_s']:13,.0f} "
              f"{r['peak_memory_gib']:9.2f} {r.get('decode_speedup_vs_transformers', float('nan')):6.1f}x")
    print(f"wrote {path}")
    if args.profile:
        profile_decode_step(model, args, prompts)


def profile_decode_step(model, args, prompts):
    """Where a decode step's GPU time goes: the compiled step run without capture under
    torch.profiler, at batch 1 and the largest batch, kernels by total CUDA time. Every row
    decodes its own token after its own prompt, so rows choose different experts as in the
    engine (the same token in every row would route every row to the same experts)."""
    from nanoseek.infer.cuda_graph import GraphDecoder
    engine = Engine(model, None, max_batch=max(args.batches), max_len=args.prompt + args.new,
                    config=InferenceConfig(cuda_graphs=False))
    plist = [p.tolist() for p in prompts]
    engine_run(engine, plist, 1)  # the requests end at their first token; their rows keep the prompts
    lines = []
    for B in sorted({1, max(args.batches)}):
        step = GraphDecoder(model, engine.cache, None, compile=True, capture=False)
        slots = list(range(B))
        with torch.no_grad():
            nxt = [p[0] for p in plist[:B]]
            for _ in range(3):  # compile, warm up
                step.decode(slots, nxt, [args.prompt] * B)
            torch.cuda.synchronize()
            total, launches, table = profile_kernels(lambda: step.decode(slots, nxt, [args.prompt] * B), 10,
                                                     rows=200)
        lines += [f"## batch {B}: {total:.0f} us of kernels per decode step, {launches:.0f} kernel launches", "",
                  table, ""]
    out = out_dir() / "decode_profile.txt"
    out.write_text("\n".join(lines))
    print("\n".join(lines[:1]), f"\nwrote {out}")


if __name__ == "__main__":
    main()
