"""The HTTP routes: plain handlers over `request.app.state` (what app.py's `init_app_state` puts
there), and the request intake they share (key check, bounded body read, validation)."""

from __future__ import annotations

import asyncio
import hmac
import uuid

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from .feedback import remember
from .local import LocalRun, check_prompts, encode_prompts, make_jobs, over_limit, respond
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, FeedbackRequest
from .request_log import client_address
from .upstream import proxy
from .worker import QueueFull

router = APIRouter()


# ------------------------------------------------------------ request intake
def authorize(request: Request) -> None:
    keys = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "no API key given: send the header 'Authorization: Bearer <key>'",
                       "authentication_error", None, "missing_api_key")
    given, matched = token.strip().encode(), None
    for key, kid in keys:  # every key compared, each in constant time
        if hmac.compare_digest(key, given):
            matched = kid
    if matched is None:
        raise APIError(401, "incorrect API key", "authentication_error", None, "invalid_api_key")
    request.state.record["key_id"] = matched


async def read_json(request: Request) -> dict:
    settings = request.app.state.settings
    try:
        body = await asyncio.wait_for(read_body(request, settings.max_body_bytes), settings.body_timeout)
    except ClientDisconnect:  # nobody to answer; 499 in the metrics and the audit, not a 500
        raise APIError(499, "the client closed the connection before sending the whole body",
                       "invalid_request_error", None, "client_closed_request") from None
    except asyncio.TimeoutError:  # the connection closes: the rest of the body is not waited for
        raise APIError(408, f"the request body did not arrive within {settings.body_timeout:g} s",
                       "invalid_request_error", None, "request_timeout", headers={"Connection": "close"}) from None
    return decode_json(body)


async def read_body(request: Request, limit: int) -> bytes:
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
    return bytes(body)


def decode_json(body: bytes) -> dict:
    """pydantic's parser, which (unlike json.loads) refuses lone UTF-16 surrogates ("\\ud800"):
    text that no tokenizer, log or response can encode."""
    try:
        data = pydantic_core.from_json(body)
    except ValueError as e:
        hint = " (a \\ud800-\\udfff escape must be half of a surrogate pair)" if "hex escape" in str(e) else ""
        raise APIError(400, f"the body is not valid JSON: {e}{hint}", "invalid_request_error", None,
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error", None, "invalid_json")
    return data


def parse(cls, data: dict, allow_unknown: bool = False):
    try:
        return cls.model_validate(data, extra="ignore" if allow_unknown else None)
    except ValidationError as e:
        # of a union's errors (one per member), the one that went deepest into the request
        paths = [(field_path(data, err["loc"], err["type"] == "missing"), err) for err in e.errors()]
        param, err = max(paths, key=lambda p: len(p[0].split(".")) if p[0] else 0)
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param} (this server does not "
                           "implement it; docs/openai_api.md lists what it does)", "invalid_request_error",
                           param, "unknown_parameter") from None
        message = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, "invalid_request_error",
                       param, "invalid_value") from None


def field_path(data, loc: tuple, missing: bool) -> str | None:
    """The request's own path to an error ("messages.0.content"), without the union members
    and validators pydantic puts in `loc` ("str", "list[TextPart]", "function-after[…]")."""
    path, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(str(part))
    return ".".join(path) or None


def note_request(request: Request, raw: dict) -> None:
    """The audit's model and user fields, taken before validation so that a refused request has them too."""
    for name in ("model", "user"):
        if isinstance(raw.get(name), str):
            request.state.record[name] = raw[name]


def check_message_count(state, raw: dict) -> None:
    """Before validation, which costs about 7 µs a message on the event loop."""
    messages, limit = raw.get("messages"), state.settings.max_messages
    if isinstance(messages, list) and len(messages) > limit:
        raise APIError(400, f"{len(messages)} messages are over this server's limit of {limit}",
                       "invalid_request_error", "messages", "invalid_value")


def check_model(state, model: str) -> None:
    if model != state.model_name and model not in state.upstream_models:
        raise APIError(404, f"the model {model!r} does not exist; this server has "
                       f"{', '.join([state.model_name, *state.upstream_models])}", "invalid_request_error",
                       "model", "model_not_found")


# ------------------------------------------------------------ routes
@router.get("/health")
async def health(request: Request):
    state = request.app.state
    thread = state.worker._thread
    alive = thread is not None and thread.is_alive()
    return JSONResponse({"status": "ok" if alive else "engine stopped", "model": state.model_name,
                         "queue_depth": state.worker.outstanding, "running": state.worker.running},
                        status_code=200 if alive else 503)


@router.get("/metrics")
async def metrics_text(request: Request):
    authorize(request)
    state = request.app.state
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request):
    authorize(request)
    state = request.app.state
    data = [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nanoseek",
             "route": "local"}]
    data += [{"id": m, "object": "model", "created": state.created, "owned_by": "upstream", "route": "upstream"}
             for m in state.upstream_models]
    return {"object": "list", "data": data}


@router.post("/v1/feedback")
async def post_feedback(request: Request):
    """Feedback on an answer this server gave the same key within the feedback window."""
    authorize(request)
    req = parse(FeedbackRequest, await read_json(request))
    state, record = request.app.state, request.state.record
    if state.feedback is None:
        raise APIError(404, "feedback is not enabled on this server (start it with --feedback-db)",
                       "invalid_request_error", None, "feedback_disabled")
    record["feedback_for"] = req.request_id
    kid = record.get("key_id")
    wait = state.feedback_rate.retry_after(kid or client_address(request.scope) or "")
    if wait:
        raise APIError(429, f"too much feedback from this caller; retry in {wait} s", "rate_limit_error", None,
                       "rate_limit_exceeded", headers={"Retry-After": str(wait)})
    if not state.issued.issued_to(req.request_id, kid):
        raise APIError(404, f"no answer with id {req.request_id!r} was given to this caller in the last "
                       f"{state.settings.feedback_window:g} s", "invalid_request_error", "request_id",
                       "unknown_request_id")
    row = await asyncio.to_thread(state.feedback.add, req.request_id, req.rating, req.comment, kid)
    return {"id": f"feedback-{row}", "object": "feedback", "request_id": req.request_id, "stored": True}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    authorize(request)
    raw = await read_json(request)
    note_request(request, raw)
    check_message_count(request.app.state, raw)
    return await complete(request, raw, parse(ChatCompletionRequest, raw, unknown_allowed(request, raw)), chat=True)


@router.post("/v1/completions")
async def completions(request: Request):
    authorize(request)
    raw = await read_json(request)
    note_request(request, raw)
    return await complete(request, raw, parse(CompletionRequest, raw, unknown_allowed(request, raw)), chat=False)


def unknown_allowed(request: Request, raw: dict) -> bool:
    """Unknown fields are a 400 here unless the server relaxes that, or the request names an
    upstream model: the upstream knows its own fields and answers for them."""
    state = request.app.state
    return state.settings.allow_unknown_fields or raw.get("model") in state.upstream_models


async def complete(request: Request, raw: dict, req, chat: bool):
    """A completion, local or upstream. Only requests naming an upstream model leave the
    machine, unless `upstream_overflow` opts in to sending local requests that are over the
    local limits or find the queue full to the first upstream model."""
    state, record = request.app.state, request.state.record
    record["prompt"] = raw.get("messages", raw.get("prompt"))
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    check_model(state, req.model)
    if req.model in state.upstream_models:
        return await proxy(request, raw, endpoint, None)
    prompts = await encode_prompts(state, req, chat)
    check_prompts(state, prompts, req.n)
    overflow = state.settings.upstream_overflow and state.upstream_models
    overflow_model = state.upstream_models[0] if overflow else None
    over = over_limit(state, prompts, req.max_new_tokens, "messages" if chat else "prompt")
    if over is not None:
        if overflow_model is not None:
            return await proxy(request, raw, endpoint, overflow_model)
        raise over
    rid, events = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", asyncio.Queue()
    record.update(request_id=rid, route="local")
    remember(state.issued, record, rid)
    jobs = make_jobs(state, req, prompts, rid, events)
    try:
        state.worker.submit(jobs)
    except QueueFull as e:
        if overflow_model is not None:
            return await proxy(request, raw, endpoint, overflow_model)
        raise APIError(429, str(e), "rate_limit_error", None, "queue_full", headers={"Retry-After": "1"}) from None
    return await respond(LocalRun(state, jobs, events, request, rid, req, chat))
