"""Who may send feedback on what: ids this server issued, recently, to the same key, at a
bounded rate per key (or per client address without keys)."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class IssuedIds:
    """Request ids answered in the last `window` seconds (at most `capacity`, oldest dropped),
    each with the key id that asked."""

    def __init__(self, window: float = 3600.0, capacity: int = 200_000):
        self.window, self.capacity = window, capacity
        self._ids: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, key_id: str | None) -> None:
        with self._lock:
            self._ids[request_id] = (time.monotonic(), key_id)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def issued_to(self, request_id: str, key_id: str | None) -> bool:
        with self._lock:
            self._expire(time.monotonic())
            entry = self._ids.get(request_id)
        return entry is not None and entry[1] == key_id

    def _expire(self, now: float) -> None:
        while self._ids:
            first = next(iter(self._ids.values()))
            if now - first[0] <= self.window:
                return
            self._ids.popitem(last=False)


def remember(issued: IssuedIds | None, record: dict, *request_ids: str) -> None:
    """Note ids this request was answered under, for the key in its audit record."""
    if issued is not None:
        for request_id in request_ids:
            issued.add(request_id, record.get("key_id"))


class RateLimit:
    """A token bucket per caller: `per_minute` requests a minute, bursts up to the same number."""

    MAX_CALLERS = 10_000  # then callers whose bucket is full again are forgotten

    def __init__(self, per_minute: float):
        self.rate, self.burst = per_minute / 60.0, max(1.0, per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def _forget_idle(self, now: float) -> None:
        self._buckets = {c: (t, at) for c, (t, at) in self._buckets.items()
                         if t + (now - at) * self.rate < self.burst}

    def retry_after(self, caller: str) -> int:
        """0 if the caller may go now (a token is taken), else whole seconds until it may."""
        with self._lock:
            now = time.monotonic()
            if len(self._buckets) > self.MAX_CALLERS:
                self._forget_idle(now)
            tokens, at = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0
            self._buckets[caller] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate)) if self.rate > 0 else 60
