"""What the server keeps: nothing by default; an opt-in audit log; feedback users send.

The audit log is JSONL, one line per API request, refused ones included (400, 401, 404,
413, 415, 429, 5xx): time, request id, method, endpoint, model, route (local or upstream),
status, token counts, latency, the client's address, the request's `user` field and the
key id, never the key (`key_id`: `printf %s KEY | sha256sum | cut -c1-12`). Prompts and
outputs are added only with `content=True` (`--audit-content`), a separate decision from
keeping the log at all. The file is the owner's alone (mode 0600) and rotates by size.
Feedback (`POST /v1/feedback`) goes into a local SQLite file, also mode 0600, with the
key id of its sender.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from datetime import datetime, timezone
from logging.handlers import RotatingFileHandler
from pathlib import Path


def key_id(key: bytes) -> str:
    """A key's name in logs: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:12]


def create_private(path: Path) -> None:
    """Create `path` (and its folder) readable by its owner only; an existing file becomes so too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class PrivateRotatingFileHandler(RotatingFileHandler):
    """RotatingFileHandler whose files, the fresh one after each rollover too, are mode 0600."""

    def _open(self):
        create_private(Path(self.baseFilename))
        return super()._open()


class AuditLog:
    def __init__(self, path: str | Path, content: bool = False, max_bytes: int = 100 << 20, backups: int = 5):
        self.path, self.content = Path(path), content
        create_private(self.path)
        self.handler = PrivateRotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backups,
                                                  encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, record: dict, prompt=None, output=None) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        if self.content:
            record["prompt"], record["output"] = prompt, output
        line = json.dumps(record, ensure_ascii=False)
        self.handler.handle(logging.LogRecord("nanoseek.audit", logging.INFO, "", 0, line, None, None))

    def close(self) -> None:
        self.handler.close()


class FeedbackStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        create_private(self.path)  # SQLite gives its journal the database's mode
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
                       "request_id TEXT NOT NULL, rating INTEGER NOT NULL, comment TEXT NOT NULL, key_id TEXT)")
            if "key_id" not in [row[1] for row in db.execute("PRAGMA table_info(feedback)")]:  # an older file
                db.execute("ALTER TABLE feedback ADD COLUMN key_id TEXT")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def add(self, request_id: str, rating: int, comment: str, key_id: str | None = None) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute("INSERT INTO feedback (time, request_id, rating, comment, key_id) VALUES (?, ?, ?, ?, ?)",
                             (time.time(), request_id, rating, comment, key_id))
            return cur.lastrowid

    def all(self) -> list[tuple]:
        with self._connect() as db:
            return db.execute("SELECT request_id, rating, comment FROM feedback ORDER BY id").fetchall()
