"""OpenAI-compatible request and response shapes, and OpenAI's error JSON. HTTP concerns only: no engine code here.

Requests are pydantic models that reject unknown types and out-of-range values with a message naming the field;
fields OpenAI defines that this server does not implement (tools, logprobs, n > 1, ...) are refused by name rather
than silently ignored. Types are strict, as OpenAI's are ("0.5" is not a temperature), and numbers finite. Their JSON
schemas, with what the validators add (at most 4 stop sequences, penalties only 0, ...), are the request bodies of the
OpenAPI document (`openapi_route`).
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

# Unknown fields are ignored (clients send OpenAI fields this server has no use for, e.g. `metadata`).
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _documented(*schemas: dict, nullable: bool = True) -> WithJsonSchema:
    """A field's schema in the OpenAPI document where a validator narrows what its type alone accepts: any of
    `schemas`, or null when `nullable`."""
    options = list(schemas) + ([{"type": "null"}] if nullable else [])
    return WithJsonSchema(options[0] if len(options) == 1 else {"anyOf": options})


_TEXT = {"type": "string", "minLength": 1}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
_ONLY_ZERO = {"minimum": 0, "maximum": 0, "description": "accepted for compatibility; only 0 is supported"}
# OpenAI takes any integer seed; numpy's generators take non-negative ones and vLLM int64 ones. The engines get the
# seed modulo 2**63: every seed from 0 to 2**63 - 1 as it is, any other deterministically.
SEED_RANGE = 1 << 63


def _above(schema: dict) -> None:
    """`exclusiveMinimum: x` is "above x" in OpenAPI 3.1 but malformed in 3.0, which BentoML's /docs.json declares;
    `not: {maximum: x}` says the same in both."""
    schema["not"] = {"maximum": schema.pop("exclusiveMinimum")}


class Message(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[Union[str, list[dict]],
                       _documented({"type": "string"}, {"type": "array", "items": _TEXT_PART}, nullable=False)]
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
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class Sampling(BaseModel):
    """The generation parameters chat and text completions share."""
    model_config = REQUEST_CONFIG
    model: str = Field(description="a name from GET /v1/models")
    max_tokens: Optional[int] = Field(None, ge=1, description="at most the server's limits.max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0, json_schema_extra=_above)
    stop: Annotated[Union[str, list[str], None], _documented(
        _TEXT, {"type": "array", "items": _TEXT, "maxItems": 4})] = None
    seed: Optional[int] = Field(None, description="any integer: the same seed and parameters give the same text")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    user: Optional[str] = None
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token (benchmarks with a fixed output length)."""
    # accepted for compatibility, refused when set to something this server cannot honour
    logprobs: Annotated[Optional[bool], _documented({"type": "boolean", "enum": [False]})] = None
    tools: Annotated[Optional[list], _documented({"type": "array", "maxItems": 0})] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, json_schema_extra=_ONLY_ZERO)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, json_schema_extra=_ONLY_ZERO)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("seed")
    @classmethod
    def _engine_seed(cls, v):
        return None if v is None else v % SEED_RANGE

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
    prompt: Annotated[Union[str, list[str]], _documented(
        _TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1}, nullable=False)]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: Annotated[bool, _documented({"type": "boolean", "enum": [False]}, nullable=False)] = False

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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = Field(description="the request field at fault, dotted (messages.0.role)")
    code: Optional[str]


class ErrorResponse(BaseModel):
    """OpenAI's error JSON."""
    error: ErrorDetail


ERRORS = {400: "malformed JSON, a wrong type or a value out of range (`param` names the field), or a prompt too long",
          401: "missing or wrong API key (when the server has one)",
          404: "no such model",
          413: "body larger than the server's limits.max_body_bytes",
          429: "overloaded: every batch slot and queue place is taken; retry after Retry-After seconds",
          503: "the model is still loading; retry after Retry-After seconds"}
# A server-sent event as OpenAPI before 3.2 describes one (3.2's `itemSchema`): `data` is a chunk's JSON or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE] at the end"}}}
_COMPLETION = {"description": "the completion, or with `stream: true` its chunks as server-sent events",
               "content": {"application/json": {"schema": {"type": "object"}},
                           "text/event-stream": {"schema": _SSE_EVENT}}}


def openapi_route(body: type[BaseModel] | None = None, errors=tuple(ERRORS)) -> dict:
    """FastAPI route arguments that document a route whose handler parses its own body: the request body (the
    model's JSON schema, nested models inlined since FastAPI adds no components for it), the success response and
    the errors in OpenAI's error JSON."""
    responses: dict[int, dict] = {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in errors}
    if body is None:
        return {"responses": responses}
    schema = _inline_defs(body.model_json_schema())
    request_body = {"required": True, "content": {"application/json": {"schema": schema}}}
    return {"responses": {200: _COMPLETION, **responses}, "openapi_extra": {"requestBody": request_body}}


def _inline_defs(schema: dict) -> dict:
    """The schema with every `$ref` to its own `$defs` replaced by the definition (no recursive models here)."""
    defs = schema.get("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(x) for x in node]
        return node
    return resolve(schema)


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
