"""The OpenAI wire format: request bodies (pydantic) and the error shape.

Requests are validated here, not in the engine, so a client's mistake is a 400 that names
the field (`param`) before anything is queued. Types are strict, as OpenAI's: `"8"`, `8.0`
or `true` is not an integer and `"yes"` is not a boolean (an integer is a float). Unknown
fields are ignored, as the many OpenAI clients send parameters this server does not
implement (penalties, logit bias …).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After of a 429

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class _Sampling(Strict):
    """Fields shared by chat and text completions (OpenAI's names and ranges)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM's extensions: top_k (0 is off), ignore_eos
    ignore_eos: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def as_template_turn(self) -> dict:
        content = self.content or ""
        if not isinstance(content, str):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions

    def prompts(self) -> list[str | list[int]]:
        v = self.prompt
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]
        return list(v)


class FeedbackRequest(Strict):
    request_id: str = Field(min_length=1, max_length=200)
    rating: int = Field(ge=1, le=5)  # five stars; a thumbs-up/down UI sends 5 / 1
    comment: str = Field("", max_length=10_000)
