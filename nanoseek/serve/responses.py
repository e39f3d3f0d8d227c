"""What a completion answers with: OpenAI's bodies, server-sent events and the AI label."""

from __future__ import annotations

import json

from fastapi.responses import StreamingResponse

from ..infer.reasoning import ReasoningSplitter

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


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole output."""
    splitter = ReasoningSplitter()
    splitter.feed(text)
    splitter.flush()
    return splitter.reasoning, splitter.answer


def count_reasoning_tokens(tokenizer, reasoning: str, completion_tokens: int) -> int:
    if not reasoning:
        return 0
    return min(completion_tokens, len(tokenizer.encode("<think>" + reasoning + "</think>")))


def chat_message(text: str) -> dict:
    reasoning, answer = split_reasoning(text)
    return {"role": "assistant", "content": answer, "reasoning_content": reasoning or None,
            "reasoning": reasoning or None}


def usage_body(prompt: int, completion: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}
