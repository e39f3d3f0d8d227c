"""/metrics in the Prometheus text format (prometheus_client): counters of requests by
endpoint and status, histograms of the request latency, the time to a choice's first token
and the time per output token after it, token counters, and gauges read from the engine
worker at scrape time (queue depth, running requests, tokens/s, and the engine's steps by
kind, prefill or decode: how many, their seconds, the tokens they gave).

Each server has its own registry, so two apps in one process (tests) count apart, and
nothing of prometheus_client's default registry (process and platform collectors) is
exported."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
# vLLM's buckets for the same two figures, so dashboards built for one read the other
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0, float("inf"))
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, float("inf"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Live:
    """What the worker and the engine hold at scrape time, as metric families."""

    def __init__(self, worker, engine):
        self.worker, self.engine = worker, engine

    def collect(self):
        w = self.worker
        yield GaugeMetricFamily("nanoseek_queue_depth", "Requests accepted and not finished (waiting + running).",
                                value=w.outstanding)
        yield GaugeMetricFamily("nanoseek_waiting_requests", "Requests waiting for a cache slot.", value=w.waiting)
        yield GaugeMetricFamily("nanoseek_running_requests", "Requests holding a cache slot.", value=w.running)
        yield GaugeMetricFamily("nanoseek_generation_tokens_per_second", "Tokens generated per second, last 10 s.",
                                value=w.tokens_per_second())
        for name, doc, values in (
                ("nanoseek_engine_steps", "engine.step() calls by kind: a prefill chunk, or a decode burst of up "
                                          "to --decode-burst steps.", w.steps),
                ("nanoseek_engine_step_seconds", "Seconds spent in engine steps, by kind.", w.step_seconds),
                ("nanoseek_engine_step_tokens", "Tokens the engine's steps generated, by kind.", w.step_tokens)):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, value in values.items():
                family.add_metric([kind], value)
            yield family
        stats = self.engine.speculative_stats()  # None without speculation
        if stats is not None:
            yield GaugeMetricFamily("nanoseek_speculative_acceptance_rate", "Accepted / proposed MTP drafts.",
                                    value=stats["acceptance_rate"])


class Metrics:
    def __init__(self, worker, engine):
        """worker, engine: the parts whose state each scrape reads."""
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("nanoseek_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("nanoseek_request_latency_seconds", "Time from request to the last byte.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds",
                              "Time from a local request's arrival to its choice's first output text.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("nanoseek_time_per_output_token_seconds",
                              "A local choice's time from its first to its last token, per token after the first.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "Prompt tokens of local requests.", registry=r)
        self.completion_tokens = Counter("nanoseek_completion_tokens", "Generated tokens of local requests.",
                                         registry=r)
        self.upstream_requests = Counter("nanoseek_upstream_requests", "Requests proxied upstream by status.",
                                         ["status"], registry=r)
        r.register(_Live(worker, engine))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def upstream(self, status: int | str) -> None:
        self.upstream_requests.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
