"""The server under load and hostile input: limits that answer rather than stall, strict
request types, and bounded waits. Helpers come from test_serve."""

import httpx
import pytest

serve = pytest.importorskip("test_serve", reason="needs fastapi, uvicorn, httpx, openai")
from test_serve import CHAT, KEY, ScriptedEngine, live, tiny_app, tiny_dir  # noqa: E402,F401

from nanoseek.loading import tokenizer_for  # noqa: E402
from nanoseek.serve.app import Settings, create_app  # noqa: E402


def scripted_app(tiny_dir, pieces=("a",), endless=False, **settings):
    return create_app(ScriptedEngine(list(pieces), endless=endless), tokenizer_for(tiny_dir), "m", Settings(**settings))


# ------------------------------------------------------------------ queue limits
def test_full_queue_is_429_with_retry_after_and_too_many_choices_400(tiny_dir):
    app = scripted_app(tiny_dir, endless=True, max_queue=2)
    body = {"model": "m", "prompt": "a", "max_tokens": 4000}
    with live(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={**body, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # 3 choices never fit a queue of 2
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "n": 2, "stream": True}) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            r = httpx.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
