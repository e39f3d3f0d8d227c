"""Continuous batching over a fixed number of cache slots.

Requests wait in arrival order. Between steps, waiting requests take free slots (lowest
first, so the running rows tend to stay one contiguous run of the cache) and are prefilled
together; otherwise every running request decodes (one token, or a burst of them: engine.py). A request leaves, and its
slot is free for the next, as soon as it finishes or is aborted.

With a prefix cache (prefix_cache.py) a request takes the slot that serves its prompt's
cached prefix best, and a request that shares more of its prompt with one admitted in the
same step than the cache holds waits one step, to read that prefix from the cache instead
of computing it a second time (64 requests with one system prompt: one computes it).
"""

from __future__ import annotations

import heapq
from collections import deque

from .prefix_cache import PrefixCache
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int, prefix_cache: PrefixCache | None = None):
        self.free_slots = list(range(num_slots))  # a heap
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_cache = prefix_cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]] | None:
        """("prefill", newly admitted) when requests wait and slots are free, else
        ("decode", all running, by slot); None when there is nothing to do."""
        if self.waiting and self.free_slots:
            batch, longest, hashes, protected = [], 0, [], set()
            while self.waiting and self.free_slots:
                seq = self.waiting[0]
                cached = 0
                if self.prefix_cache is not None:
                    planned = self._plan(seq, hashes, protected)
                    if planned is None:
                        break
                    seq_hashes, cached = planned
                new = len(seq.prompt_ids) - cached
                padded = max(longest, new) * (len(batch) + 1)
                if batch and padded > self.max_prefill_tokens:
                    break
                self.waiting.popleft()
                if self.prefix_cache is None:
                    seq.slot = heapq.heappop(self.free_slots)
                else:
                    seq.slot, seq.copy_from, seq.cached_tokens = self.prefix_cache.choose(
                        self.free_slots, seq_hashes, len(seq.prompt_ids) - 1, protected)
                    self.free_slots.remove(seq.slot)
                    heapq.heapify(self.free_slots)
                    hashes.append(seq_hashes)
                    if seq.copy_from is not None:
                        protected.add(seq.copy_from)
                seq.status = Status.RUNNING
                longest = max(longest, new)
                batch.append(seq)
            if batch:
                self.running.extend(batch)
                return "prefill", batch
        if self.running:
            return "decode", sorted(self.running, key=lambda s: s.slot)
        return None

    def _plan(self, seq: Sequence, batch_hashes: list[list[bytes]], protected: set[int]):
        """(the prompt's block hashes, its cached prefix in tokens), or None when it should wait:
        no slot is free but sources of this step's copies, or a request of this step computes
        more of its prompt than the cache holds."""
        if not [s for s in self.free_slots if s not in protected]:
            return None
        if seq.params.prompt_logprobs is not None:  # its logprobs need every prompt position's forward
            return [], 0
        pc = self.prefix_cache
        hashes = pc.hashes(seq.prompt_ids)
        limit = len(seq.prompt_ids) - 1  # the last prompt token is computed: its logits choose the next
        _, cached = pc.longest(hashes, limit)
        for other in batch_hashes:
            shared = next((i for i, (a, b) in enumerate(zip(hashes, other)) if a != b), min(len(hashes), len(other)))
            if min(shared * pc.block_size, limit // pc.block_size * pc.block_size) > cached:
                return None
        return hashes, cached

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
            if self.prefix_cache is not None and seq.output_ids:  # every token but the last is written
                self.prefix_cache.record(seq.slot, seq.prompt_ids + seq.output_ids[:-1])
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot, seq.status = None, Status.FINISHED

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
