"""A completion on the local engine: prompts → limits → jobs → a JSON answer or an SSE stream.

`state` is the app's state (app.py's `init_app_state`): engine, tokenizer, worker, metrics,
audit, settings and the model's name.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..infer.grammar import json_schema_grammar
from ..infer.reasoning import ReasoningSplitter
from ..infer.sampling import SamplingParams
from .protocol import APIError, ChatCompletionRequest, NamedToolChoice, error_body
from .responses import (AI_HEADERS, ClosingStreamingResponse, chat_logprobs, chat_message, completion_logprobs,
                        count_reasoning_tokens, split_reasoning, sse, usage_body)
from .tools import ToolCallStreamer, forced_call_grammar, template_turns
from .worker import Job


INLINE_TEXT = 8192  # characters (a message counts 64 more) short enough to encode on the event loop


def tools_on(req, chat: bool) -> bool:
    """Whether the model sees the request's tools and its output is read for calls."""
    return chat and bool(req.tools) and req.tool_choice != "none"


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
        return sum(64 + len(m.text) for m in req.messages)
    return sum(len(p) for p in req.prompts() if isinstance(p, str))


def tokenize_prompts(state, req, chat: bool) -> list[list[int]]:
    if not chat:
        return [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    try:
        return [state.chat_encoder.encode_chat(template_turns(req.messages, req.tools if tools_on(req, chat) else None))]
    except (ValueError, KeyError) as e:
        raise APIError(400, str(e), "invalid_request_error", "messages", "invalid_value") from None


def request_grammar(state, req, chat: bool) -> str | None:
    """The grammar the output must match: a forced tool call, or response_format's JSON."""
    if not chat:
        return None
    forced = tools_on(req, chat) and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice))
    fmt = req.response_format.type if req.response_format is not None else "text"
    if forced and fmt != "text":
        raise APIError(400, "a forced tool call and a JSON response_format cannot both constrain the output",
                       "invalid_request_error", "response_format", "invalid_value")
    if forced:
        name = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        grammar, param = forced_call_grammar(req.tools, name, req.parallel_tool_calls, state.tokenizer), "tools"
    elif fmt == "json_object":
        grammar, param = json_schema_grammar(None), "response_format"
    elif fmt == "json_schema":
        grammar, param = json_schema_grammar(req.response_format.json_schema.schema_ or {}), "response_format"
    else:
        return None
    try:
        state.engine.grammars().check(grammar)
    except ValueError as e:
        raise APIError(400, str(e), "invalid_request_error", param, "invalid_value") from None
    return grammar


def sampling_params(state, req, chat: bool, max_new: int, grammar: str | None, seed: int | None) -> SamplingParams:
    if chat:
        logprobs, prompt_logprobs = ((req.top_logprobs or 0) if req.logprobs else None), None
    else:  # echo with logprobs scores the prompt; max_tokens 0 needs the prompt's forward alone
        logprobs = req.logprobs
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else (0 if max_new == 0 else None)
    return SamplingParams(max_tokens=max_new, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          stop=list(req.stop or []), ignore_eos=req.ignore_eos, seed=seed, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                          logit_bias=req.logit_bias or {}, grammar=grammar,
                          # tool-call markers may be special tokens: kept in the text to be parsed
                          skip_special_tokens=req.skip_special_tokens and not tools_on(req, chat))


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
    chat = isinstance(req, ChatCompletionRequest)
    grammar = request_grammar(state, req, chat)
    for p, ids in enumerate(prompts):
        max_new = req.max_new_tokens
        if max_new is None:
            max_new = min(state.settings.max_tokens, state.engine.max_len - len(ids))
        for i in range(req.n):
            index = p * req.n + i
            try:
                params = sampling_params(state, req, chat, max_new, grammar,
                                         None if req.seed is None else req.seed + index)
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
        self.logprobs = [[] for _ in range(k)]
        self.cached = [0] * k
        self.tools = tools_on(req, chat)
        # a prompt that opened the reasoning (R1's "<think>\n"): the output starts inside it
        self.thinking = chat and state.chat_encoder.opens_thinking(jobs[0].prompt_ids)
        self.echo = [""] * k
        if not chat and req.echo:
            texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in req.prompts()]
            self.echo = [texts[j.index // req.n] for j in jobs]
        self.prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
        self.open = set(range(k))
        self.status = 200
        self.checked = time.monotonic()
        self.error: APIError | None = None
        # for the TTFT and TPOT histograms: the request's arrival (RequestLogMiddleware) and
        # each choice's first text
        self.arrival = request.state.arrival
        self.first_text: list[float | None] = [None] * k

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
            if self.first_text[index] is None and event[2]:
                self.first_text[index] = time.perf_counter()
                self.state.metrics.ttft.observe(self.first_text[index] - self.arrival)
            self.texts[index] += event[2]
            self.logprobs[index] += (event[3] or []) if len(event) > 3 else []
        elif kind == "done":
            self.finish[index], self.completion[index] = event[2], event[4]
            if self.first_text[index] is not None and event[4] > 1:
                self.state.metrics.tpot.observe((time.perf_counter() - self.first_text[index]) / (event[4] - 1))
            self.cached[index] = event[5]["cached_tokens"] if len(event) > 5 else 0
            self.open.discard(index)
        elif kind == "error":
            self.open.discard(index)
            self.finish[index], self.status = "error", event[3]
            self.error = APIError(event[3], event[2], "server_error")

    def usage(self) -> dict:
        completion = sum(self.completion)
        reasoning = 0
        if self.chat:
            reasoning = sum(count_reasoning_tokens(self.state.tokenizer, split_reasoning(t, self.thinking)[0], c)
                            for t, c in zip(self.texts, self.completion))
        return usage_body(self.prompt_tokens, completion, reasoning, sum(self.cached))

    def choice_logprobs(self, index: int, entries: list, with_prompt: bool = False) -> dict | None:
        """A choice's logprobs in its endpoint's shape (None when not asked for); with_prompt:
        the echoed prompt's first (completions)."""
        tok = self.state.tokenizer
        if self.chat:
            return chat_logprobs(tok, entries) if self.req.logprobs else None
        if self.req.logprobs is None:
            return None
        pairs = [(e.token, e) for e in entries]
        if with_prompt:
            job = self.jobs[index]
            prompt = getattr(job.seq, "prompt_logprobs", None) or [None] * len(job.prompt_ids)
            pairs = list(zip(job.prompt_ids, prompt)) + pairs
        return completion_logprobs(tok, pairs)

    def finish_reason(self, index: int, message: dict | None = None) -> str | None:
        if message is not None and message.get("tool_calls"):
            return "tool_calls"
        return self.finish[index]

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
        choices = []
        for i, text in enumerate(self.texts):
            if self.chat:
                message = chat_message(text, self.thinking, self.tools)
                choices.append({"index": i, "message": message, "logprobs": self.choice_logprobs(i, self.logprobs[i]),
                                "finish_reason": self.finish_reason(i, message)})
            else:
                choices.append({"index": i, "text": self.echo[i] + text, "finish_reason": self.finish[i],
                                "logprobs": self.choice_logprobs(i, self.logprobs[i], bool(self.echo[i]))})
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

    def delta(self, index: int, delta: dict | str, finish=None, logprobs=None) -> dict:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}

    def answer_deltas(self, index: int, text: str, streamers: list[ToolCallStreamer]) -> list[dict]:
        """Chat deltas of answer text: content, or with tools content and tool_calls."""
        if not self.tools:
            return [{"content": text}] if text else []
        content, calls = streamers[index].feed(text)
        self.called[index] |= bool(calls)
        return ([{"content": content}] if content else []) + ([{"tool_calls": calls}] if calls else [])

    def event_chunks(self, event, splitters: list[ReasoningSplitter], streamers: list[ToolCallStreamer]) -> list[str]:
        """The SSE chunks one engine event makes (text split into reasoning and answer for chat,
        tool calls apart with tools); a text event's logprobs go with its last chunk."""
        index, kind = event[0], event[1]
        pieces = []
        if kind == "text":
            pieces = splitters[index].feed(event[2]) if self.chat else [("answer", event[2])]
        elif kind in ("done", "error") and self.chat:
            pieces = splitters[index].flush()
        deltas = []
        for part, text in pieces:
            if not self.chat:
                deltas.append(text)
            elif part == "reasoning":
                deltas.append({"reasoning_content": text, "reasoning": text})
            else:
                deltas += self.answer_deltas(index, text, streamers)
        if kind in ("done", "error") and self.tools:
            rest = streamers[index].flush()
            deltas += [{"content": rest}] if rest else []
        logprobs = event[3] if kind == "text" and len(event) > 3 else None
        if logprobs and not deltas:
            deltas.append({"content": ""} if self.chat else "")
        out = [self.chunk([self.delta(index, d, logprobs=self.choice_logprobs(index, logprobs)
                                      if logprobs and j == len(deltas) - 1 else None)])
               for j, d in enumerate(deltas)]
        if kind == "done":
            finish = "tool_calls" if self.called[index] else event[2]
            out.append(self.chunk([self.delta(index, {} if self.chat else "", finish)]))
        elif kind == "error":
            self.status = event[3]
            out.append(sse(error_body(event[2], "server_error")))
        return out

    def echo_chunk(self, index: int) -> str:
        """A completion's echoed prompt, streamed before its first text (with its logprobs)."""
        logprobs = self.choice_logprobs(index, [], with_prompt=True)
        return self.chunk([self.delta(index, self.echo[index], logprobs=logprobs)])

    async def stream(self, first):
        splitters = [ReasoningSplitter(thinking=self.thinking) for _ in self.jobs]
        streamers = [ToolCallStreamer() for _ in self.jobs]
        self.called = [False] * len(self.jobs)
        echoed = [not e for e in self.echo]
        try:
            if self.chat:
                for i in range(len(self.jobs)):
                    yield self.chunk([self.delta(i, {"role": "assistant", "content": ""})])
            event = first
            while True:
                self.take(event)
                if not echoed[event[0]]:
                    echoed[event[0]] = True
                    yield self.echo_chunk(event[0])
                for chunk in self.event_chunks(event, splitters, streamers):
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
