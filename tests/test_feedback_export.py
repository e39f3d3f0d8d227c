"""`nanoseek feedback export` (serve/feedback_export.py) on what live servers stored: ratings
posted to /v1/feedback joined to the audit log's content, out as SFT chats and preference
pairs. Scripted engines (test_serve's) give known answers: two servers, one after the other,
answer the same question differently and write to the same audit log and feedback database."""

import json

import pytest

serve = pytest.importorskip("test_serve", reason="needs fastapi, uvicorn, httpx, openai")

import httpx  # noqa: E402
import openai  # noqa: E402

from nanoseek.cli import main  # noqa: E402
from nanoseek.data.datasets import load_chats  # noqa: E402
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer  # noqa: E402
from nanoseek.serve.app import Settings, create_app  # noqa: E402

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
OTHER = [{"role": "user", "content": "What is 3 + 3?"}]
RIGHT = "<think>I add 2 and 2.</think>The answer is 4."  # serve.THINK's pieces, joined
WRONG = "The answer is 5."


def rate(url, request_id, rating):
    r = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "rating": rating, "comment": ""})
    assert r.status_code == 200, r.text


def served(tmp_path, pieces, content=True, audit=True):
    """A live scripted server writing to tmp_path's audit log (rotated every few lines, so that
    export reads the backups too) and feedback database."""
    settings = Settings(audit_log=tmp_path / "audit.jsonl" if audit else None, audit_content=content,
                        audit_max_bytes=1000, audit_backups=100, feedback_db=tmp_path / "feedback.sqlite")
    return serve.live(create_app(serve.ScriptedEngine(pieces), ChatTokenizer(byte_tokenizer(1024)), "m", settings))


def chat(url, messages, **kw):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    return client.chat.completions.create(model="m", messages=messages, **kw)


def test_export_from_live_servers_gives_sft_chats_and_preference_pairs(tmp_path, capsys):
    with served(tmp_path, serve.THINK) as url:
        right = chat(url, QUESTION)
        assert right.choices[0].message.content == "The answer is 4."  # reasoning apart in the API ...
        rate(url, right.id, 1)
        rate(url, right.id, 5)  # ... the latest rating counts
        other = chat(url, OTHER)
        rate(url, other.id, 4)
        rate(url, chat(url, OTHER, n=2).id, 5)
        rate(url, chat(url, OTHER, max_tokens=3).id, 3)  # neutral
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        rate(url, client.completions.create(model="m", prompt="2+2=").id, 5)
    with served(tmp_path, [WRONG]) as url:  # a later model answers the same question wrongly
        wrong = chat(url, QUESTION)
        rate(url, wrong.id, 2)
    with served(tmp_path, [WRONG], audit=False) as url:  # a server that kept no audit log
        rate(url, chat(url, OTHER).id, 5)
    assert (tmp_path / "audit.jsonl.3").is_file()  # rotated

    out = tmp_path / "export"
    assert main(["feedback", "export", "--db", str(tmp_path / "feedback.sqlite"), "--audit-log",
                 str(tmp_path / "audit.jsonl"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(
        f"7 rated requests (8 ratings, the latest of each counts) -> 2 SFT chats, 1 preference pairs in {out}")
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    # ... and the SFT data hold the answer as served, reasoning included (R1's SFT format)
    assert sft == [{"messages": QUESTION + [{"role": "assistant", "content": RIGHT}], "request_id": right.id,
                    "rating": 5},
                   {"messages": OTHER + [{"role": "assistant", "content": RIGHT}], "request_id": other.id,
                    "rating": 4}]
    assert load_chats(out / "sft.jsonl") == [row["messages"] for row in sft]  # what `nanoseek sft --data` reads
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert pairs == [{"prompt": QUESTION, "chosen": [{"role": "assistant", "content": RIGHT}],
                      "rejected": [{"role": "assistant", "content": WRONG}]}]
    assert json.loads((out / "export.json").read_text())["skipped"] == {
        "several answers (n > 1): the rating does not say which": 1, "a neutral rating": 1,
        "not a chat request": 1, "no audit record of the request": 1}


def test_without_audit_content_export_says_why_nothing_can_be_exported(tmp_path, capsys):
    with served(tmp_path, [WRONG], content=False) as url:
        rate(url, chat(url, QUESTION).id, 5)
    argv = ["feedback", "export", "--db", str(tmp_path / "feedback.sqlite"), "--audit-log",
            str(tmp_path / "audit.jsonl"), "--out", str(tmp_path / "export")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing can be exported" in err and "--audit-content" in err
    assert not (tmp_path / "export").exists()
    for extra, message in ((["--good", "2", "--bad", "2"], "need 1 <= --bad < --good <= 5"),
                           (["--db", str(tmp_path / "none.sqlite")], "no such file")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
