"""A request's life in the engine: its tokens, its text, how it ends, what it streams.

The text is always the decode of the whole output (so a multi-byte character split over
tokens is never broken) and a stream sends only its stable part: not trailing U+FFFD
(bytes of a character still incomplete) and not a tail that could be the start of a stop
string. What was sent is therefore always a prefix of the final text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from .sampling import SamplingParams

if TYPE_CHECKING:
    from .speculative import RequestStats


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class StreamEvent(NamedTuple):
    """What one step produced for one request (unpacks as a tuple)."""
    request_id: str
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"; None while running


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    # with speculative decoding: proposed, accepted, forwards, acceptance_rate, mean_accepted_length
    speculative: dict | None = None


@dataclass(eq=False)  # identity: a request is itself, whatever its fields
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int                          # params.max_tokens, or what the context leaves
    seed: int
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int | None = None                  # cache row while running
    finish_reason: str | None = None
    text: str = ""                           # decoded output (cut at a stop string)
    sent: int = 0                            # characters of `text` already streamed
    speculative: RequestStats | None = None  # drafts proposed / accepted, when the engine speculates

    def __post_init__(self):
        self.rng = torch.Generator().manual_seed(self.seed)  # CPU: one float per sampled token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.rng))

    def append(self, token: int, tokenizer, eos_id: int | None) -> StreamEvent:
        """Take one sampled token: update text and finish state, return what to stream."""
        self.output_ids.append(token)
        p = self.params
        text_ids = self.output_ids
        if token in p.stop_token_ids or (token == eos_id and not p.ignore_eos):
            self.finish_reason, text_ids = "stop", self.output_ids[:-1]
        if tokenizer is not None:
            text = tokenizer.decode(text_ids)
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits and self.finish_reason is None:
                text, self.finish_reason = text[: min(hits)], "stop"
            self.text = text
        if self.finish_reason is None and len(self.output_ids) >= self.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status = Status.FINISHED
        return self.stream_event()

    def stream_event(self) -> StreamEvent:
        end = len(self.text) if self.finished else stable_end(self.text, self.params.stop)
        new = self.text[self.sent: end]
        self.sent = max(self.sent, end)
        return StreamEvent(self.request_id, new, self.finished, self.finish_reason)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.text, list(self.output_ids), self.finish_reason,
                             Usage(len(self.prompt_ids), len(self.output_ids)),
                             self.speculative.as_dict() if self.speculative is not None else None)


def stable_end(text: str, stops: list[str]) -> int:
    """Length of the prefix of `text` that later tokens cannot change or cut off."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return end
