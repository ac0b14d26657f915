"""Request bodies of the OpenAI-compatible API, their A3 extensions, and OpenAI-style errors.

Unknown fields are an error (never silently dropped); OpenAI fields A3 cannot honour are accepted only at
the value that changes nothing (presence_penalty = 0, ...). The A3 extensions are the `DecodingConfig`
options: order, group_size, dynamic, criterion, per_step, threshold, speculative; plus `blanks` (the prompt
holds [BLANK:n] marks to fill) and `ignore_eos` (as vLLM's: generate exactly max_tokens tokens).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class A3Options(BaseModel):
    """The decoding fields both endpoints share (OpenAI's and A3's)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None  # metadata, as OpenAI's
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    # A3 extensions
    order: str | list[int] = "left-to-right"
    group_size: int = Field(1, ge=1)
    dynamic: bool = False
    criterion: str = "confidence"
    per_step: int = Field(1, ge=1)
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    speculative: int = Field(0, ge=0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(A3Options):
    prompt: str
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    blanks: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(A3Options):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse_request(cls: type[BaseModel], body: object) -> BaseModel:
    """`body` as a `cls`, or an APIError(400) naming the first bad field in one line."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"unknown field {where!r}", param=where) from None
        if first["type"] == "missing":
            raise APIError(400, f"missing required field {where!r}", param=where) from None
        value = first.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        raise APIError(400, f"{where}: {first['msg']}{shown}", param=where) from None
