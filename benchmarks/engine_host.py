"""The engine's host work per decode burst, apart from the GPU: scheduling, reading back and
postprocessing (appending tokens, detokenizing, stop checks) with the captured step replaced
by a stub that returns its tokens at once. While the host does this the GPU waits, so it
adds to every burst's time at large batches (bursts of 8 at batch 32: 256 tokens to take).

tiny preset on the CPU, prompts of 512 tokens, 128 new tokens each, greedy, EOS ignored;
per batch size, with and without a tokenizer (the byte-level one): milliseconds of host work
per burst, median of `--repeat` runs.

    python benchmarks/engine_host.py [--batches 1 32 --repeat 3]
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
from common import environment, write_json  # noqa: E402

from nanoseek import Transformer, preset  # noqa: E402
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402


class StubGraphs:
    """Stands in for the captured decode step: every burst's tokens at once, no model."""

    def fits(self, slots):
        return True

    def decode_burst(self, slots, tokens, positions, n, params=None, uniforms=None):
        return torch.full((n, len(slots)), 300, dtype=torch.long)


def host_ms_per_burst(engine: Engine, batch: int, prompt: list[int], new: int) -> float:
    seqs = [engine.add_request(prompt, SamplingParams(max_tokens=new, ignore_eos=True)) for _ in range(batch)]
    while not all(s.output_ids for s in seqs):  # the prefill (real, on the CPU): not timed
        engine.step()
    bursts, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        bursts += 1
    return (time.perf_counter() - t0) / bursts * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_position_embeddings=1024)).eval()
    prompt = list(range(2, 514))
    rows = {}
    for name, tokenizer in (("no tokenizer", None), ("byte tokenizer", ChatTokenizer(byte_tokenizer(1024)))):
        engine = Engine(model, tokenizer, max_batch=max(args.batches), max_len=len(prompt) + args.new)
        engine.runner.graphs = StubGraphs()
        for B in args.batches:
            ms = statistics.median(host_ms_per_burst(engine, B, prompt, args.new) for _ in range(args.repeat))
            rows[f"{name}, batch {B}"] = {"batch": B, "host_ms_per_burst": ms,
                                          "host_us_per_step": ms * 1e3 / engine.decode_burst}
            print(f"{name}, batch {B}: {ms:.3f} ms per burst", flush=True)
    result = {"benchmark": "engine_host", **environment(), "decode_burst": engine.decode_burst, "rows": rows}
    print(f"wrote {write_json(result, 'engine_host.json')}")


if __name__ == "__main__":
    main()
