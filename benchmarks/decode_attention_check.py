"""Which of the engine's decode paths gives greedy tokens that differ from a full forward without
a cache: the decode attention (kernel or torch) crossed with CUDA graphs, compile and the fused
step, two prompts of different lengths, on a tiny model trained to copy (`--model copier`,
tests/test_fused_decode.copying_model: decisive choices, so a path that parts is at fault) or the
kernel tests' model with its weights x5 (`--model sharp`: near-one-hot attention that amplifies
rounding, where the trace found paths parting by rounding alone). Prints one line a path and the
first step where a row leaves the reference; writes decode_attention_check.json to $OUT
(benchmarks/results without it).

Steps: `captured` (the engine's CUDA-graph step), `graph-step` (the same step, compiled or
not, run without capturing it: the ops' Python bodies run at every call) and `eager` (the
engine's steps without the graph step; nothing compiled).
`--trace` then pins down where the compiled step with the kernels parts from the uncompiled
one. Both run as `graph-step`, and every call records what the kernels were handed (queries,
positions, the rows' cache up to their positions), what they returned, and what the same call
returns again on fresh copies of its inputs. The first call at which the two runs differ by
more than rounding says whether the compiled graph handed the op other inputs (and which: the
cache's newest entry is the one the step just wrote), or the op made other outputs of the same
ones; an output that changes when the call is repeated says the kernels read something else.
Each call's output is also set against float64 on that run's own inputs, which tells a kernel
that computes wrongly under compile from a graph that hands it other (differently rounded) inputs.
`--eager-op` adds a path whose attention call is kept out of the compiled graph (a graph break
a layer), as a workaround to check.

    python benchmarks/decode_attention_check.py [--model copier|sharp] [--max-len 40] [--new 12] [--trace]
        [--eager-op]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402


def engine_for(model, step: str, config, max_len: int, fused_rows, launch):
    """An engine whose decode step is `step` (the module docstring's)."""
    from nanoseek.infer import Engine
    from nanoseek.infer.cuda_graph import GraphDecoder
    engine = Engine(model, max_batch=2, max_len=max_len, config=config)
    if step == "graph-step":
        engine.runner.graphs = GraphDecoder(model, engine.cache, engine.runner.autocast, compile=config.compile,
                                            capture=False, fused_rows=fused_rows or 0, fused_launch=launch)
    return engine


def traced_run(model, prompts, new, compiled: bool, launch, max_len: int) -> list[dict]:
    """Every call of the attention kernels' op body in an engine run (the graph step, not
    captured): its inputs and output on the host, float64."""
    from nanoseek.infer import SamplingParams
    from nanoseek.infer import latent_attention as la
    from nanoseek.infer.config import InferenceConfig
    calls, attend = [], la.attend_latent

    def recording(q_lat, q_pe, ckv, kpe, positions_B, *rest, **kw):  # the op's body calls it
        o = attend(q_lat, q_pe, ckv, kpe, positions_B, *rest, **kw)
        # the same call again on fresh copies of its inputs (and fresh scratch): an output that
        # changes says the kernels read something besides their inputs (unwritten scratch, aliasing)
        again = attend(*(t.clone() for t in (q_lat, q_pe, ckv, kpe, positions_B)), *rest, **kw)
        pos = positions_B.tolist()
        call = dict(positions=pos, q_lat=q_lat.double().cpu(), q_pe=q_pe.double().cpu(), out=o.double().cpu(),
                    out_again=again.double().cpu(), ckv=[ckv[b, :p + 1].double().cpu() for b, p in enumerate(pos)],
                    kpe=[kpe[b, :p + 1].double().cpu() for b, p in enumerate(pos)])
        calls.append(dict(call, out_exact=exact_attention(call, *rest[:3])))
        return o
    la.attend_latent = recording
    try:
        config = InferenceConfig(decode_attention="kernel", fused_launch=launch, cuda_graphs=True,
                                 compile=compiled, fused_decode_rows=0, decode_burst=1)
        engine = engine_for(model, "graph-step", config, max_len, 0, launch)
        tokens = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0))]
    finally:
        la.attend_latent = attend
    print(f"traced compile={compiled}: {len(calls)} calls, tokens {tokens}", flush=True)
    return calls


def exact_attention(call: dict, w_kvb, scale: float, V: int) -> torch.Tensor:
    """What attend_latent should return for a recorded call's inputs (float64, on the host): per
    row, softmax((q_lat·c_kv + q_pe·k_pe)·scale) over its positions, summed over c_kv, then W_UV."""
    q_lat, q_pe = call["q_lat"], call["q_pe"]
    w_uv = w_kvb.double().cpu().unflatten(0, (q_lat.shape[1], -1))[:, -V:]  # [H, V, C]: each head's after W_UK's
    out = []
    for b, (c, k) in enumerate(zip(call["ckv"], call["kpe"])):  # a row's cache up to its position
        scores = (q_lat[b] @ c.T + q_pe[b] @ k.T) * scale
        out.append(torch.einsum("hc,hvc->hv", scores.softmax(-1) @ c, w_uv).flatten())
    return torch.stack(out)


# 4 BF16 units of a tensor's largest value: the compiled and the eager step round their BF16
# products differently (the absorbed query differed by half a unit at the first call), a fault
# by much more
ROUNDING = 2 ** -6


def deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to a's largest value; inf for other shapes."""
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30)


def compare_calls(eager: list[dict], compiled: list[dict]) -> list[dict]:
    """Per op call, compiled against eager: each input's and the output's deviation; the cache's
    per row, over its positions and at its newest one (the entry the step just wrote); and, in
    each run, the output against the same call repeated on fresh copies (`again`)."""
    table = []
    for i, (e, c) in enumerate(zip(eager, compiled)):
        row = dict(call=i, positions=e["positions"], compiled_positions=c["positions"],
                   **{k: round(deviation(e[k], c[k]), 6) for k in ("q_lat", "q_pe", "out")})
        for k in ("ckv", "kpe"):
            row[k] = [round(deviation(x, y), 6) for x, y in zip(e[k], c[k])]
            row[k + "_newest"] = [round(deviation(x[-1:], y[-1:]), 6) for x, y in zip(e[k], c[k])]
        row["again_eager"] = round(deviation(e["out"], e["out_again"]), 6)
        row["again_compiled"] = round(deviation(c["out"], c["out_again"]), 6)
        # each run's output against float64 on its own inputs: large in the compiled run alone
        # says the kernels compute wrongly there; small in both, that the graph fed them other inputs
        row["exact_eager"] = round(deviation(e["out_exact"], e["out"]), 6)
        row["exact_compiled"] = round(deviation(c["out_exact"], c["out"]), 6)
        table.append(row)
    return table


def worst(row: dict) -> float:
    values = [v for k, v in row.items()  # compiled against eager only; the float64 checks are their own
              if k not in ("call", "positions", "compiled_positions") and not k.startswith("exact_")]
    flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return max(flat) if row["positions"] == row["compiled_positions"] else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--trace", action="store_true", help="compare the op's calls, compiled against not")
    ap.add_argument("--eager-op", action="store_true", help="also the path with the attention call kept eager")
    ap.add_argument("--only-trace", action="store_true", help="the trace alone, none of the paths (a short call)")
    ap.add_argument("--model", choices=("copier", "sharp"), default="copier",
                    help="copier: a tiny model trained to repeat its prompt's period, whose greedy choices lead "
                         "by 4-6 logits; sharp: the kernel tests' model (weights x5), whose rounding amplifies")
    args = ap.parse_args()
    from test_fused_decode import copy_prompts, copying_model, greedy_without_cache, sharp_model  # noqa: E402
    from test_latent_attention import LAUNCH  # noqa: E402
    from nanoseek.infer import SamplingParams
    from nanoseek.infer.config import InferenceConfig

    if args.model == "copier":
        model, (prompts, _) = copying_model(), copy_prompts(args.new)
    else:
        model, prompts = sharp_model(), [[5, 9, 2, 7, 1, 3, 8], [4, 4]]
    # a row that parts from the reference where the margin (top logit less the runner-up) is a
    # rounding's width has met a near-tie; where it is wide, a fault
    ref, margins = zip(*(greedy_without_cache(model, p, args.new) for p in prompts))
    margins = [[round(m, 4) for m in row] for row in margins]
    print("reference", list(ref), "margins", list(margins), flush=True)
    rows = []
    compiled_graphs = ("captured", True, 0, 8)
    paths = [("torch", *compiled_graphs), ("torch", "captured", True, None, 8),
             ("kernel", *compiled_graphs), ("kernel", "captured", True, None, 8), ("kernel", "captured", True, 0, 1),
             ("kernel", "captured", False, 0, 8), ("kernel", "graph-step", True, 0, 1),
             ("kernel", "graph-step", False, 0, 1), ("kernel", "eager", False, 0, 1)]
    if args.eager_op:
        paths.append(("kernel-eager-op", "captured", True, 0, 8))
    if args.only_trace:
        paths = []
    for attention, step, compiled, fused, burst in paths:
        eager_op = attention == "kernel-eager-op"
        config = InferenceConfig(decode_attention="kernel" if eager_op else attention, fused_launch=LAUNCH,
                                 cuda_graphs=step != "eager", compile=compiled, fused_decode_rows=fused,
                                 decode_burst=burst)
        name = f"{attention} {step} compile={compiled} fused_rows={fused} burst={burst}"
        from nanoseek.infer.latent_attention import LatentDecodeAttention
        call = LatentDecodeAttention.__call__
        if eager_op:  # Dynamo breaks the graph at each layer's attention call and runs it as Python
            LatentDecodeAttention.__call__ = torch.compiler.disable(call)
        try:
            engine = engine_for(model, step, config, args.max_len, fused, LAUNCH)
            out = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=args.new, temperature=0))]
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
            rows.append(dict(path=name, error=f"{type(e).__name__}: {e}"))
            print(name, "ERROR", e, flush=True)
            continue
        finally:
            LatentDecodeAttention.__call__ = call
        first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), None) for o, r in zip(out, ref)]
        rows.append(dict(path=name, tokens=out, first_difference=first))
        print(f"{name}: first difference per row {first} {out}", flush=True)
    trace = None
    if args.trace or args.only_trace:
        eager, compiled = (traced_run(model, prompts, args.new, c, LAUNCH, args.max_len) for c in (False, True))
        table = compare_calls(eager, compiled)
        differ = next((r for r in table if worst(r) > 1e-3), None)  # float32 kernels' reordering stays below
        fault = next((r for r in table if worst(r) > ROUNDING), None)
        trace = dict(first_difference=differ or "no call differs", first_beyond_rounding=fault or "none",
                     calls=table)
        print("trace: first call where compiled and eager differ:", differ or "none", flush=True)
        print(f"trace: first call beyond {ROUNDING:g} of a value's largest:", fault or "none", flush=True)
        exact = {run: max(r[f"exact_{run}"] for r in table) for run in ("eager", "compiled")}
        trace["kernels_against_float64"] = exact
        print("trace: the kernels' largest deviation from float64 on their own inputs:", exact, flush=True)
        start = max(0, (fault["call"] if fault else 0) - 2)
        for r in table[start:start + 6]:  # the calls around it, each value's deviation
            print("  ", r, flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    write_json(dict(model=args.model, reference=ref, margins=margins, rows=rows, trace=trace, device=device),
               "decode_attention_check.json")


if __name__ == "__main__":
    main()
