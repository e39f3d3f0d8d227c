"""The server under load and hostile input: limits that answer rather than stall, strict
request types, and bounded waits. Helpers come from test_serve."""

import httpx
import pytest

serve = pytest.importorskip("test_serve", reason="needs fastapi, uvicorn, httpx, openai")
from test_serve import CHAT, ScriptedEngine, live  # noqa: E402

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


# ------------------------------------------------------------------ long chats
class ScanCountingText(str):
    """A rendered template that counts the characters its `find` calls pass over."""
    scanned = 0

    def find(self, sub, start=0, *args):
        at = str.find(self, sub, start, *args)
        ScanCountingText.scanned += (len(self) if at < 0 else at + len(sub)) - start
        return at


class LetterTokenizer:
    """One id per character; a template of `<role>content` turns."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, turns, add_generation_prompt=True):
        return ScanCountingText("".join(f"<{t['role']}>{t['content']}" for t in turns) + "<assistant>")


def test_chat_prompt_is_one_pass_over_the_template():
    """30,000 one-letter messages took 5.9 s when each placeholder was searched from the start."""
    from nanoseek.serve.prompt import ChatEncoder
    tok = LetterTokenizer()
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(2000)]
    ScanCountingText.scanned = 0
    ids = ChatEncoder(tok).encode_chat(turns)
    assert ids == tok.encode(tok.apply_chat_template(turns))
    rendered = len(tok.apply_chat_template([{**t, "content": "\ue000" + str(i) + "\ue001"}
                                            for i, t in enumerate(turns)]))
    assert ScanCountingText.scanned <= rendered


class GatedTokenizer:
    """The tiny tokenizer, whose chat template waits for the test's gate."""

    def __init__(self, inner):
        import threading
        self.inner, self.entered, self.gate = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply_chat_template(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner.apply_chat_template(*args, **kwargs)


def test_health_answers_while_a_chat_prompt_is_tokenized(tiny_dir):
    import threading
    tok = GatedTokenizer(tokenizer_for(tiny_dir))
    app = create_app(ScriptedEngine(["a"]), tok, "m")
    with live(app) as url:
        chat = []
        long_chat = [{"role": "user", "content": "x" * 10}] * 150  # short chats are encoded inline
        thread = threading.Thread(target=lambda: chat.append(httpx.post(
            f"{url}/v1/chat/completions", json={"model": "m", "messages": long_chat}, timeout=30)))
        thread.start()
        try:
            assert tok.entered.wait(10)
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # the loop is free
        finally:
            tok.gate.set()
            thread.join()
        assert chat[0].status_code == 200


def test_messages_per_request_are_capped(tiny_dir):
    with live(scripted_app(tiny_dir, max_messages=3)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": CHAT * 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "4 messages are over this server's limit of 3" in r.json()["error"]["message"]


# ------------------------------------------------------------------ strict types
@pytest.mark.parametrize("field, value, param", [
    ("max_tokens", True, "max_tokens"), ("max_tokens", "8", "max_tokens"), ("max_tokens", 8.0, "max_tokens"),
    ("stream", "yes", "stream"), ("n", "2", "n"), ("seed", 1.5, "seed"), ("temperature", "0.5", "temperature"),
    ("stop", [1], "stop.0"), ("messages", [{"role": "user", "content": 5}], "messages.0.content"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages.0.content.0.text"),
    ("messages", [{"content": "hi"}], "messages.0.role"), ("stream_options", {"include_usage": 1},
                                                          "stream_options.include_usage"),
])
def test_loose_types_are_400_naming_the_field(tiny_dir, client_of_scripted, field, value, param):
    r = client_of_scripted.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, field: value})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param + ": ")


def test_strict_types_keep_what_openai_accepts(client_of_scripted):
    """An integer temperature, a string stop, text parts, a token-id prompt."""
    ok = [("/v1/chat/completions", {"messages": CHAT, "temperature": 1, "stop": "x", "max_tokens": 2}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
          ("/v1/completions", {"prompt": [1, 2, 3], "top_p": 1, "stream": False})]
    for path, body in ok:
        assert client_of_scripted.post(path, json={"model": "m", **body}).status_code == 200, body
    r = client_of_scripted.post("/v1/completions", json={"model": "m", "prompt": [1, True]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")
    r = client_of_scripted.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "stop": ["a"] * 17})
    assert r.json()["error"]["message"] == "stop: at most 16 stop sequences"


@pytest.fixture(scope="module")
def client_of_scripted(tiny_dir):
    with live(scripted_app(tiny_dir)) as url, httpx.Client(base_url=url) as client:
        yield client


# ------------------------------------------------------------------ hostile bodies
def test_lone_surrogate_is_400_and_a_pair_is_text(client_of_scripted):
    lone = b'{"model": "m", "messages": [{"role": "user", "content": "x\\ud800y"}]}'
    r = client_of_scripted.post("/v1/chat/completions", content=lone, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert "surrogate pair" in r.json()["error"]["message"]
    pair = lone.replace(b"\\ud800", b"\\ud83d\\ude00")
    r = client_of_scripted.post("/v1/chat/completions", content=pair, headers={"Content-Type": "application/json"})
    assert r.status_code == 200


class Records:
    """Log records of the server's and uvicorn's loggers (uvicorn's do not reach caplog)."""

    def __init__(self):
        import logging
        self.records, self.loggers = [], [logging.getLogger(n) for n in ("nanoseek.serve", "uvicorn.error")]
        self.handler = type("H", (logging.Handler,), {"emit": lambda h, r: self.records.append(r)})()

    def __enter__(self):
        for logger in self.loggers:
            logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc):
        for logger in self.loggers:
            logger.removeHandler(self.handler)


def metric_lines(url, endpoint) -> list[str]:
    text = httpx.get(f"{url}/metrics").text
    return [line for line in text.splitlines() if line.startswith(f'nanoseek_requests_total{{endpoint="{endpoint}"')]


def test_client_gone_mid_body_is_no_traceback_and_no_500(tiny_dir):
    import socket
    import time
    app = scripted_app(tiny_dir)
    with live(app) as url, Records() as records:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": \"m\", ")
            time.sleep(0.2)  # the handler is reading the body now
        for _ in range(200):
            if metric_lines(url, "/v1/chat/completions"):
                break
            time.sleep(0.02)
        assert metric_lines(url, "/v1/chat/completions") == [
            'nanoseek_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0']
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]


def test_aborted_stream_counts_its_tokens_and_is_499(tiny_dir, tmp_path):
    import json
    import time
    log = tmp_path / "audit.jsonl"
    app = scripted_app(tiny_dir, endless=True, audit_log=log)
    body = {"model": "m", "prompt": "a", "max_tokens": 4000, "stream": True}
    with live(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            received = sum(1 for _, line in zip(range(10), lines) if line.startswith("data: "))
        for _ in range(300):  # the server learns of the disconnect at its next write
            if metric_lines(url, "/v1/completions"):
                break
            time.sleep(0.01)
        assert metric_lines(url, "/v1/completions") == [
            'nanoseek_requests_total{endpoint="/v1/completions",status="499"} 1.0']
        tokens = next(float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                      if line.startswith("nanoseek_completion_tokens_total "))
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["status"] == 499 and record["completion_tokens"] == tokens >= received == 5


# ------------------------------------------------------------------ slow clients, shutdown
def read_until_closed(sock) -> bytes:
    """What the server sends until it closes the connection (socket.timeout if it never does)."""
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_half_sent_headers_are_cut_off(tiny_dir):
    import socket
    with live(scripted_app(tiny_dir, header_timeout=0.3)) as url:
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        with socket.create_connection(address) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert read_until_closed(s) == b""
        with socket.create_connection(address) as s:  # the same on a kept-alive connection
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            response = b""
            while not response.endswith(b"}"):  # /health's JSON, to its last byte
                response += s.recv(4096)
            assert response.startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /health HTTP/1.1\r\n")
            assert read_until_closed(s) == b""


def test_half_sent_body_is_408(tiny_dir):
    import socket
    with live(scripted_app(tiny_dir, body_timeout=0.3)) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\": ")
            response = read_until_closed(s)
    assert response.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in response


def test_shutdown_ends_running_requests_with_an_error(tiny_dir):
    import json
    import threading
    from test_serve import serving
    app = scripted_app(tiny_dir, endless=True, shutdown_timeout=0.2)
    body = {"model": "m", "prompt": "a", "max_tokens": 4000}
    with serving(app) as (url, server):
        unstreamed = []
        thread = threading.Thread(target=lambda: unstreamed.append(httpx.post(f"{url}/v1/completions", json=body)))
        thread.start()
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            server.should_exit = True  # what SIGTERM does
            events = [line[6:] for line in lines if line.startswith("data: ")]
        thread.join()
    assert events[-1] == "[DONE]" and json.loads(events[-2]) == {"error": {
        "message": "the server is shutting down", "type": "server_error", "param": None, "code": None}}
    assert all("error" not in json.loads(e) for e in events[:-2])
    assert unstreamed[0].status_code == 503
    assert not app.state.worker._thread.is_alive()  # the server finished its shutdown


def test_serve_command_exits_0_on_sigterm_and_logs_no_query(tiny_dir):
    """The real command: uvicorn re-raises SIGTERM after its shutdown, which killed the process
    (status -15) before; the access log on stdout shows no query string."""
    import signal
    import subprocess
    import sys
    import time
    from test_serve import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(tiny_dir), "--port",
                             str(port), "--max-len", "64", "--shutdown-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models?api_key=sk-secret-in-query").status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "sk-secret" not in out + err
    assert '"GET /v1/models?<redacted> HTTP/1.1" 200' in out + err
