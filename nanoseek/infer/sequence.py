"""A request's life in the engine: its tokens, its text, how it ends, what it streams.

The text is the decode of the whole output, built incrementally (vLLM's detokenizer): each
token decodes only the ids since the last stable point (`prefix_offset`), and its new text is
what that decode adds to the decode of the ids already read (`read_offset`); while the new
ids end inside a multi-byte character (trailing U+FFFD) nothing is added until it completes,
and a request that finishes there gets the rest, U+FFFD included. Stop strings are looked for
only where the new text could complete one. So a token costs the same at position 10 or 4,000.
A stream sends only the stable part of the text: not a tail that could be the start of a
stop string. What was sent is therefore always a prefix of the final text.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from .sampling import SamplingParams, TokenLogprob

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
    logprobs: list[TokenLogprob] | None = None         # per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, the first None
    cached_tokens: int = 0                              # prompt tokens read from the prefix cache


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
    logprobs: list[TokenLogprob] | None = None             # per output token, with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled by the prefill, with params.prompt_logprobs
    matcher: object = None                   # the grammar's state (grammar.py), with params.grammar
    cached_tokens: int = 0                   # prompt tokens whose cache came from the prefix cache
    copy_from: int | None = None             # the slot those come from, when not its own

    def __post_init__(self):
        # one float per sampled token, from the request's own generator (Python's: a few
        # hundred ns a draw on the host, where a torch.Generator draw costs microseconds)
        self.rng = random.Random(self.seed)
        self.unread: list[float] = []  # uniforms given back (unread_uniforms), last first
        self.prefix_offset = self.read_offset = 0  # incremental detokenizing (module docstring)
        if self.params.logprobs is not None:
            self.logprobs = []

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
        return self.unread.pop() if self.unread else self.rng.random()

    def unread_uniforms(self, uniforms: list[float]) -> None:
        """Give back drawn uniforms, unused, in order: uniform() returns them first."""
        self.unread.extend(reversed(uniforms))

    def extend(self, run: list[int], tokenizer, eos_id: int | None,
               logprobs: list[TokenLogprob] | None = None) -> StreamEvent:
        """Take sampled tokens in order (one, or a decode burst's), up to the one that finishes
        the sequence (a stop id, EOS, max_tokens, a stop string): update the text and finish
        state, return what to stream. The run is detokenized in one step; with stop strings
        (and a tokenizer) any token may complete one, so such a run goes a token at a time.
        logprobs: the run's, one per token (kept for the tokens taken)."""
        if self.params.stop and tokenizer is not None:
            for i, token in enumerate(run):
                self._take([token], tokenizer, eos_id, logprobs[i: i + 1] if logprobs else None)
                if self.finished:
                    break
        else:
            self._take(run, tokenizer, eos_id, logprobs)
        return self.stream_event()

    def _take(self, run: list[int], tokenizer, eos_id: int | None,
              logprobs: list[TokenLogprob] | None = None) -> None:
        """extend()'s state update for one run, nothing streamed."""
        p = self.params
        run = run[: self.max_tokens - len(self.output_ids)]
        ends = set(p.stop_token_ids) | ({eos_id} if eos_id is not None and not p.ignore_eos else set())
        stop = next((i for i, token in enumerate(run) if token in ends), None)
        if stop is not None:
            run, self.finish_reason = run[: stop + 1], "stop"
        self.output_ids.extend(run)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.extend(logprobs[: len(run)])
        if self.matcher is not None:
            self.matcher.consume(run)
        full = len(self.output_ids) >= self.max_tokens
        if tokenizer is not None:  # a stop string the last token completes still ends it as "stop"
            self._detokenize(tokenizer, self.output_ids[:-1] if stop is not None else self.output_ids,
                             stop is not None or full)
        if self.finish_reason is None and full:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status = Status.FINISHED

    def _detokenize(self, tokenizer, text_ids: list[int], last: bool) -> None:
        """Extend self.text by what text_ids add since the last call (on the last call also an
        incomplete character, as U+FFFD); cut at a stop string."""
        done = self.text
        skip = self.params.skip_special_tokens
        read = tokenizer.decode(text_ids[self.prefix_offset: self.read_offset], skip_special_tokens=skip)
        new = tokenizer.decode(text_ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(new) > len(read) and (not new.endswith("\ufffd") or last):
            self.text = done + new[len(read):]
            self.prefix_offset, self.read_offset = self.read_offset, len(text_ids)
        stops = self.params.stop
        if stops and self.finish_reason is None:
            start = max(0, len(done) - max(map(len, stops)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
            if hits:
                self.text, self.finish_reason = self.text[: min(hits)], "stop"

    def stream_event(self) -> StreamEvent:
        end = len(self.text) if self.finished else stable_end(self.text, self.params.stop)
        new = self.text[self.sent: end]
        self.sent = max(self.sent, end)
        return StreamEvent(self.request_id, new, self.finished, self.finish_reason)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.text, list(self.output_ids), self.finish_reason,
                             Usage(len(self.prompt_ids), len(self.output_ids)),
                             self.speculative.as_dict() if self.speculative is not None else None,
                             self.logprobs, self.prompt_logprobs, self.cached_tokens)


def stable_end(text: str, stops: list[str]) -> int:
    """Length of the prefix of `text` that later tokens cannot change or cut off."""
    end = len(text)  # (an incomplete character is never in the text before the last token)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return end
