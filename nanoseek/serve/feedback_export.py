"""`nanoseek feedback export`: users' ratings of served answers, back into training data.

The server keeps ratings (`POST /v1/feedback` into `--feedback-db`) apart from the requests
they rate; what was asked and answered is only in the audit log, and only when the server
ran with `--audit-content`. Export joins the two by request id:

    sft.jsonl           {"messages": the request's messages + the answer}, for each answer
                        rated `good` or better: `nanoseek sft --data` (and TRL's SFTTrainer)
                        read it
    preferences.jsonl   {"prompt": messages, "chosen": [answer], "rejected": [answer]}, for
                        each pair of a well-rated and a badly rated answer to the same
                        messages: TRL's conversational preference format (DPOTrainer)
    export.json         the counts, and why each skipped rating was skipped

The audit log's rotated backups (F.1, F.2, ...) are read too. A request's latest rating counts.
Chat requests only (a /v1/completions prompt is no chat),
with one answer (with n > 1 a rating does not say which it rates) and text content. The
answer is the model's text as served, reasoning included (`<think>…</think>` before the
answer, the format of R1's SFT data); for upstream requests the audit keeps the content only.
Without content in the audit log nothing can be exported, and the command says so.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from .audit import FeedbackStore

CHAT_ENDPOINT = "/v1/chat/completions"


def audit_files(path: Path) -> list[Path]:
    """The audit log and its rotated backups (path.1 the newest of those), oldest first."""
    if not path.is_file():
        raise FileNotFoundError(f"--audit-log {path}: no such file")
    backups = sorted((p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
                     key=lambda p: int(p.suffix[1:]), reverse=True)
    return backups + [path]


def read_audit(path: Path) -> dict[str, dict]:
    """The audit log's records by request id (the last one of an id), its backups included."""
    records = {}
    for file in audit_files(path):
        with file.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{file}:{n}: not a JSON line of an audit log") from None
                if record.get("request_id"):
                    records[record["request_id"]] = record
    return records


def exchange(record: dict | None) -> tuple[list[dict] | None, str | None, str | None]:
    """(messages, answer, None) of an audited chat request, or (None, None, why not)."""
    if record is None:
        return None, None, "no audit record of the request"
    if "prompt" not in record:
        return None, None, "the audit log kept no content (the server ran without --audit-content)"
    if record.get("endpoint") != CHAT_ENDPOINT:
        return None, None, "not a chat request"
    outputs = record.get("output")
    if record.get("status") != 200 or not outputs:
        return None, None, "no answer kept (a failed or streamed upstream request)"
    if len(outputs) != 1:
        return None, None, "several answers (n > 1): the rating does not say which"
    messages = record["prompt"]
    if not (isinstance(outputs[0], str) and isinstance(messages, list)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
        return None, None, "content that is not text"
    return [{"role": m.get("role"), "content": m["content"]} for m in messages], outputs[0], None


def export_feedback(db: str | Path, audit_log: str | Path, out: str | Path, good: int = 4,
                    bad: int = 2) -> dict:
    """Ratings >= good make SFT chats; (>= good, <= bad) answers to the same messages make
    preference pairs. Writes out/sft.jsonl, out/preferences.jsonl and out/export.json; returns
    the counts. A ValueError says why when nothing can be exported."""
    if not 1 <= bad < good <= 5:
        raise ValueError(f"need 1 <= --bad < --good <= 5 (ratings are 1..5), got bad={bad}, good={good}")
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"--db {db}: no such file")
    ratings = FeedbackStore(db).all()
    latest = {request_id: (rating, comment) for request_id, rating, comment in ratings}
    if not latest:
        raise ValueError(f"{db} holds no ratings yet")
    audit = read_audit(Path(audit_log))
    if not any("prompt" in record for record in audit.values()):
        raise ValueError(f"nothing can be exported: {audit_log} keeps no prompts or answers (the server ran "
                         f"without --audit-content), so the {len(latest)} ratings in {db} cannot be joined to "
                         "what they rate; run the server with --audit-log and --audit-content")
    skipped: Counter = Counter()
    sft, by_prompt = [], defaultdict(lambda: {"good": [], "bad": []})
    for request_id, (rating, _) in latest.items():
        messages, answer, why = exchange(audit.get(request_id))
        if why:
            skipped[why] += 1
            continue
        if rating >= good:
            sft.append({"messages": messages + [{"role": "assistant", "content": answer}],
                        "request_id": request_id, "rating": rating})
        elif rating > bad:
            skipped["a neutral rating"] += 1
            continue
        side = by_prompt[json.dumps(messages, sort_keys=True)]
        side["good" if rating >= good else "bad"].append(answer)
    pairs = [{"prompt": json.loads(key), "chosen": [{"role": "assistant", "content": chosen}],
              "rejected": [{"role": "assistant", "content": rejected}]}
             for key, side in by_prompt.items() for chosen in side["good"] for rejected in side["bad"]
             if chosen != rejected]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft.jsonl", sft), ("preferences.jsonl", pairs)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = {"ratings": len(ratings), "rated_requests": len(latest), "sft_chats": len(sft),
              "preference_pairs": len(pairs), "skipped": dict(skipped), "good": good, "bad": bad}
    (out / "export.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


# ---------------------------------------------------------------------- command line
def add_feedback_args(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = actions.add_parser("export", help="ratings + the audit log's content -> SFT chats and preference pairs",
                           description="Join the server's ratings (--feedback-db) to the requests they rate "
                                       "(--audit-log kept with --audit-content): answers rated good become SFT "
                                       "chats, a good and a bad answer to the same messages a preference pair.")
    e.add_argument("--db", required=True, metavar="F", help="the server's --feedback-db (SQLite)")
    e.add_argument("--audit-log", required=True, metavar="F",
                   help="the server's --audit-log, written with --audit-content")
    e.add_argument("--out", required=True, metavar="DIR", help="sft.jsonl, preferences.jsonl, export.json")
    e.add_argument("--good", type=int, default=4, metavar="R", help="ratings >= R are good (default 4 of 5)")
    e.add_argument("--bad", type=int, default=2, metavar="R", help="ratings <= R are bad (default 2 of 5)")


def cmd_feedback(args: argparse.Namespace) -> None:
    counts = export_feedback(args.db, args.audit_log, args.out, good=args.good, bad=args.bad)
    skipped = "; ".join(f"{n} {why}" for why, n in counts["skipped"].items())
    print(f"{counts['rated_requests']} rated requests ({counts['ratings']} ratings, the latest of each counts) -> "
          f"{counts['sft_chats']} SFT chats, {counts['preference_pairs']} preference pairs in {args.out}"
          + (f"; skipped: {skipped}" if skipped else ""))
