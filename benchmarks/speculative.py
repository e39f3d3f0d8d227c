"""MTP speculative decoding on a model trained with MTP: acceptance and speedup.

The model is a checkpoint trained with an MTP module (the GPU speedrun's `sft/final`). The
prompts are held-out problems of the built-in tasks in the chat format it was tuned on;
every request decodes greedily to EOS (at most `--new` tokens), as a user would run it.
The same engine settings (CUDA graphs, torch.compile, BF16 weights) run without speculation
and with K = 1.. drafts per step, at each batch size, in one job:

- acceptance rate: accepted drafts / proposed drafts; mean accepted length: tokens per
  verifying forward (1..K+1);
- tokens/s: generated tokens / wall time of the whole batch (prefill included, the same on
  both sides); speedup: against the non-speculative engine at the same batch size;
- same_tokens: the fraction of requests whose output equals the non-speculative greedy
  output token for token (exact in exact arithmetic; BF16 verification of K+1 positions at
  once may round a near-tie the other way).
Each figure is the median of `--repeat` runs after a warm-up run.

    python benchmarks/speculative.py --model runs/speedrun/sft/final [--k 1 2] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_flags, write_json  # noqa: E402

from nanoseek.data.tasks import get_task  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402
from nanoseek.train.evaluate import task_prompt  # noqa: E402
from nanoseek.loading import load_model_dir  # noqa: E402


def prompts_for(tok, specs: list[str], n: int) -> list[list[int]]:
    out = []
    for spec in specs:  # task:level
        task, level = spec.split(":")
        exs = get_task(task).generate(n, level=int(level), split="test", seed=99, unique=True)
        out += [task_prompt(tok, ex.prompt, "chat") for ex in exs]
    return out


def run_engine(engine, prompts, batch, new):
    """Generate every prompt, `batch` at a time; returns (seconds, outputs)."""
    params = SamplingParams(max_tokens=new)
    outs = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i:i + batch], params)
    sync()
    return time.perf_counter() - t0, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--k", type=int, nargs="+", default=[1])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tasks", nargs="+", default=["arithmetic:2", "arithmetic:3"])
    ap.add_argument("--n", type=int, default=8, help="prompts per task")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()  # CPU: a smoke test only
    dtype = torch.bfloat16 if gpu else torch.float32
    checkpoint, model, tok = load_model_dir(args.model, dtype=dtype)
    prompts = prompts_for(tok, args.tasks, args.n)
    max_len = max(len(p) for p in prompts) + args.new + 8
    compile = not args.no_compile
    rows, base = {}, {}
    for k in [0, *args.k]:
        # fused_decode=0: the plain baseline decodes with the model's forward, as the speculative
        # steps verify with it (the fused Triton step has no speculative form yet)
        engine = Engine(model, tok, max_batch=max(args.batches), max_len=max_len, speculative_k=k,
                        config=InferenceConfig(compile=compile, fused_decode_rows=0))
        for B in args.batches:
            run_engine(engine, prompts[:B], B, args.new)  # warm-up: compile and capture this bucket
            before = dict(engine.speculative_stats() or {})
            times, outs = [], None
            for _ in range(args.repeat):
                t, outs = run_engine(engine, prompts, B, args.new)
                times.append(t)
            t = statistics.median(times)
            tokens = sum(len(o.token_ids) for o in outs)
            row = {"k": k, "batch": B, "requests": len(prompts), "generated_tokens": tokens,
                   "seconds": t, "tokens_per_s": tokens / t}
            row.update(graph_flags(engine.runner.spec_graphs if k else engine.runner.graphs))
            if k:
                after = engine.speculative_stats()
                proposed = after["proposed"] - before.get("proposed", 0)
                accepted = after["accepted"] - before.get("accepted", 0)
                forwards = after["forwards"] - before.get("forwards", 0)
                row.update(acceptance_rate=accepted / max(proposed, 1),
                           mean_accepted_length=(forwards + accepted) / max(forwards, 1),
                           speedup=row["tokens_per_s"] / base[B]["tokens_per_s"],
                           same_tokens=sum(a.token_ids == b.token_ids for a, b in zip(outs, base[B]["outs"]))
                           / len(outs))
            else:
                base[B] = {"tokens_per_s": row["tokens_per_s"], "outs": outs}
            name = f"k={k}, batch {B}" if k else f"no speculation, batch {B}"
            rows[name] = row
            print(name, {x: (round(y, 4) if isinstance(y, float) else y) for x, y in row.items()}, flush=True)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = {"benchmark": "speculative", **environment(), "model": str(checkpoint), "tasks": args.tasks,
              "prompts_per_task": args.n, "repeat": args.repeat, "max_new_tokens": args.new,
              "dtype": str(dtype).removeprefix("torch."), "greedy": True, "compile": compile, "rows": rows}
    path = write_json(result, "speculative.json")
    print(f"\n{'run':28s} {'tok/s':>9s} {'accept':>7s} {'tok/fwd':>8s} {'speedup':>8s} {'same':>5s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['tokens_per_s']:9,.0f} {r.get('acceptance_rate', float('nan')):7.1%} "
              f"{r.get('mean_accepted_length', float('nan')):8.2f} {r.get('speedup', 1.0):7.2f}x "
              f"{r.get('same_tokens', 1.0):5.0%}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
