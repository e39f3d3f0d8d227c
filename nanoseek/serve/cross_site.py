"""What a web page on another site could make a browser send here, refused.

A page can POST a CORS "simple" request (`Content-Type: text/plain`, a form, no header at
all) to any address without a preflight, and through DNS rebinding (its own name resolved
to 127.0.0.1) even read the answer. So a POST must be `application/json` (which needs a
preflight this server never grants: it sends no CORS headers), and the Host header must be
an address (an IP literal cannot be rebound), `localhost`, or a name the server was told
it is reached by (`--host` when a name, `--allowed-hosts`; `*` accepts any).
"""

from __future__ import annotations

import ipaddress

from fastapi.responses import JSONResponse

from .protocol import error_body

LOOPBACK_NAMES = ("localhost",)


def host_name(host: str) -> str:
    """The Host header without its port (and an IPv6 literal without its brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str, allowed: list[str]) -> bool:
    name = host_name(host)
    return "*" in allowed or is_ip(name) or name in LOOPBACK_NAMES or name in allowed


def is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


class CrossSiteGuard:
    """400 for a Host this server is not reached by, 415 for a POST body that is not JSON."""

    def __init__(self, app, allowed_hosts: list[str]):
        self.app, self.allowed = app, [h.strip().lower() for h in allowed_hosts]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if not host_allowed(headers.get("host", ""), self.allowed):
            refusal = (400, f"the Host header {headers.get('host', '')!r} is not an address of this server; "
                            "start it with --allowed-hosts NAME to accept that name", "invalid_host")
        elif scope["method"] == "POST" and not is_json(headers.get("content-type", "")):
            refusal = (415, f"Content-Type must be application/json, got {headers.get('content-type', 'none')!r}",
                       "unsupported_media_type")
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, code = refusal
        response = JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status)
        await response(scope, receive, send)
