"""Every HTTP request's outcome, to its last byte (streams included): the /metrics counters
and the audit line.

The middleware puts an empty `record` dict in the request's state; handlers fill in what
they learn (key id, model, user, request id, route, token counts, and for a stream that
ended badly its real status: 499 when the client left, 500 when the engine failed), and
the line is written once the response is over. API paths are audited always, other paths
(health, metrics, unknown) when refused.
"""

from __future__ import annotations

import time

from .audit import AuditLog
from .metrics import Metrics

ENDPOINTS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback", "/health", "/metrics")


def client_address(scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class RequestLogMiddleware:
    def __init__(self, app, metrics: Metrics, audit: AuditLog | None):
        self.app, self.metrics, self.audit = app, metrics, audit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        record: dict = {}
        scope.setdefault("state", {}).update(record=record, arrival=start)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            latency, path = time.perf_counter() - start, scope.get("path", "")
            outcome = record.get("status", status[0])  # a stream's 200 may have ended as 499 or 500
            self.metrics.observe(path if path in ENDPOINTS else "other", outcome, latency)
            if self.audit is not None and (path.startswith("/v1/") or outcome >= 400):
                self.write_audit(scope, record, outcome, latency)

    def write_audit(self, scope, record: dict, status: int, latency: float) -> None:
        prompt, output = record.pop("prompt", None), record.pop("output", None)
        line = {"request_id": record.pop("request_id", None), "method": scope["method"],
                "endpoint": scope.get("path", ""), "model": record.pop("model", None),
                "route": record.pop("route", None), "status": record.pop("status", status),
                "prompt_tokens": record.pop("prompt_tokens", None),
                "completion_tokens": record.pop("completion_tokens", None), "latency_s": round(latency, 4),
                "client": client_address(scope), "key_id": record.pop("key_id", None),
                "user": record.pop("user", None), **record}
        self.audit.write(line, prompt=prompt, output=output)
