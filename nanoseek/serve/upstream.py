"""Hybrid routing: a request proxied to an upstream OpenAI-compatible endpoint.

The body goes upstream as the client sent it (only `model` may be replaced), streamed or
not; the answer comes back labelled AI-generated like a local one. When the upstream
cannot be reached, times out, fails (5xx), refuses this server's key (401/403) or answers
something that is not the OpenAI error shape, the client gets a 502 in the OpenAI error
shape; the upstream's verdict on the request itself (a 400, 404, 429 …) keeps its status.
"""

from __future__ import annotations

import json
import uuid

import httpx
from fastapi.responses import JSONResponse

from .feedback import remember
from .protocol import APIError, error_body
from .responses import AI_HEADERS, ClosingStreamingResponse, sse


class Upstream:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/") + "/"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                        timeout=httpx.Timeout(timeout, connect=10.0))

    async def close(self) -> None:
        await self.client.aclose()

    @staticmethod
    async def _failure(response: httpx.Response) -> APIError:
        """The upstream's client errors keep their status; its refusal of this server's key
        and its own failures are a 502 (the client's request and key were fine)."""
        body = await response.aread()
        status = response.status_code
        if status in (401, 403):
            return APIError(502, f"the upstream refused this server's credentials (HTTP {status})",
                            "upstream_error", None, "upstream_auth_failed")
        try:
            err = json.loads(body)["error"]
            message = str(err.get("message"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return APIError(502, f"the upstream answered HTTP {status}", "upstream_error", None, "bad_gateway")
        if status >= 500:
            return APIError(502, f"the upstream failed (HTTP {status}): {message}", "upstream_error", None,
                            "bad_gateway")
        return APIError(status, message, err.get("type") or "upstream_error", err.get("param"), err.get("code"))

    async def _send(self, path: str, body: dict, stream: bool) -> httpx.Response:
        """POST body; an unreachable upstream or an error status is an APIError."""
        try:
            r = await self.client.send(self.client.build_request("POST", path, json=body), stream=stream)
        except httpx.HTTPError as e:
            raise APIError(502, f"the upstream is unreachable ({type(e).__name__})", "upstream_error",
                           None, "upstream_unavailable") from None
        if r.status_code >= 400:
            try:
                raise await self._failure(r)
            finally:
                await r.aclose()
        return r

    async def post(self, path: str, body: dict) -> dict:
        """A non-streamed request; APIError on any failure."""
        r = await self._send(path, body, stream=False)
        try:
            return r.json()
        except ValueError:
            raise APIError(502, "the upstream answered something that is not JSON", "upstream_error",
                           None, "bad_gateway") from None

    async def stream(self, path: str, body: dict):
        """Open a streamed request (APIError if that fails) and return an async iterator of
        the upstream's SSE data payloads (dicts, then the string "[DONE]")."""
        return self._events(await self._send(path, body, stream=True))

    @staticmethod
    async def _events(r: httpx.Response):
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    yield data
                    return
                try:
                    yield json.loads(data)
                except ValueError:
                    yield error_body("the upstream sent a malformed event", "upstream_error", None, "bad_gateway")
                    return
        except httpx.HTTPError as e:
            yield error_body(f"the upstream stream broke ({type(e).__name__})", "upstream_error", None,
                             "upstream_unavailable")
        finally:
            await r.aclose()


async def proxy(request, raw: dict, endpoint: str, model: str | None):
    """Forward to the upstream (model replaced when given), labelled like a local answer."""
    state, record = request.app.state, request.state.record
    body = dict(raw, model=model) if model else raw
    path, rid = endpoint.removeprefix("/v1/"), f"proxy-{uuid.uuid4().hex}"
    headers = {**AI_HEADERS, "X-Request-Id": rid, "X-Nanoseek-Route": "upstream"}
    record.update(request_id=rid, model=body.get("model"), route="upstream")

    def count(usage: dict) -> None:
        record.update(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))

    try:
        if not raw.get("stream"):
            data = await state.upstream.post(path, body)
            data["ai_generated"] = True
            state.metrics.upstream(200)
            remember(state.issued, record, rid, data.get("id", rid))
            record.update(request_id=data.get("id", rid),
                          output=[c.get("message", {}).get("content") or c.get("text") for c in data.get("choices", [])])
            count(data.get("usage") or {})
            return JSONResponse(data, headers=headers)
        events = await state.upstream.stream(path, body)
        remember(state.issued, record, rid)
    except APIError as e:
        state.metrics.upstream(e.status)
        raise
    state.metrics.upstream(200)

    async def relay():
        try:
            async for event in events:
                if isinstance(event, dict) and "error" not in event:
                    event["ai_generated"] = True
                    if event.get("usage"):
                        count(event["usage"])
                yield sse(event)
        finally:
            await events.aclose()

    return ClosingStreamingResponse(relay(), media_type="text/event-stream", headers=headers)
