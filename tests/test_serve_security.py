"""Data governance of the server: what leaves the machine, what is logged and stored, and
which requests a browser on another site can make. Helpers (a live uvicorn, the tiny model,
a scripted engine) come from test_serve."""

import httpx
import pytest

serve = pytest.importorskip("test_serve", reason="needs fastapi, uvicorn, httpx, openai")
from test_serve import CHAT, KEY, ScriptedEngine, free_port, live, tiny_app  # noqa: E402

from nanoseek.loading import tokenizer_for  # noqa: E402
from nanoseek.serve.app import Settings, create_app  # noqa: E402


def dead_upstream() -> str:
    """An upstream nobody listens on: a request routed there is a 502, one answered here is not."""
    return f"http://127.0.0.1:{free_port()}/v1"


def test_local_model_requests_never_go_upstream(tiny_dir):
    app = tiny_app(tiny_dir, "local3", max_prompt_tokens=20, upstream_url=dead_upstream(), upstream_models=["m"])
    with live(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "local3", "prompt": "x" * 24, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "x-nanoseek-route" not in r.headers
    engine = ScriptedEngine(["a"], endless=True)
    app = create_app(engine, tokenizer_for(tiny_dir), "local3",
                     Settings(max_queue=1, upstream_url=dead_upstream(), upstream_models=["m"]))
    body = {"model": "local3", "messages": CHAT, "stream": True, "max_tokens": 4000}
    with live(app) as url, httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as held:
        lines = held.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # the queue's one place is taken
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"


def test_upstream_overflow_is_an_explicit_opt_in(tiny_dir):
    app = tiny_app(tiny_dir, "local3", max_prompt_tokens=20, upstream_url=dead_upstream(), upstream_models=["m"],
                   upstream_overflow=True)
    with live(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "local3", "prompt": "x" * 24, "max_tokens": 2})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_upstream_overflow_needs_upstream_models(capsys):
    from nanoseek.cli import main
    assert main(["serve", "--model", "m", "--upstream-overflow"]) == 2
    assert capsys.readouterr().err == "nanoseek: error: --upstream-overflow needs --upstream URL --upstream-models NAME\n"


def test_query_strings_are_redacted_from_the_access_log(tiny_dir):
    import logging

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    access, lines = logging.getLogger("uvicorn.access"), Lines()
    app = create_app(ScriptedEngine(["a"]), tokenizer_for(tiny_dir), "m")
    with live(app) as url:
        level = access.level
        access.setLevel(logging.INFO)  # live() runs uvicorn at "warning"
        access.addHandler(lines)
        try:
            assert httpx.get(f"{url}/v1/models?api_key=sk-secret-in-query").status_code == 200
        finally:
            access.removeHandler(lines)
            access.setLevel(level)
    (line,) = lines.lines
    assert "sk-secret" not in line and '"GET /v1/models?<redacted> HTTP/1.1" 200' in line


def test_cross_site_requests_are_refused(tiny_dir):
    """A page elsewhere can send a text/plain POST without a preflight, and through DNS
    rebinding (its name resolved to 127.0.0.1) read the answer; neither gets through."""
    app = create_app(ScriptedEngine(["hi"]), tokenizer_for(tiny_dir), "m", Settings(allowed_hosts=["api.internal"]))
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    with live(app) as url:
        def post(**headers):
            return httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)

        r = post(**{"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        assert post().status_code == 415  # no Content-Type at all
        r = post(**{"Content-Type": "application/json", "Host": "evil.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        for host in ("localhost:8000", "[::1]:8000", "10.1.2.3", "API.internal:443"):
            r = post(**{"Content-Type": "application/json; charset=utf-8", "Host": host})
            assert r.status_code == 200, host
        r = post(**{"Content-Type": "application/json", "Origin": "http://evil.example"})
        assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert not any(h.startswith("access-control-") for h in preflight.headers)


def test_serve_accepts_its_own_host_name():
    """--host NAME and --allowed-hosts reach Settings.allowed_hosts; an address needs no entry."""
    from nanoseek.cli import build_parser
    from nanoseek.serve.launch import settings_from_args
    for host, want in (("gpu-box.lan", ["api.internal", "gpu-box.lan"]), ("0.0.0.0", ["api.internal"])):
        args = build_parser().parse_args(["serve", "--model", "m", "--host", host, "--allowed-hosts", "api.internal"])
        assert settings_from_args(args).allowed_hosts == want


# ------------------------------------------------------------------ what is kept
def audit_lines(path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_request_is_audited_with_key_id_client_and_user(tiny_dir, tmp_path):
    import hashlib
    log = tmp_path / "audit.jsonl"
    app = create_app(ScriptedEngine(["a"], endless=True), tokenizer_for(tiny_dir), "m",
                     Settings(api_keys=[KEY], audit_log=log, max_queue=1, max_body_bytes=2000))
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "m", "messages": CHAT, "max_tokens": 2, "user": "alice"}
    with live(app) as url:
        def post(body, headers=auth, **kw):
            return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, **kw).status_code

        assert post(chat) == 200
        assert post(chat, {"Authorization": "Bearer sk-wrong-key"}) == 401
        assert post({**chat, "temperature": -1}) == 400
        assert post({**chat, "model": "nope"}) == 404
        assert post({**chat, "messages": [{"role": "user", "content": "x" * 3000}]}) == 413
        assert httpx.post(f"{url}/v1/chat/completions", content="{}", headers={**auth, "Content-Type": "text/plain"},
                          ).status_code == 415
        assert httpx.get(f"{url}/nothing", headers=auth).status_code == 404
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 4000},
                          headers=auth) as held:
            lines = held.iter_lines()
            next(lines)
            assert post(chat) == 429
    records = audit_lines(log)
    assert [(r["endpoint"], r["status"]) for r in records] == [
        ("/v1/chat/completions", 200), ("/v1/chat/completions", 401), ("/v1/chat/completions", 400),
        ("/v1/chat/completions", 404), ("/v1/chat/completions", 413), ("/v1/chat/completions", 415),
        ("/nothing", 404), ("/v1/chat/completions", 429), ("/v1/chat/completions", 499)]
    kid = hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert [r["key_id"] for r in records] == [kid, None, kid, kid, kid, None, None, kid, kid]
    assert {r["client"] for r in records} == {"127.0.0.1"}
    assert [r["user"] for r in records] == ["alice", None, "alice", "alice", None, None, None, "alice", "alice"]
    assert records[0]["model"] == "m" and records[0]["completion_tokens"] == 2 and records[0]["route"] == "local"
    text = log.read_text()
    assert KEY not in text and "sk-wrong-key" not in text


def test_audit_log_and_feedback_db_are_private_and_the_log_rotates(tiny_dir, tmp_path):
    import os
    import stat
    umask = os.umask(0o022)  # the usual default: files 0644 unless made private
    try:
        log, db = tmp_path / "audit.jsonl", tmp_path / "feedback.sqlite"
        app = create_app(ScriptedEngine(["a"]), tokenizer_for(tiny_dir), "m",
                         Settings(audit_log=log, audit_max_bytes=600, audit_backups=2, feedback_db=db))
        with live(app) as url:
            for _ in range(8):
                assert httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "hi"}).status_code == 200
    finally:
        os.umask(umask)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "feedback.sqlite"]
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    for name in files[:3]:
        assert 0 < (tmp_path / name).stat().st_size <= 600
        assert all(r["status"] == 200 for r in audit_lines(tmp_path / name))


def test_audit_rotation_flags_reach_the_settings():
    from nanoseek.cli import build_parser
    from nanoseek.serve.launch import settings_from_args
    args = build_parser().parse_args(["serve", "--model", "m", "--audit-log", "a.jsonl", "--audit-rotate-bytes", "1000",
                                      "--audit-backups", "3"])
    settings = settings_from_args(args)
    assert (settings.audit_max_bytes, settings.audit_backups) == (1000, 3)


def test_feedback_only_on_answers_this_server_gave_the_same_key(tiny_dir, tmp_path):
    import sqlite3
    db = tmp_path / "feedback.sqlite"
    app = create_app(ScriptedEngine(["a"]), tokenizer_for(tiny_dir), "m",
                     Settings(api_keys=[KEY, "sk-other"], feedback_db=db, feedback_rate=2))
    auth, other = {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer sk-other"}
    with live(app) as url:
        def feedback(rid, headers=auth):
            return httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "rating": 5}, headers=headers)

        rid = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "a"}, headers=auth).json()["id"]
        r = feedback("chatcmpl-made-up")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_request_id"
        assert feedback(rid, other).status_code == 404  # someone else's answer
        assert feedback(rid).status_code == 200
        r = feedback(rid)  # the third from this key within a minute (rate 2; unknown ids count too)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    (row,) = sqlite3.connect(db).execute("SELECT request_id, rating, key_id FROM feedback").fetchall()
    assert row[:2] == (rid, 5) and row[2] == __import__("hashlib").sha256(KEY.encode()).hexdigest()[:12]


def test_feedback_window_expires_ids(tiny_dir, tmp_path):
    app = create_app(ScriptedEngine(["a"]), tokenizer_for(tiny_dir), "m",
                     Settings(feedback_db=tmp_path / "f.sqlite", feedback_window=0))
    with live(app) as url:
        rid = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "a"}).json()["id"]
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": rid, "rating": 1})
        assert r.status_code == 404 and "in the last 0 s" in r.json()["error"]["message"]


def test_the_bearer_scheme_is_case_insensitive(tiny_dir):
    """RFC 9110: auth schemes are case-insensitive; some clients send "bearer"."""
    app = create_app(ScriptedEngine(["a"]), tokenizer_for(tiny_dir), "m", Settings(api_keys=[KEY]))
    with live(app) as url:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401
