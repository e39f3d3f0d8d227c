"""The one thread that owns the engine: it steps continuously while any request runs.

HTTP handlers never touch the engine. They `submit()` a Job (prompt ids, SamplingParams,
their event loop and an asyncio.Queue) and `abort()` by request id; both go through a
thread-safe inbox that the worker drains between steps. What a step produced for a job is
pushed into that job's queue with `loop.call_soon_threadsafe`, so a handler simply awaits
`queue.get()`. New requests join the running batch at the next step (continuous batching),
and an abort frees the request's cache slot before the next step.

Events put on a job's queue:
    (index, "text", new_text, new_logprobs)                   stable text, in order; the logprobs
                                                              of the tokens since the last event
    (index, "done", finish_reason, prompt_tokens, completion_tokens, info)
    (index, "error", message, status)         400: the engine refused it; 500: a step failed;
                                              503: the server is shutting down
info: {"prompt_logprobs": the prompt's (or None), "cached_tokens": prompt tokens from the prefix cache}.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("nanoseek.serve")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    request_id: str
    prompt_ids: list[int]
    params: object          # SamplingParams
    loop: object            # the handler's asyncio loop
    events: object          # its asyncio.Queue
    index: int = 0          # the choice this job answers
    seq: object = None      # the engine's Sequence, once added
    counted: int = 0        # output tokens produced so far (written by the worker thread)
    logprobs_sent: int = 0  # output tokens whose logprobs were pushed


STEP_KINDS = ("prefill", "decode")


class EngineWorker:
    def __init__(self, engine, max_queue: int = 256):
        self.engine, self.max_queue = engine, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0           # submitted and not yet done: the queue depth limit
        self._jobs: dict[str, Job] = {}  # worker thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        # figures for /metrics, written by the worker, read by anyone
        self.waiting = self.running = self.peak_running = 0
        # engine.step() calls by kind (a prefill chunk, or a decode burst of up to --decode-burst
        # steps), their seconds and the tokens they gave: against the wall clock, how busy the
        # engine is, and which kind of call its time goes to (what a slow server lacks)
        self.steps = {kind: 0 for kind in STEP_KINDS}
        self.step_seconds = {kind: 0.0 for kind in STEP_KINDS}
        self.step_tokens = {kind: 0 for kind in STEP_KINDS}
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) of the last steps

    # ------------------------------------------------------------- handler side
    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, jobs: list[Job]) -> None:
        """All of a request's jobs or none (QueueFull when they would pass max_queue)."""
        with self._lock:
            if self._outstanding + len(jobs) > self.max_queue:
                raise QueueFull(f"the server queue is full ({self._outstanding} requests, "
                                f"limit {self.max_queue}); retry later")
            self._outstanding += len(jobs)
        for job in jobs:
            self._inbox.put(("add", job))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def fail_all(self, message: str, status: int = 503) -> None:
        """End every request submitted so far with an error event (at shutdown)."""
        self._inbox.put(("fail_all", (message, status)))
        self._wake.set()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------- worker side
    def _push(self, job: Job, event: tuple) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, (job.index, *event))
        except RuntimeError:  # the handler's loop is gone: nobody is listening
            self._inbox.put(("abort", job.request_id))

    def _done(self, job: Job) -> None:
        self._jobs.pop(job.request_id, None)
        with self._lock:
            self._outstanding -= 1

    def _drain(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    item.seq = self.engine.add_request(item.prompt_ids, item.params, request_id=item.request_id)
                except ValueError as e:
                    self._push(item, ("error", str(e), 400))
                    with self._lock:
                        self._outstanding -= 1
                    continue
                self._jobs[item.request_id] = item
            elif kind == "abort" and item in self._jobs:
                self.engine.abort(item)
                self._done(self._jobs[item])
            elif kind == "fail_all":
                self._fail(*item)

    def _fail(self, message: str, status: int) -> None:
        for job in list(self._jobs.values()):
            self.engine.abort(job.request_id)
            self._push(job, ("error", message, status))
            self._done(job)

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self._jobs:
                self.waiting = self.running = 0
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail(f"the engine failed: {type(e).__name__}", 500)
                continue
            seconds = time.perf_counter() - started
            new_tokens = 0
            for event in events:
                job = self._jobs.get(event.request_id)
                if job is None:
                    continue
                n = len(job.seq.output_ids)  # a speculative step may add several
                new_tokens, job.counted = new_tokens + n - job.counted, n
                logprobs = getattr(job.seq, "logprobs", None)
                new_logprobs = logprobs[job.logprobs_sent:] if logprobs else None
                if new_logprobs:
                    job.logprobs_sent = len(logprobs)
                if event.new_text or new_logprobs:
                    self._push(job, ("text", event.new_text, new_logprobs))
                if event.finished:
                    info = {"prompt_logprobs": getattr(job.seq, "prompt_logprobs", None),
                            "cached_tokens": getattr(job.seq, "cached_tokens", 0)}
                    self._push(job, ("done", event.finish_reason, len(job.prompt_ids), n, info))
                    self._done(job)
            kind = self.engine.last_step_kind
            if kind is not None:  # a step that scheduled nothing is no prefill or decode step
                self.steps[kind] += 1
                self.step_seconds[kind] += seconds
                self.step_tokens[kind] += new_tokens
            self._recent.append((time.monotonic(), new_tokens))
            sched = getattr(self.engine, "scheduler", None)
            if sched is not None:
                self.waiting, self.running = len(sched.waiting), len(sched.running)
                self.peak_running = max(self.peak_running, self.running)
