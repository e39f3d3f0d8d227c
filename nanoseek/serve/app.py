"""An OpenAI-compatible HTTP server over the engine: `create_app(engine, tokenizer, name, settings)`.

The app holds its parts in `app.state` (engine, worker, metrics, audit, upstream …) and its
routes are plain handlers over that state (routes.py), as in vLLM's api_server:

    GET  /v1/models                 the local model and the upstream's models, each with its
                                    `route`: local or upstream
    POST /v1/chat/completions       chat template from the model's tokenizer (message text never
                                    becomes special tokens: prompt.py); <think>…</think> returned
                                    apart as reasoning_content (DeepSeek) and reasoning (vLLM)
    POST /v1/completions            raw text (or token-id) prompts
    POST /v1/feedback               {request_id, rating 1..5, comment} into a local SQLite file
    GET  /health, GET /metrics      liveness; Prometheus text format
    GET  /                          with `ui`: the chat page (ui.py), else 404

Streaming is server-sent events (`data: {chunk}` … `data: [DONE]`), with a last usage
chunk when `stream_options.include_usage`. One thread owns the engine and steps it while
any request runs (worker.py), so requests from all clients share each batch; a client
that disconnects has its request aborted and its cache slot freed before the next step.
Every completion is labelled AI-generated: header `X-AI-Generated: true` and the body field
`"ai_generated": true` (in each streamed chunk too). Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 invalid request or malformed JSON,
401 missing or wrong key, 404 unknown model, 408 body too slow, 413 body too large, 415 a
POST that is not JSON, 429 queue full (with Retry-After), 502 the upstream failed, 503
shutting down; a client's mistake is never a 500. Slow clients, long chats and shutdown
are bounded (server.py, `--header-timeout`, `--body-timeout`, `--max-messages`,
`--shutdown-timeout`).

Deployment
----------
Local (data stays on the machine): `nanoseek serve --model DIR` listens on 127.0.0.1:8000;
point any OpenAI client at `http://127.0.0.1:8000/v1`. Prompts and outputs are not stored;
`--audit-log F` keeps one JSONL line per request, refused ones included (ids, key id,
client, status, token counts, latency; mode 0600, rotated by size), and `--audit-content`
adds the texts. Keys: `--api-key-file F` (one per line) or `NANOSEEK_API_KEYS=k1,k2`;
they are compared in constant time and never logged (query strings are cut from the
access log). A web page elsewhere cannot use the server through a browser: POSTs must be
JSON, no CORS header is sent, and the Host must be an address, localhost or a name given
with `--allowed-hosts` (cross_site.py).

Behind a proxy: keep the server on loopback (or a private interface) and let nginx, Caddy
or an API gateway terminate TLS and forward to it. Disable the proxy's response buffering
for `/v1/*/completions` (nginx: `proxy_buffering off;`) so streamed tokens arrive as they
are made, and raise its read timeout beyond the longest generation. Body-size, prompt,
max-tokens and queue limits are enforced here too, so a proxy's own limits are a second
line, not the only one. A proxy that forwards its own Host name (nginx: `proxy_set_header
Host $host;`) needs that name in `--allowed-hosts`. Scrape `/metrics` with a bearer token
when keys are set.

Hybrid: `--upstream https://api.example.com/v1 --upstream-models big-model` serves the
local model here and proxies requests for `big-model` (streamed or not) to the upstream
OpenAI-compatible endpoint with the key in `NANOSEEK_UPSTREAM_API_KEY`. A request naming
the local model never leaves the machine: over the local limits it is a 400, with the
queue full a 429, unless `--upstream-overflow` sends such requests to the first upstream
model. An unreachable upstream answers 502 in the OpenAI error shape.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException

from .access_log import redact_access_log
from .audit import AuditLog, FeedbackStore, key_id
from .cross_site import CrossSiteGuard
from .feedback import IssuedIds, RateLimit
from .metrics import Metrics
from .prompt import ChatEncoder
from .protocol import APIError, error_body
from .request_log import RequestLogMiddleware
from .routes import router
from .ui import add_ui
from .upstream import Upstream
from .worker import EngineWorker

log = logging.getLogger("nanoseek.serve")


@dataclass
class Settings:
    """Limits and switches of one server (the CLI's flags)."""
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None     # None: the engine's context less one
    max_tokens: int = 4096                   # cap on max_tokens (and its default)
    max_queue: int = 256                     # accepted, unfinished engine requests
    max_choices: int = 8                     # n × prompts of one request
    max_messages: int = 2048                 # messages of one chat request
    header_timeout: float = 10.0             # seconds for a request's headers (server.py)
    body_timeout: float = 30.0               # seconds for a request's body, from its headers
    shutdown_timeout: float = 30.0           # seconds running requests get after SIGTERM
    audit_log: str | Path | None = None      # None: nothing is stored
    audit_content: bool = False
    audit_max_bytes: int = 100 << 20        # size at which the audit log rotates (0: never)
    audit_backups: int = 5                   # rotated files kept (audit.jsonl.1 …)
    feedback_db: str | Path | None = None    # None: /v1/feedback is off
    feedback_window: float = 3600.0          # seconds an answer's id takes feedback
    feedback_rate: float = 60.0              # feedback requests a minute per key (or client)
    upstream_url: str | None = None
    upstream_models: list[str] = field(default_factory=list)
    upstream_api_key: str | None = None
    upstream_overflow: bool = False          # local requests over the limits or queue go upstream
    allowed_hosts: list[str] = field(default_factory=list)  # Host names besides addresses and localhost
    upstream_timeout: float = 600.0
    allow_unknown_fields: bool = False       # ignore request fields this server does not implement
    ui: bool = False                         # the chat page at / (ui.py)


def init_app_state(state: State, engine, tokenizer, model_name: str, settings: Settings) -> None:
    """What the handlers read from `request.app.state`."""
    state.engine, state.tokenizer, state.model_name, state.settings = engine, tokenizer, model_name, settings
    state.worker = EngineWorker(engine, settings.max_queue)
    state.metrics = Metrics(state.worker, engine)
    state.audit = (AuditLog(settings.audit_log, settings.audit_content, settings.audit_max_bytes,
                            settings.audit_backups) if settings.audit_log else None)
    state.feedback = FeedbackStore(settings.feedback_db) if settings.feedback_db else None
    state.issued = IssuedIds(settings.feedback_window) if state.feedback else None
    state.feedback_rate = RateLimit(settings.feedback_rate)
    state.upstream = (Upstream(settings.upstream_url, settings.upstream_api_key, settings.upstream_timeout)
                      if settings.upstream_url else None)
    state.upstream_models = list(settings.upstream_models) if state.upstream else []
    state.api_keys = [(k.encode(), key_id(k.encode())) for k in settings.api_keys]
    state.max_prompt_tokens = settings.max_prompt_tokens or engine.max_len - 1
    state.chat_encoder = ChatEncoder(tokenizer)
    state.created = int(time.time())


@asynccontextmanager
async def lifespan(app: FastAPI):
    redact_access_log()
    app.state.worker.start()
    try:
        yield
    finally:
        app.state.worker.stop()
        if app.state.upstream is not None:
            await app.state.upstream.close()
        if app.state.audit is not None:
            app.state.audit.close()


# ------------------------------------------------------------ errors, OpenAI's shape
async def api_error(request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def validation_error(request, exc: RequestValidationError):
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(x) for x in err["loc"] if x != "body") or None
    return JSONResponse(error_body(f"{param}: {err['msg']}" if param else err["msg"],
                                   "invalid_request_error", param, "invalid_value"), status_code=400)


async def http_error(request, exc: StarletteHTTPException):
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None,
                                   "not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code)


async def server_error(request, exc: Exception):
    log.exception("unhandled error")
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def create_app(engine, tokenizer, model_name: str, settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    init_app_state(app.state, engine, tokenizer, model_name, settings or Settings())
    app.add_middleware(CrossSiteGuard, allowed_hosts=app.state.settings.allowed_hosts)
    app.add_middleware(RequestLogMiddleware, metrics=app.state.metrics, audit=app.state.audit)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    if app.state.settings.ui:
        add_ui(app)
    return app
