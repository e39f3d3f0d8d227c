"""Serving under load: `nanoseek serve` in its own process, C concurrent streaming clients.

A random model of the preset (seeded; `nanoseek init`) is served with `--max-batch`
slots; each of `--clients` clients streams `--requests` chat completions one after the
other, every request with its own prompt and seed (sampled at temperature 0.8, EOS
ignored, exactly `--new` tokens). Reported: requests/s and output tokens/s over the whole
run, the p50/p99 of request latency (to the last byte) and of time to first token, and from
the server's /metrics the engine's share: its steps, their mean length and tokens, and the
fraction of the run spent inside them (the rest is HTTP, JSON and the event loop).
The clients are asyncio + httpx in this process; the server is a separate process.

    python benchmarks/serve_load.py --preset tiny --clients 32                     # CPU
    python benchmarks/serve_load.py --preset bench-1b --clients 64 --max-batch 64 --compile  # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, percentile, write_json  # noqa: E402

from nanoseek.serve.worker import STEP_KINDS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, i: int, new: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {i}: tell me about {i * 7919}."}],
            "max_tokens": new, "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft or 0.0,
            "completion_tokens": usage["completion_tokens"]}


ENGINE_COUNTERS = ("nanoseek_engine_steps", "nanoseek_engine_step_seconds", "nanoseek_engine_step_tokens")


def engine_counters(metrics_text: str) -> dict[tuple[str, str], float]:
    """The engine's step counters from a /metrics scrape: (counter, kind) -> value."""
    return {(family.name, sample.labels["kind"]): sample.value
            for family in text_string_to_metric_families(metrics_text) if family.name in ENGINE_COUNTERS
            for sample in family.samples if sample.name == family.name + "_total"}


def engine_share(before: dict, after: dict, wall: float) -> dict:
    """Where the run's time went on the server: the engine's steps (engine.step() calls: how
    many, their mean length and tokens), all of them and by kind (prefill chunks, decode
    bursts), and the fraction of the wall clock spent inside them; the rest is the server's
    and the clients' own work (HTTP, JSON, the event loop) and waiting."""
    def diff(kinds):
        return [sum(after.get((k, kind), 0.0) - before.get((k, kind), 0.0) for kind in kinds)
                for k in ENGINE_COUNTERS]

    steps, seconds, tokens = diff(STEP_KINDS)
    out = {"engine_steps": int(steps), "engine_busy_fraction": seconds / wall,
           "engine_step_ms": 1e3 * seconds / max(steps, 1), "tokens_per_step": tokens / max(steps, 1)}
    for kind in STEP_KINDS:
        steps, seconds, tokens = diff([kind])
        out.update({f"{kind}_steps": int(steps), f"{kind}_busy_fraction": seconds / wall,
                    f"{kind}_step_ms": 1e3 * seconds / max(steps, 1), f"{kind}_tokens_per_step": tokens / max(steps, 1)})
    return out


async def load(url: str, clients: int, requests: int, new: int) -> tuple[list[dict], float, dict]:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(c):
            return [await one_request(client, c * requests + k, new) for k in range(requests)]
        # warm-up, untimed: one wave at full concurrency (compilation and graph capture of the
        # batch sizes the run meets, allocator)
        await asyncio.gather(*(one_request(client, 10**6 + c, new) for c in range(clients)))
        before = engine_counters((await client.get("/metrics")).text)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        after = engine_counters((await client.get("/metrics")).text)
        return [r for rs in results for r in rs], wall, engine_share(before, after, wall)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    p.add_argument("--new", type=int, default=64, help="tokens per completion")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compile", action="store_true", help="serve with --compile (GPU)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        subprocess.run([sys.executable, "-m", "nanoseek.cli", "init", "--preset", args.preset, "--out", str(model),
                        "--dtype", args.dtype], check=True)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model),
                                   "--served-model-name", "bench", "--port", str(port), "--device", args.device,
                                   "--max-batch", str(args.max_batch), "--max-len", str(args.max_len),
                                   "--max-queue", str(4 * args.clients)] + (["--compile"] if args.compile else []))
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.5)
            results, wall, engine = asyncio.run(load(url, args.clients, args.requests, args.new))
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            server.wait(timeout=30)

    lat = [r["latency_s"] for r in results]
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["completion_tokens"] for r in results)
    figures = {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
               "output_tokens_per_s": tokens / wall,
               "latency_p50_s": statistics.median(lat), "latency_p99_s": percentile(lat, 99),
               "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 99), **engine}
    print(f"serve load: {args.preset}, {args.clients} clients × {args.requests} requests × {args.new} tokens, "
          f"max_batch {args.max_batch}")
    print(f"  {'requests/s':<22}{figures['requests_per_s']:10.2f}")
    print(f"  {'output tokens/s':<22}{figures['output_tokens_per_s']:10.1f}")
    for name in ("latency", "ttft"):
        print(f"  {name + ' p50 / p99 (s)':<22}{figures[name + '_p50_s']:10.3f} / {figures[name + '_p99_s']:.3f}")
    print(f"  engine: {engine['engine_steps']} steps of {engine['engine_step_ms']:.2f} ms and "
          f"{engine['tokens_per_step']:.1f} tokens on average, busy {engine['engine_busy_fraction']:.0%} "
          f"of the wall clock")
    for kind in STEP_KINDS:
        print(f"    {kind}: {engine[kind + '_steps']} steps of {engine[kind + '_step_ms']:.2f} ms and "
              f"{engine[kind + '_tokens_per_step']:.1f} tokens, {engine[kind + '_busy_fraction']:.0%} of the wall clock")
    assert all(r["completion_tokens"] == args.new for r in results)
    assert "nanoseek_queue_depth" in metrics
    path = write_json({**environment(), "config": vars(args), "figures": figures},
                      f"serve_load_{args.preset}.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
