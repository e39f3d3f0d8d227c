"""CUDA graphs for the decode step (nano-vllm / gpt-fast style).

A decode step of a small batch is hundreds of short kernels; launching them costs more
than running them. So the step — embedding, every layer's absorbed MLA over the latent
cache and the routed experts' grouped GEMMs, the head — is captured once per batch-size
bucket (1, 2, 4, 8, 16, 32, ...) and replayed. Shapes are static: the bucket covers cache
rows [0, bucket) and attention reads all max_len positions of each row, masked by the
row's own position; rows of the bucket that no sequence holds decode a dummy token at
position 0, a slot that the next prefill of that row writes again before reading.

Nothing in the step reads back to the host (the forward is sync-free by construction), so
capture works; if it fails anyway (an unsupported op on some build), the runner says so
once and decodes eagerly.
"""

from __future__ import annotations

import warnings

import torch

from ..model import StaticCache, Transformer


class GraphDecoder:
    def __init__(self, model: Transformer, cache: StaticCache, autocast: torch.dtype | None,
                 max_bucket: int | None = None):
        self.model, self.cache, self.autocast = model, cache, autocast
        self.device = model.model.embed_tokens.weight.device
        n = cache.num_slots
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < n] + [n]
        if max_bucket:
            self.buckets = [b for b in self.buckets if b <= max_bucket] or [self.buckets[0]]
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.failed = False

    def bucket_for(self, rows_needed: int) -> int | None:
        return next((b for b in self.buckets if b >= rows_needed), None)

    def _step(self, bucket: int) -> torch.Tensor:
        view = self.cache.select(list(range(bucket)))
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model(self.ids[:bucket], positions=self.positions[:bucket], cache=view)
        return out.logits[:, -1]

    def _capture(self, bucket: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: lazy inits and autotuning outside the graph
                self._step(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = (graph, logits)

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits [len(slots), V] for one token per listed slot, or None when no graph fits."""
        if self.failed:
            return None
        bucket = self.bucket_for(max(slots) + 1)
        if bucket is None:
            return None
        if bucket not in self.graphs:
            try:
                self.ids.zero_()
                self.positions.zero_()
                self._capture(bucket)
            except Exception as e:  # fall back to eager decoding, loudly, once
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly")
                self.failed = True
                return None
        idx = torch.tensor(slots, device=self.device)
        self.ids.zero_()
        self.positions.zero_()
        self.ids[idx, 0] = torch.tensor(tokens, device=self.device)
        self.positions[idx, 0] = torch.tensor(positions, device=self.device)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[idx]
