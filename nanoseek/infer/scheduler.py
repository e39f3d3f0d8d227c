"""Continuous batching over a fixed number of cache slots.

Requests wait in arrival order. Between steps, waiting requests take free slots (lowest
first, so the running rows tend to stay one contiguous run of the cache) and are prefilled
together; otherwise every running request decodes (one token, or a burst of them: engine.py). A request leaves, and its
slot is free for the next, as soon as it finishes or is aborted.
"""

from __future__ import annotations

import heapq
from collections import deque

from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int):
        self.free_slots = list(range(num_slots))  # a heap
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[str, list[Sequence]] | None:
        """("prefill", newly admitted) when requests wait and slots are free, else
        ("decode", all running, by slot); None when there is nothing to do."""
        if self.waiting and self.free_slots:
            batch, longest = [], 0
            while self.waiting and self.free_slots:
                seq = self.waiting[0]
                padded = max(longest, len(seq.prompt_ids)) * (len(batch) + 1)
                if batch and padded > self.max_prefill_tokens:
                    break
                self.waiting.popleft()
                seq.slot, seq.status = heapq.heappop(self.free_slots), Status.RUNNING
                longest = max(longest, len(seq.prompt_ids))
                batch.append(seq)
            self.running.extend(batch)
            return "prefill", batch
        if self.running:
            return "decode", sorted(self.running, key=lambda s: s.slot)
        return None

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot, seq.status = None, Status.FINISHED

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
