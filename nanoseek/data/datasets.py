"""User data: documents for pretraining and chats for SFT, from files or the built-in tasks.

A spec is one of
    path/to/file.txt        documents separated by blank lines (one or more empty lines);
                            a file without blank lines is one document
    path/to/file.jsonl      one JSON object per line with "text" (a document) or
                            "messages" ([{role, content}], a chat)
    path/to/file.json       a JSON list of such objects
    path/to/file.parquet    a "text" or "messages" column (needs pyarrow)
    path/to/folder          a Hugging Face dataset saved with `save_to_disk` (needs
                            `datasets`); a DatasetDict gives its "train" split
    builtin:TASK[:level=N][:n=M][:seed=S]
                            M generated train-split examples of a built-in task
                            (defaults: level 1, n 10000, seed 0)

`load_documents` reads "text"; a record holding only "messages" becomes its chat-template
text, and built-in examples become `format_pretrain` documents. `load_chats` reads
"messages" (roles system, user, assistant; at least one assistant turn); built-in examples
become `format_chat` chats. Anything else is a `DataError` naming the file, the line or row,
and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from . import tasks
from .tokenizer import apply_chat_template

ROLES = ("system", "user", "assistant")
BUILTIN_DEFAULTS = {"level": 1, "n": 10000, "seed": 0}


class DataError(ValueError):
    """Data nanoseek cannot use; the message names the file (and line) and the problem."""


def load_documents(spec: str | Path) -> list[str]:
    """Plain-text documents for pretraining."""
    if str(spec).startswith("builtin:"):
        return [tasks.format_pretrain(e) for e in _builtin(str(spec))]
    docs = []
    for where, record in read_records(Path(spec)):
        if isinstance(record.get("text"), str):
            docs.append(record["text"])
        elif "messages" in record:
            docs.append(apply_chat_template(_messages(record["messages"], where)))
        else:
            raise DataError(f"{where}: a record needs a 'text' string or 'messages'")
    return _non_empty(docs, spec, "documents")


def load_chats(spec: str | Path) -> list[list[dict]]:
    """Chats [{role, content}, ...] for supervised fine-tuning."""
    if str(spec).startswith("builtin:"):
        return [tasks.format_chat(e) for e in _builtin(str(spec))]
    path = Path(spec)
    if path.suffix == ".txt":
        raise DataError(f"{path}: a .txt file holds documents, not chats; use .jsonl, .json or "
                        f".parquet with 'messages'")
    chats = []
    for where, record in read_records(path):
        if "messages" not in record:
            raise DataError(f"{where}: a chat record needs 'messages' ([{{role, content}}, ...])")
        chat = _messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in chat):
            raise DataError(f"{where}: the chat has no assistant message to learn from")
        chats.append(chat)
    return _non_empty(chats, spec, "chats")


# ------------------------------------------------------------------ readers
def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs of a file or saved dataset, whatever its records hold; `where`
    is 'file:line' (.jsonl), 'file document N' (.txt) or 'file row N' (.json, .parquet, a
    dataset folder), for messages."""
    if path.is_dir():
        yield from _hf_dataset(path)
        return
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        for i, doc in enumerate(_paragraphs(text)):
            yield f"{path} document {i + 1}", {"text": doc}
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got "
                                    f"{type(record).__name__}")
                yield f"{path}:{n}", record
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            hint = "; one object per line is JSON Lines: name it .jsonl" if e.msg == "Extra data" else ""
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}){hint}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json file must hold a list of objects, [{{...}}, ...]; "
                            f"it holds a {type(data).__name__}")
        for n, record in enumerate(data, 1):
            if not isinstance(record, dict):
                raise DataError(f"{path} row {n}: expected a JSON object, got {type(record).__name__}")
            yield f"{path} row {n}", record
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        for n, record in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path} row {n}", record
    else:
        raise DataError(f"{path}: unknown data format '{path.suffix}' (expected .txt, .jsonl, .json, "
                        f".parquet, a folder saved with datasets' save_to_disk, or builtin:TASK)")


def _paragraphs(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _hf_dataset(path: Path) -> Iterator[tuple[str, dict]]:
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a folder, but not a dataset saved with datasets' save_to_disk")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs `datasets` (pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataError(f"{path}: a DatasetDict without a 'train' split "
                            f"(splits: {', '.join(ds)})")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for n, record in enumerate(ds, 1):
        yield f"{path} row {n}", record


def _messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a 'role' and a 'content' string")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}; roles are "
                            f"{', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _non_empty(items: list, spec, what: str) -> list:
    if not items:
        raise DataError(f"{spec}: holds no {what}")
    return items


def _builtin(spec: str) -> list[tasks.Example]:
    """builtin:TASK[:key=value]... -> generated train-split examples."""
    name, *options = spec.split(":")[1:] or [""]
    if name not in tasks.TASKS:
        raise DataError(f"{spec}: unknown built-in task '{name}' (tasks: {', '.join(tasks.TASKS)})")
    args = dict(BUILTIN_DEFAULTS)
    for option in options:
        key, _, value = option.partition("=")
        if key not in args or not value.lstrip("-").isdigit():
            raise DataError(f"{spec}: bad option '{option}' (options: level=N, n=M, seed=S)")
        args[key] = int(value)
    task = tasks.get_task(name)
    if args["level"] not in task.levels or args["n"] < 1:
        raise DataError(f"{spec}: level must be one of {task.levels} and n >= 1")
    return task.generate(args["n"], level=args["level"], split="train", seed=args["seed"])
