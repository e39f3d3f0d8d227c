"""CUDA graphs for the decode step and the greedy speculative step (nano-vllm / gpt-fast style).

A decode step of a small batch is hundreds of short kernels; launching them costs more
than running them. So the step is captured once per batch-size bucket (1, 2, 4, 8, 16, 32,
...) and replayed:

- `GraphDecoder`: embedding, every layer's absorbed MLA over the latent cache and the
  routed experts' grouped GEMMs, the head: next-token logits of each row;
- `GraphSpeculator`: a whole greedy MTP speculative step (speculative.py): K drafts from
  the MTP module, the main model's verifying forward over [last token, d_1..d_K], the
  greedy acceptance and the MTP catch-up; out come the accepted count and the new tokens.

With `compile=True` the step is first put through `torch.compile` (Inductor), which fuses
the norms, RoPE, the router's elementwise work and the residual adds into a few Triton
kernels, and the graph then captures the compiled step: fewer, fuller kernels per token.
Each bucket size is compiled on first use (the size thresholds of the MoE's decode paths
specialise the graph), so the compile cache limit is raised to 64 graphs.

Shapes are static: the bucket covers cache rows [0, bucket) and attention reads all
max_len positions of each row, masked by the row's own position; rows of the bucket that
no sequence holds run a dummy token at position 0 (0..K for a speculative step), slots that
the next prefill of that row writes again before reading. The scheduler decodes every
running request in each decode step, so no row in the bucket belongs to a sequence that is
left out of the step.

Nothing in a step reads back to the host (the forwards are sync-free by construction), so
capture works; if compiling or capturing fails anyway (an unsupported op on some build),
the runner says so once and falls back: from compiled to plain capture, from capture to
eager steps.
"""

from __future__ import annotations

import warnings

import torch

from ..model import StaticCache, Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class BucketGraphs:
    """`_step(*static inputs sliced to the bucket)` captured per bucket, replayed by `run`."""

    kind = "step"

    def __init__(self, num_slots: int, device: torch.device, compile: bool = False, capture: bool = True):
        self.device = device
        self.buckets = [b for b in BUCKETS if b < num_slots] + [num_slots]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, object]] = {}
        self.pool = None
        self.failed = False          # capture failed: callers step eagerly
        self.capture = capture       # False: run the (compiled) step without a graph (tests, CPU)
        self.compiled = None
        if compile:
            # one compiled graph per bucket; several engines (and both step kinds) share the limit
            cfg = torch._dynamo.config
            cfg.cache_size_limit = max(cfg.cache_size_limit, 64)
            self.compiled = torch.compile(self._step, fullgraph=True, dynamic=None)

    def bucket_for(self, rows_needed: int) -> int | None:
        return next((b for b in self.buckets if b >= rows_needed), None)

    def _inputs(self, bucket: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _step(self, *inputs):
        raise NotImplementedError

    def _call(self, bucket: int):
        inputs = self._inputs(bucket)
        if self.compiled is not None:
            try:
                return self.compiled(*inputs)
            except Exception as e:  # noqa: BLE001 — any compiler failure: plain steps, loudly, once
                warnings.warn(f"torch.compile of the {self.kind} step failed ({type(e).__name__}: "
                              f"{str(e)[:300]}); capturing the uncompiled step")
                self.compiled = None
        return self._step(*inputs)

    def _capture(self, bucket: int) -> None:
        if not self.capture:
            self.graphs[bucket] = (None, None)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compilation, lazy inits and autotuning outside the graph
                self._call(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._call(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, out)

    def run(self, bucket: int):
        """The step's outputs for the static inputs as they are now; None if capture failed."""
        if self.failed:
            return None
        if bucket not in self.graphs:
            try:
                self._capture(bucket)
            except Exception as e:  # noqa: BLE001 — fall back to eager steps, loudly, once
                warnings.warn(f"CUDA graph capture of the {self.kind} step failed "
                              f"({type(e).__name__}: {str(e)[:300]}); stepping eagerly")
                self.failed = True
                return None
        graph, out = self.graphs[bucket]
        if graph is None:
            return self._call(bucket)
        graph.replay()
        return out

    def replay_rows(self, buffers: list[torch.Tensor], slots: list[int], *values: list[int]):
        """Write values[i] at rows `slots` of buffers[i], run the step of the smallest bucket
        holding them and return its outputs at those rows; None when no bucket fits or
        capture failed (the caller steps eagerly)."""
        if self.failed or self.bucket_for(max(slots) + 1) is None:
            return None
        out = self.run(self.load(buffers, slots, *values))
        if out is None:
            return None
        return out[: len(slots)] if slots == list(range(len(slots))) else out[torch.tensor(slots, device=self.device)]

    def load(self, buffers: list[torch.Tensor], slots: list[int], *values: list[int]) -> int:
        """Write values[i] at rows `slots` of buffers[i] (zeros elsewhere); returns the bucket."""
        bucket = self.bucket_for(max(slots) + 1)
        host = torch.zeros(len(buffers), bucket, dtype=torch.long)
        idx = torch.tensor(slots)
        for i, vals in enumerate(values):
            host[i, idx] = torch.tensor(vals, dtype=torch.long)
        for i, buf in enumerate(buffers):
            buf.view(buf.shape[0], -1)[:bucket, 0].copy_(host[i], non_blocking=True)
        return bucket


class GraphDecoder(BucketGraphs):
    kind = "decode"

    def __init__(self, model: Transformer, cache: StaticCache, autocast: torch.dtype | None,
                 compile: bool = False, capture: bool = True):
        self.model, self.cache, self.autocast = model, cache, autocast
        device = model.model.embed_tokens.weight.device
        super().__init__(cache.num_slots, device, compile, capture)
        n = cache.num_slots
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)

    def _inputs(self, bucket):
        return self.ids[:bucket], self.positions[:bucket]

    def _step(self, ids_B1, positions_B1):
        view = self.cache.prefix(ids_B1.shape[0])
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None,
                            cache_enabled=False):  # see ModelRunner._context
            out = self.model(ids_B1, positions=positions_B1, cache=view)
        return out.logits[:, -1]

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits [len(slots), V] for one token per listed slot, or None when no graph fits."""
        return self.replay_rows([self.ids, self.positions], slots, tokens, positions)


class GraphSpeculator(BucketGraphs):
    """The greedy speculative step of `ModelRunner.speculate_greedy` over rows [0, bucket)."""

    kind = "speculative"

    def __init__(self, runner, compile: bool = False, capture: bool = True):
        self.runner = runner
        super().__init__(runner.cache.num_slots, runner.device, compile, capture)
        n = runner.cache.num_slots
        self.pending = torch.zeros(n, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(n, dtype=torch.long, device=self.device)

    def _inputs(self, bucket):
        return self.pending[:bucket], self.pos[:bucket]

    def _step(self, pending_B, pos_B):
        B = pending_B.shape[0]
        return self.runner.speculate_greedy(slice(0, B), pending_B, pos_B, self.runner.cache.prefix(B))

    @torch.no_grad()
    def speculate(self, slots: list[int], pending: list[int], positions: list[int]) -> torch.Tensor | None:
        """[len(slots), K + 2]: accepted count, then the K + 1 tokens (speculate's layout)."""
        return self.replay_rows([self.pending, self.pos], slots, pending, positions)
