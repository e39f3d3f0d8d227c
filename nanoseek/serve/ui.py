"""The chat page of `nanoseek serve --ui`: static files of this package (static/), no build step.

The page (index.html, app.js, app.css) talks only to this server's OpenAI API: the models of
/v1/models with their route, streamed /v1/chat/completions with the reasoning apart, and
/v1/feedback. The conversation lives in the tab's memory and an API key in its
sessionStorage; the server keeps neither. Model output is put in the page as text, never as
HTML, and the Content-Security-Policy below forbids inline script and style and any origin
but this one, so that a deployment with no internet access works and markup that slipped
through could still run nothing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so a new release's page is taken at once
}


class PageFiles(StaticFiles):
    """The static files, each with the page's security headers (index.html is reachable here too)."""

    async def get_response(self, path: str, scope) -> object:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


async def index():
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


def add_ui(app: FastAPI) -> None:
    """GET / (the page) and GET /static/* (its script, style and icon)."""
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")
