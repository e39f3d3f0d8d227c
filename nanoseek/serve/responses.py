"""What a completion answers with: OpenAI's bodies, server-sent events and the AI label."""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse

from ..infer.reasoning import ReasoningSplitter
from ..infer.sampling import TokenLogprob
from .tools import parse_tool_calls

AI_HEADERS = {"X-AI-Generated": "true"}


class ClosingStreamingResponse(StreamingResponse):
    """Closes its generator however the response ends, so that a client gone mid-stream
    aborts its engine requests now (the generator's `finally`), not when it is collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def split_reasoning(text: str, thinking: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole output (thinking: the prompt opened the reasoning)."""
    splitter = ReasoningSplitter(thinking=thinking)
    splitter.feed(text)
    splitter.flush()
    return splitter.reasoning, splitter.answer


def count_reasoning_tokens(tokenizer, reasoning: str, completion_tokens: int) -> int:
    if not reasoning:
        return 0
    return min(completion_tokens, len(tokenizer.encode("<think>" + reasoning + "</think>")))


def chat_message(text: str, thinking: bool = False, tools: bool = False) -> dict:
    """The assistant's message: reasoning apart, and with tools the calls apart from the content."""
    reasoning, answer = split_reasoning(text, thinking)
    calls = []
    if tools:
        answer, calls = parse_tool_calls(answer)
    message = {"role": "assistant", "content": answer if answer or not calls else None,
               "reasoning_content": reasoning or None, "reasoning": reasoning or None}
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return message


def usage_body(prompt: int, completion: int, reasoning: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


# ------------------------------------------------------------ logprobs, OpenAI's two shapes
def _token(tokenizer, token_id: int) -> tuple[str, bytes]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), raw


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """Chat's {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    def one(token_id, logprob):
        text, raw = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tokenizer, entries: list[tuple[int, TokenLogprob | None]], offset: int = 0) -> dict:
    """The legacy completions' {tokens, token_logprobs, top_logprobs, text_offset} over
    (token id, logprobs or None) pairs: a prompt's first token has no logprob. As in vLLM, a
    position's top_logprobs also holds the token taken there."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in entries:
        text = _token(tokenizer, token_id)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(None if e is None else e.logprob)
        top = None
        if e is not None:
            top = {_token(tokenizer, t)[0]: lp for t, lp in e.top}
            top.setdefault(text, e.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
