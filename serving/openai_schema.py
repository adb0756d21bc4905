"""OpenAI-compatible request and response shapes, and OpenAI's error JSON. HTTP concerns only: no engine code here.

Requests are pydantic models that reject unknown types and out-of-range values with a message naming the field;
fields OpenAI defines that this server does not implement (tools, logprobs, n > 1, ...) are refused by name rather
than silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, str):
            return v
        texts = []
        for i, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i}: only {{'type': 'text', 'text': ...}} parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The generation parameters chat and text completions share."""
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    user: Optional[str] = None
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token (benchmarks with a fixed output length)."""
    # accepted for compatibility, refused when set to something this server cannot honour
    logprobs: Optional[bool] = None
    tools: Optional[list] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tool calls are not supported by this server")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v):
        if v:
            raise ValueError("presence/frequency penalties are not supported by this server (use 0)")
        return v

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1 or not isinstance(v[0], str):
                raise ValueError("exactly one prompt string is supported")
            return v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    @property
    def limit(self) -> Optional[int]:
        return self.max_tokens


# ---------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic problem as a 400 naming the field (OpenAI answers 400 for bad parameters)."""
    errs = exc.errors()
    e = errs[0]
    field = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return APIError(400, f"{field}: {msg}{more}" if field else msg + more, param=field or None,
                    code="invalid_value" if e.get("type") != "missing" else "missing_field")


# ---------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid: str, model: str, obj: str, choice: dict | None, usage_: dict | None) -> dict:
    out: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, **choice, "logprobs": None}] if choice is not None else []}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return _envelope(rid, model, "chat.completion",
                     {"message": {"role": "assistant", "content": text}, "finish_reason": finish},
                     usage(prompt_tokens, completion_tokens))


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return _envelope(rid, model, "text_completion", {"text": text, "finish_reason": finish},
                     usage(prompt_tokens, completion_tokens))


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None,
               choices: bool = True) -> dict:
    """A streamed chat chunk; choices=False: the final usage-only chunk (stream_options.include_usage)."""
    return _envelope(rid, model, "chat.completion.chunk",
                     {"delta": delta, "finish_reason": finish} if choices else None, usage_)


def completion_chunk(rid: str, model: str, text: str, finish: str | None = None, usage_: dict | None = None,
                     choices: bool = True) -> dict:
    """A streamed text-completion chunk; choices=False: the final usage-only chunk."""
    return _envelope(rid, model, "text_completion", {"text": text, "finish_reason": finish} if choices else None,
                     usage_)


def model_list(names: list[str], owner: str = "llmstack") -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": owner} for n in names]}
