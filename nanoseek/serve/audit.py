"""What the server keeps: nothing by default; an opt-in audit log; feedback users send.

The audit log is JSONL, one line per completion request: request id, time, endpoint,
model, route (local or upstream), HTTP status, token counts and latency. Prompts and
outputs are added only with `content=True` (`--audit-content`), a separate decision from
keeping the log at all. Feedback (`POST /v1/feedback`) goes into a local SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path


class AuditLog:
    def __init__(self, path: str | Path, content: bool = False):
        self.path, self.content = Path(path), content
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict, prompt=None, output=None) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        if self.content:
            record["prompt"], record["output"] = prompt, output
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)


def write_completion(audit: AuditLog | None, rid: str, endpoint: str, model: str | None, route: str,
                     status: int, prompt_tokens: int | None, completion_tokens: int | None, start: float,
                     raw: dict, outputs) -> None:
    """One completion request's line (nothing when the log is off); `start` is its perf_counter."""
    if audit is None:
        return
    record = {"request_id": rid, "endpoint": endpoint, "model": model, "route": route, "status": status,
              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "latency_s": round(time.perf_counter() - start, 4)}
    audit.write(record, prompt=raw.get("messages", raw.get("prompt")), output=outputs)


class FeedbackStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
                       "request_id TEXT NOT NULL, rating INTEGER NOT NULL, comment TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def add(self, request_id: str, rating: int, comment: str) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute("INSERT INTO feedback (time, request_id, rating, comment) VALUES (?, ?, ?, ?)",
                             (time.time(), request_id, rating, comment))
            return cur.lastrowid

    def all(self) -> list[tuple]:
        with self._connect() as db:
            return db.execute("SELECT request_id, rating, comment FROM feedback ORDER BY id").fetchall()
