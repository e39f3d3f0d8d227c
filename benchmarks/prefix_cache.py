"""Prefix caching: many requests that share a long system prompt, with and without the cache.

`--requests` requests (default 64) arrive at once; each is the same `--system-tokens`-token
system prompt (default 2,000) followed by its own `--question-tokens` tokens, and decodes
`--new` tokens greedily (EOS ignored). The same engine (random weights of the preset, seeded;
CUDA graphs on a GPU) runs them without and with the prefix cache, in one process, after a
warm-up of each. Reported per side: TTFT p50 / p99 (from the arrival of all requests to a
request's first token, which comes back with its prefill step), throughput (output tokens
and requests per second over the whole run), prompt tokens computed, how many requests'
greedy tokens are identical on both sides, and where they part, which token a float32 copy of
the model prefers and by how much; and the TTFT p50 ratio.

    python benchmarks/prefix_cache.py --preset tiny --device cpu --requests 16   # CPU smoke run
    python benchmarks/prefix_cache.py --preset bench-1b                         # GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, graph_flags, percentile, write_json  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.infer.config import InferenceConfig  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402


def prompts_for(args, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    system = [rng.randrange(9, vocab) for _ in range(args.system_tokens)]
    return [system + [rng.randrange(9, vocab) for _ in range(args.question_tokens)] for _ in range(args.requests)]


def run(engine: Engine, prompts: list[list[int]], new: int) -> dict:
    """All prompts at once; per request the time to its first token, and the whole run."""
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    computed = engine.prefilled_tokens
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    seqs = [engine.add_request(p, params) for p in prompts]
    ttft: dict[str, float] = {}
    while engine.has_unfinished():
        engine.step()  # its tokens are on the host when it returns: the time is the GPU's too
        now = time.perf_counter() - start
        for s in seqs:
            if s.output_ids and s.request_id not in ttft:
                ttft[s.request_id] = now
    wall = time.perf_counter() - start
    out_tokens = sum(len(s.output_ids) for s in seqs)
    return {"ttft_p50_s": statistics.median(ttft.values()), "ttft_p99_s": percentile(list(ttft.values()), 99),
            "wall_s": wall, "output_tokens_per_s": out_tokens / wall, "requests_per_s": len(seqs) / wall,
            "prompt_tokens": sum(map(len, prompts)), "prompt_tokens_computed": engine.prefilled_tokens - computed,
            "tokens": [s.output_ids for s in seqs]}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter's length when one is the
    other's start), None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def referee(reference: Transformer, prompts: list[list[int]], pairs: list[tuple[list[int], list[int]]]) -> dict:
    """Where the two sides' greedy tokens first part, the float32 reference model's verdict:
    the margin between the two tokens there (in units of the logits' standard deviation), and
    which side it prefers. A wrong cached prefix would lose clearly and every time; BF16
    rounding tipping a near tie loses by a hair, and each side about as often."""
    margins, cache_preferred = [], 0
    dev = next(reference.parameters()).device
    for prompt, (plain, cached) in zip(prompts, pairs):
        at = first_difference(plain, cached)
        if at is None or at == min(len(plain), len(cached)):  # equal, or one stops early: no two tokens
            continue
        ids = torch.tensor([prompt + plain[:at]], device=dev)
        logits = reference(ids, logits_to_keep=1).logits[0, -1].double()
        gap = (logits[cached[at]] - logits[plain[at]]).item()
        margins.append(abs(gap) / logits.std().item())
        cache_preferred += gap > 0
    return {"parted": len(margins), "cache_preferred": cache_preferred,
            "margin_over_logit_std": {"median": statistics.median(margins), "max": max(margins)} if margins else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    args = p.parse_args()

    max_len = args.system_tokens + args.question_tokens + args.new
    torch.manual_seed(0)
    # the preset's context is raised where it is shorter than the prompts (random weights either way)
    cfg = preset(args.preset, max_position_embeddings=max(max_len, preset(args.preset).max_position_embeddings))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = Transformer(cfg).to(device=args.device, dtype=dtype).eval()
    prompts = prompts_for(args, cfg.vocab_size)
    # as many requests as the run: the decode buckets it will use are captured (and compiled) here
    warm = [[7] * 40 + [i] for i in range(args.requests)]
    results = {}
    for cached in (False, True):
        engine = Engine(model, None, max_batch=args.max_batch, max_len=max_len,
                        config=InferenceConfig(compile=args.compile, prefix_cache=cached))
        run(engine, warm, 4)  # captures and compiles; its prefixes are unrelated to the measured ones
        results["prefix_cache" if cached else "no_cache"] = {**run(engine, prompts, args.new),
                                                             **graph_flags(engine.runner.graphs)}
    # on a GPU the suffix's prefill runs in other batch shapes than the whole prompt's, so BF16
    # rounding may break a random model's near-tied logits the other way: count the requests,
    # and let a float32 copy judge where they part (a wrong cached prefix loses clearly)
    pairs = list(zip(results["no_cache"].pop("tokens"), results["prefix_cache"].pop("tokens")))
    identical = sum(a == b for a, b in pairs)
    same = identical == len(pairs)
    first_differences = sorted(first_difference(a, b) for a, b in pairs if a != b)
    verdict = referee(model.float(), prompts, pairs) if first_differences else None
    ratio = results["no_cache"]["ttft_p50_s"] / results["prefix_cache"]["ttft_p50_s"]
    print(f"{args.requests} requests, {args.system_tokens}-token shared system prompt + {args.question_tokens} "
          f"tokens each, {args.new} new tokens, {args.preset} on {args.device}")
    print(f"{'':14} {'TTFT p50 s':>11} {'TTFT p99 s':>11} {'tok/s':>9} {'req/s':>7} {'computed':>9}")
    for name, r in results.items():
        print(f"{name:14} {r['ttft_p50_s']:11.3f} {r['ttft_p99_s']:11.3f} {r['output_tokens_per_s']:9.1f} "
              f"{r['requests_per_s']:7.2f} {r['prompt_tokens_computed']:9d}")
    print(f"TTFT p50 ratio (no cache / cache): {ratio:.2f}x; identical greedy tokens: {identical} of "
          f"{len(pairs)} requests" + (f" (the others first differ at tokens {first_differences})"
                                      if first_differences else ""))
    if verdict:
        m = verdict["margin_over_logit_std"]
        print(f"float32 reference where they part: the cached side's token preferred in {verdict['cache_preferred']} "
              f"of {verdict['parted']}; margin between the two tokens / logits' std: median {m['median']:.2e}, "
              f"max {m['max']:.2e}")
    path = write_json({"benchmark": "prefix_cache", **environment(), "config": vars(args),
                       "results": results, "ttft_p50_ratio": ratio, "identical_tokens": same,
                       "identical_requests": identical, "first_differences": first_differences,
                       "float32_referee": verdict},
                      f"prefix_cache_{args.preset}_{args.device.split(':')[0]}.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
