"""/metrics in the Prometheus text format, written by hand (no dependency): counters of
requests by endpoint and status, a latency histogram, token counters, and gauges read from
the engine worker at scrape time (queue depth, running requests, tokens/s, and the engine's
steps: how many, their seconds, the tokens they gave)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()        # (endpoint, status) -> n
        self.latency_buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_sum, self.latency_count = 0.0, 0
        self.prompt_tokens = self.completion_tokens = 0
        self.upstream_requests: Counter = Counter()  # status -> n

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint, str(status)] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, le in enumerate(LATENCY_BUCKETS):
                if seconds <= le:
                    self.latency_buckets[i] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, worker=None, engine=None) -> str:
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

        with self._lock:
            metric("nanoseek_requests_total", "counter", "HTTP requests by endpoint and status.",
                   [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self.requests.items())])
            buckets = [({"le": "+Inf" if le == float("inf") else f"{le:g}"}, n)
                       for le, n in zip(LATENCY_BUCKETS, self.latency_buckets)]
            out.append("# HELP nanoseek_request_latency_seconds Time from request to the last byte.")
            out.append("# TYPE nanoseek_request_latency_seconds histogram")
            for labels, n in buckets:
                out.append(f'nanoseek_request_latency_seconds_bucket{{le="{labels["le"]}"}} {n}')
            out.append(f"nanoseek_request_latency_seconds_sum {self.latency_sum:.6f}")
            out.append(f"nanoseek_request_latency_seconds_count {self.latency_count}")
            metric("nanoseek_prompt_tokens_total", "counter", "Prompt tokens of local requests.",
                   [({}, self.prompt_tokens)])
            metric("nanoseek_completion_tokens_total", "counter", "Generated tokens of local requests.",
                   [({}, self.completion_tokens)])
            metric("nanoseek_upstream_requests_total", "counter", "Requests proxied upstream by status.",
                   [({"status": s}, n) for s, n in sorted(self.upstream_requests.items())])
        if worker is not None:
            metric("nanoseek_queue_depth", "gauge", "Requests accepted and not finished (waiting + running).",
                   [({}, worker.outstanding)])
            metric("nanoseek_waiting_requests", "gauge", "Requests waiting for a cache slot.",
                   [({}, worker.waiting)])
            metric("nanoseek_running_requests", "gauge", "Requests holding a cache slot.",
                   [({}, worker.running)])
            metric("nanoseek_generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
                   [({}, f"{worker.tokens_per_second():.3f}")])
            metric("nanoseek_engine_steps_total", "counter",
                   "engine.step() calls: a prefill chunk, or a decode burst of up to --decode-burst steps.",
                   [({}, worker.steps)])
            metric("nanoseek_engine_step_seconds_total", "counter", "Seconds spent in engine steps.",
                   [({}, f"{worker.step_seconds:.6f}")])
            metric("nanoseek_engine_step_tokens_total", "counter", "Tokens the engine's steps generated.",
                   [({}, worker.step_tokens)])
        stats = engine.speculative_stats() if engine is not None else None  # None without speculation
        if stats is not None:
            rate = stats["acceptance_rate"]
            metric("nanoseek_speculative_acceptance_rate", "gauge", "Accepted / proposed MTP drafts.",
                   [({}, f"{rate:.4f}")])
        return "\n".join(out) + "\n"
