"""A completion on the local engine: prompts → limits → jobs → a JSON answer or an SSE stream.

`state` is the app's state (app.py's `init_app_state`): engine, tokenizer, worker, metrics,
audit, settings and the model's name.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..infer.reasoning import ReasoningSplitter
from ..infer.sampling import SamplingParams
from .protocol import APIError, error_body
from .responses import (AI_HEADERS, ClosingStreamingResponse, chat_message, count_reasoning_tokens,
                        split_reasoning, sse, usage_body)
from .worker import Job


INLINE_TEXT = 8192  # characters (a message counts 64 more) short enough to encode on the event loop


async def encode_prompts(state, req, chat: bool) -> list[list[int]]:
    """The token ids of each prompt of a request. A long prompt is encoded in a worker thread,
    so that it does not hold up the event loop (and with it every other client); a short one
    here, where a thread's hand-offs of the GIL (shared with the engine's thread) cost more
    than the encoding."""
    if text_size(req, chat) <= INLINE_TEXT:
        return tokenize_prompts(state, req, chat)
    return await asyncio.to_thread(tokenize_prompts, state, req, chat)


def text_size(req, chat: bool) -> int:
    if chat:
        return sum(64 + len(m.as_template_turn()["content"]) for m in req.messages)
    return sum(len(p) for p in req.prompts() if isinstance(p, str))


def tokenize_prompts(state, req, chat: bool) -> list[list[int]]:
    if not chat:
        return [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    try:
        return [state.chat_encoder.encode_chat([m.as_template_turn() for m in req.messages])]
    except (ValueError, KeyError) as e:
        raise APIError(400, str(e), "invalid_request_error", "messages", "invalid_value") from None


def check_prompts(state, prompts: list[list[int]], n: int) -> None:
    """Mistakes that no bigger model would fix (never routed upstream)."""
    choices, limit = len(prompts) * n, min(state.settings.max_choices, state.settings.max_queue)
    if choices > limit:  # over the queue it could never be accepted: not a 429 to retry
        raise APIError(400, f"{len(prompts)} prompt(s) × n={n} is over this server's limit of {limit} "
                       "choices per request", "invalid_request_error", "n", "invalid_value")
    if any(not ids for ids in prompts):
        raise APIError(400, "the prompt is empty", "invalid_request_error", "prompt", "invalid_value")


def over_limit(state, prompts: list[list[int]], max_new: int | None, prompt_param: str) -> APIError | None:
    """Why this request is over the local limits (it may go upstream then), or None."""
    max_prompt, max_tokens, max_len = state.max_prompt_tokens, state.settings.max_tokens, state.engine.max_len
    for ids in prompts:
        if len(ids) > max_prompt:
            return APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {max_prompt}",
                            "invalid_request_error", prompt_param, "context_length_exceeded")
        if max_new is not None and max_new > max_tokens:
            return APIError(400, f"max_tokens {max_new} is over this server's limit of {max_tokens}",
                            "invalid_request_error", "max_tokens", "invalid_value")
        room = max_len - len(ids)
        if room < 1 or (max_new is not None and max_new > room):
            return APIError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_new}) is over the "
                            f"context of {max_len} tokens", "invalid_request_error", "max_tokens",
                            "context_length_exceeded")
    return None


def make_jobs(state, req, prompts: list[list[int]], rid: str, events: asyncio.Queue) -> list[Job]:
    """One engine job per choice: prompt p's i-th sample is choice p·n + i (seeded seed + index)."""
    jobs, loop = [], asyncio.get_running_loop()
    for p, ids in enumerate(prompts):
        max_new = req.max_new_tokens or min(state.settings.max_tokens, state.engine.max_len - len(ids))
        for i in range(req.n):
            index = p * req.n + i
            try:
                params = SamplingParams(max_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                        top_k=req.top_k, stop=list(req.stop or []), ignore_eos=req.ignore_eos,
                                        seed=None if req.seed is None else req.seed + index)
            except ValueError as e:
                raise APIError(400, str(e), "invalid_request_error", None, "invalid_value") from None
            jobs.append(Job(f"{rid}-{index}", ids, params, loop, events, index=index))
    return jobs


async def respond(run: LocalRun) -> Response:
    """Wait for the first event (an error is still an HTTP error then), then answer or stream."""
    streaming = False
    try:
        first = await run.first_event()
        headers = {**AI_HEADERS, "X-Request-Id": run.rid}
        if run.req.stream:
            streaming = True  # the stream's generator owns the jobs now
            return ClosingStreamingResponse(run.stream(first), media_type="text/event-stream", headers=headers)
        return JSONResponse(await run.collect(first), headers=headers)
    except ConnectionAbortedError:  # nobody is left to answer (nginx's "client closed request")
        return Response(status_code=499)
    finally:
        if not streaming:
            run.abort_unfinished()


class LocalRun:
    """The jobs of one request: their events turned into a response or an SSE stream."""

    def __init__(self, state, jobs: list[Job], events: asyncio.Queue, request: Request, rid: str, req, chat: bool):
        self.state, self.jobs, self.events, self.request, self.rid, self.req = state, jobs, events, request, rid, req
        self.chat = chat
        k = len(jobs)
        self.texts, self.finish, self.completion = [""] * k, [None] * k, [0] * k
        self.prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
        self.open = set(range(k))
        self.status = 200
        self.checked = time.monotonic()
        self.error: APIError | None = None

    def abort_unfinished(self) -> None:
        for index in self.open:
            self.state.worker.abort(self.jobs[index].request_id)
        self.open = set()

    async def next_event(self):
        """The next event; aborts all if the client went away (checked about once a
        second: a stream also learns it when a write fails)."""
        while True:
            if time.monotonic() - self.checked > 1.0:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.status = 499
                    raise ConnectionAbortedError
            try:
                return await asyncio.wait_for(self.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                continue

    async def first_event(self):
        event = await self.next_event()
        if event[1] == "error":
            self.open.discard(event[0])
            self.status = event[3]
            raise APIError(event[3], event[2], "invalid_request_error" if event[3] == 400 else "server_error")
        return event

    def take(self, event) -> None:
        index, kind = event[0], event[1]
        if kind == "text":
            self.texts[index] += event[2]
        elif kind == "done":
            self.finish[index], self.completion[index] = event[2], event[4]
            self.open.discard(index)
        elif kind == "error":
            self.open.discard(index)
            self.finish[index], self.status = "error", event[3]
            self.error = APIError(event[3], event[2], "server_error")

    def usage(self) -> dict:
        completion = sum(self.completion)
        reasoning = 0
        if self.chat:
            reasoning = sum(count_reasoning_tokens(self.state.tokenizer, split_reasoning(t)[0], c)
                            for t, c in zip(self.texts, self.completion))
        return usage_body(self.prompt_tokens, completion, reasoning)

    def finish_audit(self) -> None:
        """Counts what the engine produced, an aborted request's tokens too (the worker's
        count: they were computed even if no client read them)."""
        produced = sum(job.counted for job in self.jobs)
        self.state.metrics.tokens(self.prompt_tokens, produced)
        self.request.state.record.update(status=self.status, prompt_tokens=self.prompt_tokens,
                                         completion_tokens=produced, output=self.texts)

    async def collect(self, first) -> dict:
        event = first
        try:
            while True:
                self.take(event)
                if not self.open:
                    break
                event = await self.next_event()
        finally:
            self.abort_unfinished()
            self.finish_audit()
        if self.error is not None:
            raise self.error
        if self.chat:
            choices = [{"index": i, "message": chat_message(t), "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.state.model_name, "system_fingerprint": None,
                "choices": choices, "usage": self.usage(), "ai_generated": True}

    def chunk(self, choices: list[dict], usage=None) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.state.model_name, "system_fingerprint": None,
                "choices": choices, "ai_generated": True}
        if self.req.include_usage:
            body["usage"] = usage
        return sse(body)

    def delta(self, index: int, delta: dict | str, finish=None) -> dict:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}

    def event_chunks(self, event, splitters: list[ReasoningSplitter]) -> list[str]:
        """The SSE chunks one engine event makes (text split into reasoning and answer for chat)."""
        index, kind = event[0], event[1]
        pieces = []
        if kind == "text":
            pieces = splitters[index].feed(event[2]) if self.chat else [("answer", event[2])]
        elif kind in ("done", "error") and self.chat:
            pieces = splitters[index].flush()
        out = []
        for part, text in pieces:
            if not self.chat:
                out.append(self.chunk([self.delta(index, text)]))
            elif part == "reasoning":
                out.append(self.chunk([self.delta(index, {"reasoning_content": text, "reasoning": text})]))
            else:
                out.append(self.chunk([self.delta(index, {"content": text})]))
        if kind == "done":
            out.append(self.chunk([self.delta(index, {} if self.chat else "", event[2])]))
        elif kind == "error":
            self.status = event[3]
            out.append(sse(error_body(event[2], "server_error")))
        return out

    async def stream(self, first):
        splitters = [ReasoningSplitter() for _ in self.jobs]
        try:
            if self.chat:
                for i in range(len(self.jobs)):
                    yield self.chunk([self.delta(i, {"role": "assistant", "content": ""})])
            event = first
            while True:
                self.take(event)
                for chunk in self.event_chunks(event, splitters):
                    yield chunk
                if not self.open:
                    break
                event = await self.next_event()
            if self.req.include_usage:
                yield self.chunk([], self.usage())
            yield sse("[DONE]")
        except ConnectionAbortedError:  # the client left while nothing was sent
            self.status = 499
        except (asyncio.CancelledError, GeneratorExit):
            self.status = 499
            raise
        finally:
            self.abort_unfinished()
            self.finish_audit()
