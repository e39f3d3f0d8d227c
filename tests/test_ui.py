"""The chat page of `nanoseek serve --ui`: its routes and headers (plain HTTP), then the page in
headless Chromium (Debian's, driven by Playwright) against live servers: `nanoseek serve --ui` on
the tiny model, and a scripted engine whose answers are known (reasoning, an endless answer to
stop, HTML in the output).

The screenshots in docs/ are this test's: NANOSEEK_UI_SCREENSHOTS=docs pytest tests/test_ui.py
"""

import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import live  # noqa: E402  (tiny_dir, the model, is conftest.py's)

from nanoseek.cli import main  # noqa: E402
from nanoseek.infer.sequence import StreamEvent  # noqa: E402
from nanoseek.loading import tokenizer_for  # noqa: E402
from nanoseek.serve.app import Settings, create_app  # noqa: E402
from nanoseek.serve.audit import FeedbackStore  # noqa: E402
from nanoseek.serve.ui import CSP, STATIC_DIR  # noqa: E402

KEY = "sk-ui-test"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("NANOSEEK_UI_SCREENSHOTS")  # a folder: save the page's screenshots there


# ------------------------------------------------------------------ a scripted engine
REASONING = "17 × 24 = 17 × 20 + 17 × 4 = 340 + 68 = 408."
ANSWER = "17 × 24 = 408."
INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> **not bold**'
ESSAY = ("The sea covers most of the planet. ", "Its tides follow the moon, ", "its colour the sky. ")
SCRIPTS = {  # a keyword of the last user message: the pieces of the answer (None: endless)
    "17 × 24": ["<think>", "17 × 24 = ", "17 × 20 + 17 × 4", " = 340 + 68", " = 408.", "</think>",
                "17 × 24", " = 408", "."],
    "essay": None,
    "HTML": [INJECTION[:12], INJECTION[12:40], INJECTION[40:]],
}


class ScriptedChat:
    """The engine's serving interface, answering by the keyword of SCRIPTS found last in the prompt."""

    max_len = 4096
    last_step_kind = "decode"

    def __init__(self, tokenizer, delay=0.03):
        self.tokenizer, self.delay = tokenizer, delay
        self.running = {}  # request id -> (its sequence, its pieces)

    def add_request(self, prompt_ids, params, request_id):
        prompt = self.tokenizer.decode(prompt_ids)
        keyword = max(SCRIPTS, key=prompt.rfind)
        seq = type("Seq", (), {"output_ids": [], "params": params})()
        self.running[request_id] = (seq, SCRIPTS[keyword])
        return seq

    def abort(self, request_id):
        return self.running.pop(request_id, None) is not None

    def speculative_stats(self):
        return None

    def step(self):
        time.sleep(self.delay)
        events = []
        for rid, (seq, pieces) in list(self.running.items()):
            i = len(seq.output_ids)
            seq.output_ids.append(0)
            text = ESSAY[i % len(ESSAY)] if pieces is None else pieces[i]
            done = pieces is not None and i + 1 == len(pieces)
            if done:
                del self.running[rid]
            events.append(StreamEvent(rid, text, done, "stop" if done else None))
        return events


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return tokenizer_for(tiny_dir)


def scripted_app(tokenizer, **settings):
    # the upstream is never called: it is there to be listed with its route
    settings = {"upstream_url": "http://127.0.0.1:9/v1", "upstream_models": ["big-remote"], **settings}
    return create_app(ScriptedChat(tokenizer), tokenizer, "r1", Settings(**settings))


# ------------------------------------------------------------------ the routes, over HTTP
class PageParts(HTMLParser):
    """What the page loads and anything that would run or style inline."""

    def __init__(self):
        super().__init__()
        self.loads, self.inline = [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_script = tag == "script"
        if tag in ("script", "link", "img", "iframe") and (attrs.get("src") or attrs.get("href")):
            self.loads.append(attrs.get("src") or attrs.get("href"))
        if tag == "style" or "style" in attrs or any(a.startswith("on") for a in attrs):
            self.inline.append(tag)

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append("script")

    def handle_endtag(self, tag):
        self._in_script = False


def test_page_and_its_files_have_a_strict_csp(tokenizer):
    with live(scripted_app(tokenizer, ui=True)) as url:
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        parts = PageParts()
        parts.feed(page.text)
        assert parts.inline == []  # CSP would block them: the page must not need any
        assert sorted(parts.loads) == ["/static/app.css", "/static/app.js", "/static/favicon.svg"]
        types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        for path in parts.loads:
            r = httpx.get(url + path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(types[Path(path).suffix])
            assert r.headers["content-security-policy"] == CSP
            assert r.content == (STATIC_DIR / Path(path).name).read_bytes()
        assert httpx.get(url + "/static/index.html").headers["content-security-policy"] == CSP
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert "unsafe" not in CSP and "*" not in CSP
    script = (STATIC_DIR / "app.js").read_text()
    assert set(re.findall(r'"(/v1/[a-z/]+)"', script)) == {"/v1/models", "/v1/chat/completions", "/v1/feedback"}
    assert "innerHTML" not in script and "://" not in script  # output as text; nothing from elsewhere
    assert "url(" not in (STATIC_DIR / "app.css").read_text()


def test_no_page_without_ui_and_models_carry_their_route(tokenizer):
    with live(scripted_app(tokenizer)) as url:
        for path in ("/", "/static/app.js"):
            r = httpx.get(url + path)
            assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        models = httpx.get(url + "/v1/models").json()["data"]
    assert [(m["id"], m["route"], m["owned_by"]) for m in models] == [
        ("r1", "local", "nanoseek"), ("big-remote", "upstream", "upstream")]


def serve_app(monkeypatch, *argv):
    """The app `nanoseek serve ARGV` builds and would run."""
    built = []
    monkeypatch.setattr("nanoseek.serve.launch.run_until_signal", lambda server: built.append(server.config.app))
    assert main(["serve", *argv]) == 0
    return built[0]


def test_serve_ui_flag(tiny_dir, monkeypatch):
    from fastapi.testclient import TestClient  # no lifespan: the engine's thread is not needed here
    with_ui, without = (TestClient(serve_app(monkeypatch, "--model", str(tiny_dir), *flag),
                                   base_url="http://localhost").get("/")  # a Host the server accepts
                        for flag in (["--ui"], []))
    assert with_ui.status_code == 200 and with_ui.headers["content-security-policy"] == CSP
    assert without.status_code == 404


# ------------------------------------------------------------------ the page, in Chromium
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[test]'")
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH: `make test` installs Debian's when run as root with apt-get "
                    "(or: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh tab; at the end, no script error and nothing the CSP had to block."""
    context = browser.new_context(viewport={"width": 960, "height": 640})
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    errors, console = [], []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("console", lambda m: console.append(m.text))
    yield tab
    context.close()
    assert errors == []
    assert not [m for m in console if "Content Security Policy" in m]


def screenshot(page, name):
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name), animations="disabled")


def send(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator("#messages .msg.assistant").last


def metric(url, name):
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_page_streams_reasoning_stops_and_shows_html_as_text(page, tokenizer):
    app = scripted_app(tokenizer, ui=True)
    with live(app) as url:
        page.goto(url + "/")
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#model option").all_inner_texts() == ["r1 (local)", "big-remote (upstream)"]

        # every state the answer's text passes through, as the browser shows it
        page.evaluate("""() => { window.seen = [];
            new MutationObserver(() => { const c = document.querySelector('.msg.assistant .content');
                if (c) window.seen.push(c.textContent); })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
        send(page, "What is 17 × 24?")
        answer = last_answer(page)
        answer.and_(page.locator(".finished")).wait_for()
        seen = [s for s in dict.fromkeys(page.evaluate("window.seen")) if s]
        assert len(seen) >= 2 and seen[-1] == ANSWER  # shown piece by piece: streamed
        assert all(ANSWER.startswith(s) for s in seen)
        assert answer.locator(".ai-label").inner_text() == "AI-generated"
        assert answer.locator(".model-name").inner_text() == "r1 · local"
        reasoning = answer.locator("details.reasoning")
        assert reasoning.is_visible() and not answer.locator(".reasoning-text").is_visible()  # collapsed
        answer.locator("summary").click()
        assert reasoning.get_attribute("open") is not None
        assert answer.locator(".reasoning-text").inner_text() == REASONING
        assert answer.locator(".content").inner_text() == ANSWER
        assert answer.locator(".feedback").is_visible()
        screenshot(page, "ui-reasoning.png")

        send(page, "Write an essay about the sea.")
        answer = last_answer(page)
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant .content')[1].textContent.length > 150")
        assert app.state.worker.outstanding == 1 and page.locator("#stop").is_visible()
        screenshot(page, "ui-streaming.png")
        page.click("#stop")
        answer.and_(page.locator(".finished")).wait_for()
        assert answer.locator(".note").inner_text() == "Stopped."
        assert answer.locator(".content").inner_text().startswith(ESSAY[0] + ESSAY[1])
        for _ in range(500):  # the server saw the stream close: the request left the engine
            if not app.state.worker.engine.running and metric(url, "nanoseek_queue_depth") == 0:
                break
            time.sleep(0.01)
        assert app.state.worker.engine.running == {}
        assert metric(url, "nanoseek_queue_depth") == 0 and metric(url, "nanoseek_running_requests") == 0
        assert page.locator("#send").is_visible()

        send(page, "Answer with some HTML.")
        answer = last_answer(page)
        answer.and_(page.locator(".finished")).wait_for()
        assert answer.locator(".content").inner_text() == INJECTION  # the markup, shown as text
        assert page.locator("#messages img, #messages script").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.evaluate("[localStorage.length, document.cookie]") == [0, ""]


def test_page_on_the_tiny_model_asks_for_a_key_and_stores_feedback(page, tiny_dir, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("NANOSEEK_API_KEYS", KEY)
    db, audit = tmp_path / "feedback.sqlite", tmp_path / "audit.jsonl"
    app = serve_app(monkeypatch, "--model", str(tiny_dir), "--served-model-name", "tiny", "--ui",
                    "--feedback-db", str(db), "--audit-log", str(audit), "--audit-content")
    questions = ["2+2=", "and 3+3?"]
    with live(app) as url:
        page.goto(url + "/")
        page.locator("#key-dialog").wait_for()
        page.fill("#key-input", "sk-wrong")
        page.click("#key-form button")
        page.locator("#key-error", has_text="incorrect API key").wait_for()
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#model option").all_inner_texts() == ["tiny (local)"]
        assert page.evaluate("sessionStorage.getItem('nanoseek.apiKey')") == KEY

        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        answers = []
        for question in questions:
            send(page, question)
            answer = last_answer(page)
            answer.and_(page.locator(".finished")).wait_for()
            answers.append(answer.locator(".content").text_content())

        # the answers are the API's greedy answers to the same conversation
        turns, auth = [], {"Authorization": f"Bearer {KEY}"}
        for question, shown in zip(questions, answers):
            turns.append({"role": "user", "content": question})
            body = {"model": "tiny", "messages": turns, "max_tokens": 8, "temperature": 0}
            want = httpx.post(url + "/v1/chat/completions", json=body, headers=auth).json()
            assert shown == want["choices"][0]["message"]["content"]
            turns.append({"role": "assistant", "content": shown})
        sent = [r for r in map(json.loads, audit.read_text().splitlines())
                if r["endpoint"] == "/v1/chat/completions" and r["status"] == 200][:2]
        assert sent[1]["prompt"] == turns[:3]  # the page sent the conversation so far

        answer.locator(".thumb.down").click()
        answer.locator(".comment").fill("not what I asked")
        answer.locator(".send-feedback").click()
        answer.locator(".feedback-status:not(:empty)").wait_for()
        assert answer.locator(".feedback-status").inner_text() == "Thank you: feedback saved."
        request_id = answer.get_attribute("data-request-id")
        assert request_id == sent[1]["request_id"] and request_id.startswith("chatcmpl-")
    assert FeedbackStore(db).all() == [(request_id, 1, "not what I asked")]
