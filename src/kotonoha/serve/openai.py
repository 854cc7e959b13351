"""Request schemas of the OpenAI-compatible API, and its error shape.

Only requests are pydantic models: they are what needs validating (ranges, types, limits),
and a validation failure becomes an OpenAI-style 400. Responses are built as plain dicts in
`api.py`, in exactly the shape OpenAI documents.

Unknown fields are ignored, as OpenAI-compatible servers (vLLM, llama.cpp) do, so clients that
send newer parameters still work. A few widely used non-OpenAI sampling fields (vLLM's
`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`) are accepted too: the Playground uses them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kotonoha.sampling import MIN_REPETITION_PENALTY

MAX_STOP = 4  # OpenAI's limit
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 256  # prompts in one /v1/completions call
_TOKEN_ID = re.compile(r"\s*-?[0-9]+\s*")


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unencodable_text(value: Any, path: str = "") -> str | None:
    """The path of the first string in a parsed JSON value that is not valid Unicode, if any.

    JSON may carry lone UTF-16 surrogates ("\\ud800") that no tokenizer, database or UTF-8
    writer accepts; requests are checked up front so that they get a 400, not a 500.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            bad = unencodable_text(key, path) or unencodable_text(item, f"{path}.{key}".strip("."))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if bad := unencodable_text(item, f"{path}.{i}".strip(".")):
                return bad
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if bad := unencodable_text(data):
            raise ValueError(f"'{bad}' is not valid Unicode text (it has a lone surrogate)")
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The sampling settings shared by chat and text completions."""

    model: str | None = None  # None = the first model the server loaded
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Not in OpenAI's API; the names and meanings are vLLM's.
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 = off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not _TOKEN_ID.fullmatch(key):  # ASCII digits only: int("²") fails
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    def stops(self) -> list[str]:
        return self.stop if isinstance(self.stop, list) else []


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"Message content of type {part.type!r} is not supported; "
                                 "this server reads text only.")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each one a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # accepted for vLLM compatibility; no BOS is added


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
