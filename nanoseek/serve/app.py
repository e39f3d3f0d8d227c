"""An OpenAI-compatible HTTP server over the engine: `create_app(engine, tokenizer, name, settings)`.

    GET  /v1/models                 the local model and the upstream's models
    POST /v1/chat/completions       chat template from the model's tokenizer (message text never
                                    becomes special tokens: prompt.py); <think>…</think> returned
                                    apart as reasoning_content (DeepSeek) and reasoning (vLLM)
    POST /v1/completions            raw text (or token-id) prompts
    POST /v1/feedback               {request_id, rating 1..5, comment} into a local SQLite file
    GET  /health, GET /metrics      liveness; Prometheus text format

Streaming is server-sent events (`data: {chunk}` … `data: [DONE]`), with a last usage
chunk when `stream_options.include_usage`. One thread owns the engine and steps it while
any request runs (worker.py), so requests from all clients share each batch; a client
that disconnects has its request aborted and its cache slot freed before the next step.
Every completion is labelled AI-generated: header `X-AI-Generated: true` and the body field
`"ai_generated": true` (in each streamed chunk too). Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 invalid request or malformed JSON,
401 missing or wrong key, 404 unknown model, 413 body too large, 429 queue full, 502 the
upstream failed; a client's mistake is never a 500.

Deployment
----------
Local (data stays on the machine): `nanoseek serve --model DIR` listens on 127.0.0.1:8000;
point any OpenAI client at `http://127.0.0.1:8000/v1`. Prompts and outputs are not stored;
`--audit-log F` keeps one JSONL line per request (ids, token counts, latency), and
`--audit-content` adds the texts. Keys: `--api-key-file F` (one per line) or
`NANOSEEK_API_KEYS=k1,k2`; they are compared in constant time and never logged.

Behind a proxy: keep the server on loopback (or a private interface) and let nginx, Caddy
or an API gateway terminate TLS and forward to it. Disable the proxy's response buffering
for `/v1/*/completions` (nginx: `proxy_buffering off;`) so streamed tokens arrive as they
are made, and raise its read timeout beyond the longest generation. Body-size, prompt,
max-tokens and queue limits are enforced here too, so a proxy's own limits are a second
line, not the only one. Scrape `/metrics` with a bearer token when keys are set.

Hybrid: `--upstream https://api.example.com/v1 --upstream-models big-model` serves the
local model here and proxies requests for `big-model` (streamed or not) to the upstream
OpenAI-compatible endpoint with the key in `NANOSEEK_UPSTREAM_API_KEY`; requests over
the local limits (prompt, max_tokens, full queue) go to the first upstream model too.
Sensitive traffic stays local by naming the local model; an unreachable upstream answers
502 in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.reasoning import ReasoningSplitter
from ..infer.sampling import SamplingParams
from .audit import AuditLog, FeedbackStore
from .metrics import Metrics
from .prompt import ChatEncoder
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, FeedbackRequest,
                       error_body)
from .upstream import Upstream
from .worker import EngineWorker, Job, QueueFull

log = logging.getLogger("nanoseek.serve")
AI_HEADERS = {"X-AI-Generated": "true"}
ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback", "/health", "/metrics")


@dataclass
class Settings:
    """Limits and switches of one server (the CLI's flags)."""
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None     # None: the engine's context less one
    max_tokens: int = 4096                   # cap on max_tokens (and its default)
    max_queue: int = 256                     # accepted, unfinished engine requests
    max_choices: int = 8                     # n × prompts of one request
    audit_log: str | Path | None = None      # None: nothing is stored
    audit_content: bool = False
    feedback_db: str | Path | None = None    # None: /v1/feedback is off
    upstream_url: str | None = None
    upstream_models: list[str] = field(default_factory=list)
    upstream_api_key: str | None = None
    upstream_timeout: float = 600.0


class ClosingStreamingResponse(StreamingResponse):
    """Closes its generator however the response ends, so that a client gone mid-stream
    aborts its engine requests now (the generator's `finally`), not when it is collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole output."""
    splitter = ReasoningSplitter()
    splitter.feed(text)
    splitter.flush()
    return splitter.reasoning, splitter.answer


def count_reasoning_tokens(tokenizer, reasoning: str, completion_tokens: int) -> int:
    if not reasoning:
        return 0
    return min(completion_tokens, len(tokenizer.encode("<think>" + reasoning + "</think>")))


def chat_message(text: str) -> dict:
    reasoning, answer = split_reasoning(text)
    return {"role": "assistant", "content": answer, "reasoning_content": reasoning or None,
            "reasoning": reasoning or None}


def usage_body(prompt: int, completion: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


class MetricsMiddleware:
    """Status and latency of every HTTP request (to its last byte, streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.observe(path if path in ENDPOINTS else "other", status[0], time.perf_counter() - start)


def create_app(engine, tokenizer, model_name: str, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    worker = EngineWorker(engine, settings.max_queue)
    metrics = Metrics()
    audit = AuditLog(settings.audit_log, settings.audit_content) if settings.audit_log else None
    feedback = FeedbackStore(settings.feedback_db) if settings.feedback_db else None
    upstream = (Upstream(settings.upstream_url, settings.upstream_api_key, settings.upstream_timeout)
                if settings.upstream_url else None)
    upstream_models = list(settings.upstream_models) if upstream else []
    keys = [k.encode() for k in settings.api_keys]
    max_prompt = settings.max_prompt_tokens or engine.max_len - 1
    chat_encoder = ChatEncoder(tokenizer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            if upstream is not None:
                await upstream.close()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.settings = worker, metrics, settings
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------ errors, OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in err["loc"] if x != "body") or None
        return JSONResponse(error_body(f"{param}: {err['msg']}" if param else err["msg"],
                                       "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None,
                                       "not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    # ------------------------------------------------------------ request intake
    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "no API key given: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", None, "missing_api_key")
        given, ok = token.strip().encode(), False
        for key in keys:  # every key compared, each in constant time
            ok |= hmac.compare_digest(key, given)
        if not ok:
            raise APIError(401, "incorrect API key", "authentication_error", None, "invalid_api_key")

    async def read_json(request: Request) -> dict:
        limit = settings.max_body_bytes
        too_large = APIError(413, f"the request body is over the limit of {limit:,} bytes",
                             "invalid_request_error", None, "request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", "invalid_request_error", None,
                           "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", "invalid_request_error", None, "invalid_json")
        return data

    def parse(cls, data: dict):
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], "invalid_request_error",
                           param, "invalid_value") from None

    def check_model(model: str) -> None:
        if model != model_name and model not in upstream_models:
            raise APIError(404, f"the model {model!r} does not exist; this server has "
                           f"{', '.join([model_name, *upstream_models])}", "invalid_request_error",
                           "model", "model_not_found")

    # ------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        alive = worker._thread is not None and worker._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": model_name,
                             "queue_depth": worker.outstanding, "running": worker.running},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_text(request: Request):
        authorize(request)
        return PlainTextResponse(metrics.render(worker, engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "nanoseek"}]
        data += [{"id": m, "object": "model", "created": created, "owned_by": "upstream"} for m in upstream_models]
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def post_feedback(request: Request):
        authorize(request)
        req = parse(FeedbackRequest, await read_json(request))
        if feedback is None:
            raise APIError(404, "feedback is not enabled on this server (start it with --feedback-db)",
                           "invalid_request_error", None, "feedback_disabled")
        row = await asyncio.to_thread(feedback.add, req.request_id, req.rating, req.comment)
        return {"id": f"feedback-{row}", "object": "feedback", "request_id": req.request_id, "stored": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await read_json(request)
        req = parse(ChatCompletionRequest, raw)
        return await complete(request, raw, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        raw = await read_json(request)
        req = parse(CompletionRequest, raw)
        return await complete(request, raw, req, chat=False)

    # ------------------------------------------------------------ completion, local or upstream
    def write_audit(rid, endpoint, model, route, status, prompt_tokens, completion_tokens, start, raw, outputs):
        if audit is None:
            return
        record = {"request_id": rid, "endpoint": endpoint, "model": model, "route": route, "status": status,
                  "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "latency_s": round(time.perf_counter() - start, 4)}
        audit.write(record, prompt=raw.get("messages", raw.get("prompt")), output=outputs)

    async def complete(request: Request, raw: dict, req, chat: bool):
        start = time.perf_counter()
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        check_model(req.model)
        if req.model in upstream_models:
            return await proxy(raw, endpoint, None, start)
        if chat:
            try:
                prompts = [chat_encoder.encode_chat([m.as_template_turn() for m in req.messages])]
            except (ValueError, KeyError) as e:
                raise APIError(400, str(e), "invalid_request_error", "messages", "invalid_value") from None
        else:
            prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
        if len(prompts) * req.n > settings.max_choices:
            raise APIError(400, f"{len(prompts)} prompt(s) × n={req.n} is over this server's limit of "
                           f"{settings.max_choices} choices per request", "invalid_request_error", "n",
                           "invalid_value")
        if any(not ids for ids in prompts):  # a mistake, not a request for a bigger model
            raise APIError(400, "the prompt is empty", "invalid_request_error", "prompt", "invalid_value")
        over = over_limit(prompts, req.max_new_tokens, "messages" if chat else "prompt")
        overflow_model = upstream_models[0] if upstream_models else None
        if over is not None:
            if overflow_model is not None:
                return await proxy(raw, endpoint, overflow_model, start)
            raise over
        jobs, events = [], asyncio.Queue()
        loop, rid = asyncio.get_running_loop(), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        for p, ids in enumerate(prompts):
            room = engine.max_len - len(ids)
            max_new = req.max_new_tokens or min(settings.max_tokens, room)
            for i in range(req.n):
                index = p * req.n + i
                try:
                    params = SamplingParams(max_tokens=max_new, temperature=req.temperature, top_p=req.top_p,
                                            top_k=req.top_k, stop=list(req.stop or []), ignore_eos=req.ignore_eos,
                                            seed=None if req.seed is None else req.seed + index)
                except ValueError as e:
                    raise APIError(400, str(e), "invalid_request_error", None, "invalid_value") from None
                jobs.append(Job(f"{rid}-{index}", ids, params, loop, events, index=index))
        try:
            worker.submit(jobs)
        except QueueFull as e:
            if overflow_model is not None:
                return await proxy(raw, endpoint, overflow_model, start)
            raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from None
        run = LocalRun(jobs, events, request, rid, req, chat, start, endpoint, raw)
        streaming = False
        try:
            first = await run.first_event()
            headers = {**AI_HEADERS, "X-Request-Id": rid}
            if req.stream:
                streaming = True  # the stream's generator owns the jobs now
                return ClosingStreamingResponse(run.stream(first), media_type="text/event-stream", headers=headers)
            return JSONResponse(await run.collect(first), headers=headers)
        except ConnectionAbortedError:  # nobody is left to answer (nginx's "client closed request")
            return Response(status_code=499)
        finally:
            if not streaming:
                run.abort_unfinished()

    def over_limit(prompts: list[list[int]], max_new: int | None, prompt_param: str) -> APIError | None:
        """Why this request is over the local limits (it may go upstream then), or None."""
        for ids in prompts:
            if len(ids) > max_prompt:
                return APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {max_prompt}",
                                "invalid_request_error", prompt_param, "context_length_exceeded")
            if max_new is not None and max_new > settings.max_tokens:
                return APIError(400, f"max_tokens {max_new} is over this server's limit of {settings.max_tokens}",
                                "invalid_request_error", "max_tokens", "invalid_value")
            room = engine.max_len - len(ids)
            if room < 1 or (max_new is not None and max_new > room):
                return APIError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_new}) is over the "
                                f"context of {engine.max_len} tokens", "invalid_request_error", "max_tokens",
                                "context_length_exceeded")
        return None

    class LocalRun:
        """The jobs of one request: their events turned into a response or an SSE stream."""

        def __init__(self, jobs, events, request, rid, req, chat, start, endpoint, raw):
            self.jobs, self.events, self.request, self.rid, self.req = jobs, events, request, rid, req
            self.chat, self.start, self.endpoint, self.raw = chat, start, endpoint, raw
            k = len(jobs)
            self.texts, self.finish, self.completion = [""] * k, [None] * k, [0] * k
            self.prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
            self.open = set(range(k))
            self.status = 200
            self.checked = time.monotonic()
            self.error: APIError | None = None

        def abort_unfinished(self) -> None:
            for index in self.open:
                worker.abort(self.jobs[index].request_id)
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
                reasoning = sum(count_reasoning_tokens(tokenizer, split_reasoning(t)[0], c)
                                for t, c in zip(self.texts, self.completion))
            return usage_body(self.prompt_tokens, completion, reasoning)

        def finish_audit(self) -> None:
            metrics.tokens(self.prompt_tokens, sum(self.completion))
            write_audit(self.rid, self.endpoint, model_name, "local", self.status, self.prompt_tokens,
                        sum(self.completion), self.start, self.raw, self.texts)

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
                    "created": int(time.time()), "model": model_name, "system_fingerprint": None,
                    "choices": choices, "usage": self.usage(), "ai_generated": True}

        def chunk(self, choices: list[dict], usage=None) -> str:
            body = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": int(time.time()), "model": model_name, "system_fingerprint": None,
                    "choices": choices, "ai_generated": True}
            if self.req.include_usage:
                body["usage"] = usage
            return sse(body)

        def delta(self, index: int, delta: dict | str, finish=None) -> dict:
            if self.chat:
                return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}

        async def stream(self, first):
            splitters = [ReasoningSplitter() for _ in self.jobs]
            try:
                if self.chat:
                    for i in range(len(self.jobs)):
                        yield self.chunk([self.delta(i, {"role": "assistant", "content": ""})])
                event = first
                while True:
                    self.take(event)
                    index, kind = event[0], event[1]
                    pieces = []
                    if kind == "text":
                        pieces = splitters[index].feed(event[2]) if self.chat else [("answer", event[2])]
                    elif kind in ("done", "error") and self.chat:
                        pieces = splitters[index].flush()
                    for part, text in pieces:
                        if not self.chat:
                            yield self.chunk([self.delta(index, text)])
                        elif part == "reasoning":
                            yield self.chunk([self.delta(index, {"reasoning_content": text, "reasoning": text})])
                        else:
                            yield self.chunk([self.delta(index, {"content": text})])
                    if kind == "done":
                        yield self.chunk([self.delta(index, {} if self.chat else "", event[2])])
                    elif kind == "error":
                        self.status = event[3]
                        yield sse(error_body(event[2], "server_error"))
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

    async def proxy(raw: dict, endpoint: str, model: str | None, start: float):
        """Forward to the upstream (model replaced when given), labelled like a local answer."""
        body = dict(raw, model=model) if model else raw
        path = endpoint.removeprefix("/v1/")
        rid = f"proxy-{uuid.uuid4().hex}"
        headers = {**AI_HEADERS, "X-Request-Id": rid, "X-Nanoseek-Route": "upstream"}
        try:
            if not raw.get("stream"):
                data = await upstream.post(path, body)
                data["ai_generated"] = True
                metrics.upstream_requests["200"] += 1
                usage = data.get("usage") or {}
                write_audit(data.get("id", rid), endpoint, body.get("model"), "upstream", 200,
                            usage.get("prompt_tokens"), usage.get("completion_tokens"), start, raw,
                            [c.get("message", {}).get("content") or c.get("text") for c in data.get("choices", [])])
                return JSONResponse(data, headers=headers)
            events = await upstream.stream(path, body)
        except APIError as e:
            metrics.upstream_requests[str(e.status)] += 1
            write_audit(rid, endpoint, body.get("model"), "upstream", e.status, None, None, start, raw, None)
            raise
        metrics.upstream_requests["200"] += 1

        async def relay():
            usage = {}
            try:
                async for event in events:
                    if isinstance(event, dict) and "error" not in event:
                        event["ai_generated"] = True
                        usage = event.get("usage") or usage
                    yield sse(event)
            finally:
                await events.aclose()
                write_audit(rid, endpoint, body.get("model"), "upstream", 200, usage.get("prompt_tokens"),
                            usage.get("completion_tokens"), start, raw, None)

        return ClosingStreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    return app
