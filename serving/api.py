"""The OpenAI-compatible HTTP layer (FastAPI): /v1/models, /v1/chat/completions, /v1/completions.

HTTP concerns only: parse and validate, apply the chat template and the limits, hand token ids to a `Generator`
(the in-process engine, or the vLLM proxy), and turn its events into OpenAI JSON or SSE chunks. `Guard` (a plain ASGI
middleware) checks the API key and the body size on every route, BentoML's own included.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from . import openai_schema as oa
from .engine import Event, Overloaded, Params

log = logging.getLogger(__name__)


class Generator(Protocol):
    ready: bool

    def stream(self, rid: str, prompt_ids: list[int], params: Params, adapter: str) -> AsyncIterator[Event]:
        """Events for one request; raises Overloaded before the first event when there is no room."""


class State:
    """What the routes need: the generator, the tokenizer, the served names, the limits and the metrics."""

    def __init__(self, cfg, generator: Generator, tokenizer, model_name: str, context: int, metrics=None,
                 adapters: list[str] | None = None, lineage: dict | None = None, alias: str | None = None):
        self.cfg, self.gen, self.tok, self.model_name, self.context = cfg, generator, tokenizer, model_name, context
        self.metrics, self.adapters, self.lineage = metrics, list(adapters or []), lineage or {}
        self.alias = alias or model_name  # the name clients keep using across model swaps (serving/swap.py)
        self.monitor = None  # monitoring.live.Monitor: drift and the request log, fed after each request
        self.backend = ""
        self.inflight = 0  # requests holding this state; a swapped-out model is freed when it reaches 0

    @property
    def names(self) -> list[str]:
        """What /v1/models lists: this model's own id, the stable alias (once a swap made them differ), adapters."""
        return [self.model_name] + ([self.alias] if self.alias != self.model_name else []) + self.adapters


# ---------------------------------------------------------------- auth and body size
USAGE = "llmstack_usage"  # the ASGI scope entry where the routes leave a request's key name and tokens
# the `route` label of the per-key series; any other path is "other"
API_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/admin/reload")
ADMIN_PREFIX = "/admin/"  # routes only admin keys may call (the default key is one)


class Guard:
    """Bearer API keys on every route but the open ones (serving/keys.py: named keys with limits, counted and
    audited); bodies over the limit refused with 413 before parsing."""

    def __init__(self, app, api_key: str | None = None, open_routes=(), max_body_bytes: int = 1 << 20,
                 keys_file: str | None = None, audit_log: str | None = None, registry=None):
        from .keys import Audit, KeyRing, Limiter

        self.app, self.open, self.max_body = app, tuple(open_routes), max_body_bytes
        self.ring, self.limiter = KeyRing(keys_file, api_key), Limiter()
        self.audit = Audit(audit_log) if self.ring.enabled else None
        self.registry = registry

    @property
    def metrics(self):
        from .keys import key_metrics
        return key_metrics(self.registry)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.ring.enabled or path in self.open:
            return await self._limited_body(scope, receive, send, headers)
        key, refusal = self._admit(headers)
        if refusal is None and path.startswith(ADMIN_PREFIX) and not key.admin:
            refusal = oa.APIError(403, f"the key '{key.name}' may not use the admin routes (give it `admin: true` "
                                  "in the keys file, or use the default key)", type="permission_error",
                                  code="not_admin")
        usage = scope[USAGE] = {"key": key.name if key else None}
        t0, status = time.perf_counter(), {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            if refusal is not None:
                return await _send_error(send_status, refusal)
            return await self._limited_body(scope, receive, send_status, headers)
        finally:
            self._account(usage, path, status["code"], time.perf_counter() - t0)

    def _admit(self, headers: dict):
        """(key, None) for a request that may go on; (key or None, the APIError to answer) otherwise."""
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None, oa.APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                                     type="authentication_error", code="missing_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})
        key = self.ring.lookup(auth[7:].strip())
        if key is None:
            return None, oa.APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})
        hit = self.limiter.admit(key)
        if hit is None:
            return key, None
        limit, wait = hit
        self.metrics.limited.labels(key_name=key.name, limit=limit).inc()
        return key, oa.APIError(429, f"rate limit of the key '{key.name}' reached ({limit}: "
                                f"{getattr(key, limit)}); retry in {wait} s", type="rate_limit_error",
                                code="rate_limited", headers={"Retry-After": str(wait)})

    def _account(self, usage: dict, route: str, status: int, seconds: float) -> None:
        """Counters, the key's token window and the audit line, once the response is sent."""
        name = usage.get("key")
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        m = self.metrics
        label = route if route in API_ROUTES else "other"  # a path a client makes up must not make a new series
        m.requests.labels(key_name=name or "unauthenticated", route=label, status=str(status)).inc()
        if name:
            m.tokens.labels(key_name=name, kind="prompt").inc(prompt)
            m.tokens.labels(key_name=name, kind="completion").inc(completion)
            self.limiter.spend(name, prompt + completion)
        self.audit.write({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "key": name, "route": route,
                          "status": status, "prompt_tokens": prompt, "completion_tokens": completion,
                          "seconds": round(seconds, 3)})

    async def _limited_body(self, scope, receive, send, headers: dict):
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send_error(send, _too_large(self.max_body))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge()
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            return await _send_error(send, _too_large(self.max_body))


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> oa.APIError:
    return oa.APIError(413, f"request body larger than {limit} bytes (limits.max_body_bytes)",
                       code="body_too_large")


async def _send_error(send, err: oa.APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the app
def build_app(state: State | None = None) -> FastAPI:
    """The API app; `state` may be attached later (`app.state.llm = ...`), e.g. once the BentoML service loaded
    the model."""
    app = FastAPI(title="llmstack OpenAI-compatible API", docs_url="/v1/docs", openapi_url="/v1/openapi.json")
    app.state.llm = state

    @app.exception_handler(oa.APIError)
    async def _api_error(_: Request, exc: oa.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    _pages(app)

    @app.get("/drift")
    async def drift(request: Request):
        st = request.app.state.llm
        monitor = getattr(st, "monitor", None)
        return monitor.snapshot() if monitor is not None else {"enabled": False}

    @app.get("/v1/models", **oa.openapi_route(errors=(401, 503)))
    async def models(request: Request):
        st = _state(request)
        return oa.model_list(st.names)

    @app.post("/v1/chat/completions", **oa.openapi_route(oa.ChatRequest))
    async def chat(request: Request):
        return await _leased(request, _chat)

    @app.post("/v1/completions", **oa.openapi_route(oa.CompletionRequest))
    async def completions(request: Request):
        return await _leased(request, _completion)

    @app.post("/admin/reload", include_in_schema=False)
    async def reload(request: Request):
        from .swap import ReloadRequest, reload_route
        return await reload_route(request, await _parse(request, ReloadRequest))

    return app


async def _leased(request: Request, handler):
    """Run a generation route holding the served state (a swap frees the old model once no request holds it); a
    streamed answer hands the hold to its stream, which lets go when the last chunk is sent."""
    st = _state(request)
    st.inflight += 1
    lease = {"held": True}

    def release():
        if lease["held"]:
            lease["held"] = False
            st.inflight -= 1
    try:
        response = await handler(request, st, release)
        if isinstance(response, StreamingResponse):
            lease["streaming"] = True
        return response
    finally:
        if not lease.get("streaming"):
            release()


async def _chat(request: Request, st: State, release):
    req = await _parse(request, oa.ChatRequest)
    adapter = _adapter(st, req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages]
    try:
        text = st.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - e.g. a template that refuses a role order
        raise oa.APIError(400, f"messages: the chat template rejected them ({exc})", param="messages") from None
    ids = st.tok(text, add_special_tokens=False)["input_ids"]
    trace = _Trace(st, _answered_by(st, adapter), adapter, "chat", json.dumps(messages, ensure_ascii=False),
                   "\n".join(str(m["content"] or "") for m in messages), ids, request.scope.get(USAGE))
    return await _generate(request, st, req, ids, adapter, chat=True, trace=trace, release=release)


async def _completion(request: Request, st: State, release):
    req = await _parse(request, oa.CompletionRequest)
    adapter = _adapter(st, req.model)
    ids = st.tok(req.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise oa.APIError(400, "prompt: empty prompt", param="prompt")
    trace = _Trace(st, _answered_by(st, adapter), adapter, "completion", req.prompt, req.prompt, ids,
                   request.scope.get(USAGE))
    return await _generate(request, st, req, ids, adapter, chat=False, trace=trace, release=release)


def _answered_by(st: State, adapter: str) -> str:
    """The `model` of the response: the adapter asked for, else the served model's own id (after a swap, the new
    model's, whichever name the request used)."""
    return adapter or st.model_name


def _pages(app: FastAPI) -> None:
    """The two self-contained pages: /dashboard (metrics and drift) and /playground (chat)."""
    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page():
        from .dashboard import page
        return HTMLResponse(page())

    @app.get("/playground", response_class=HTMLResponse, include_in_schema=False)
    async def playground_page():
        from .playground import page
        return HTMLResponse(page())


def _state(request: Request) -> State:
    st = request.app.state.llm
    if st is None or not st.gen.ready:
        raise oa.APIError(503, "the model is still loading; retry shortly", type="server_error",
                          code="not_ready", headers={"Retry-After": "5"})
    return st


async def _parse(request: Request, model):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise oa.APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise oa.APIError(400, "the JSON body must be an object", code="invalid_json")
    bad = _lone_surrogate(data)
    if bad is not None:  # JSON allows the escape, the tokenizer (and UTF-8) not the character
        field = ".".join(str(x) for x in bad)
        raise oa.APIError(400, f"{field}: not valid text: a lone surrogate (a \\ud800-\\udfff escape without its "
                          "pair)", param=field, code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise oa.validation_error(exc) from None


def _lone_surrogate(data, path: tuple = ()) -> tuple | None:
    """The path of the first string in a parsed JSON body that UTF-8 cannot encode, or None."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _lone_surrogate(value, path + (key,))
        if found is not None:
            return found
    return None


def _adapter(st: State, model: str) -> str:
    if model in (st.model_name, st.alias):
        return ""
    if model in st.adapters:
        return model
    raise oa.APIError(404, f"the model '{model}' does not exist; this server serves: {', '.join(st.names)}",
                      param="model", code="model_not_found")


def _params(st: State, req, n_prompt: int, chat: bool) -> Params:
    lim = st.cfg.limits
    field = "messages" if chat else "prompt"
    if n_prompt > lim.max_prompt_tokens:
        raise oa.APIError(400, f"{field}: the prompt has {n_prompt} tokens, more than the limit of "
                          f"{lim.max_prompt_tokens} (limits.max_prompt_tokens)", param=field,
                          code="context_length_exceeded")
    room = st.context - n_prompt
    asked = req.limit
    pname = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > lim.max_tokens:
        raise oa.APIError(400, f"{pname}: {asked} is more than this server allows ({lim.max_tokens})", param=pname)
    if asked is not None and asked > room:
        raise oa.APIError(400, f"{pname}: the prompt ({n_prompt} tokens) plus {asked} new tokens exceed the "
                          f"model's context of {st.context}", param=pname, code="context_length_exceeded")
    if room < 1:
        raise oa.APIError(400, f"{field}: the prompt fills the model's context of {st.context} tokens",
                          param=field, code="context_length_exceeded")
    default = st.cfg.server.default_max_tokens
    return Params(max_tokens=asked or min(default, room, lim.max_tokens), temperature=req.temperature,
                  top_p=req.top_p, seed=req.seed, stops=req.stops, ignore_eos=req.ignore_eos)


class _Trace:
    """One request as the monitor sees it: collected while the answer streams, handed over once at the end."""

    def __init__(self, st: State, model: str, adapter: str, endpoint: str, prompt: str, text: str, ids: list[int],
                 usage: dict | None = None):
        self.st, self.model, self.adapter, self.endpoint = st, model, adapter, endpoint
        self.usage = usage  # the key's entry (Guard): tokens are counted against it
        self.prompt, self.text, self.ids = prompt, text, ids
        self.rid = ""
        self.t0, self.ts, self.first = time.perf_counter(), time.time(), None
        self.parts: list[str] = []
        self.sent = False

    def event(self, ev: Event) -> None:
        if self.first is None and (ev.text or ev.finish):
            self.first = time.perf_counter()
        if ev.text:
            self.parts.append(ev.text)

    def done(self, last: Event | None, status: str) -> None:
        if self.sent:
            return
        self.sent = True
        if self.usage is not None:
            self.usage.update(prompt_tokens=len(self.ids), completion_tokens=last.completion_tokens if last else 0)
        if self.st.monitor is None:
            return
        end = time.perf_counter()
        self.st.monitor.observe({
            "id": self.rid, "ts": self.ts, "endpoint": self.endpoint, "model": self.model, "adapter": self.adapter,
            "backend": self.st.backend, "prompt": self.prompt, "text": self.text, "prompt_ids": self.ids,
            "output": "".join(self.parts), "completion_tokens": last.completion_tokens if last else 0,
            "finish": last.finish if last else "abort", "logprob_sum": last.logprob_sum if last else None,
            "status": status, "ttft_s": (self.first - self.t0) if self.first else None, "e2e_s": end - self.t0})


def _status(ev: Event) -> str:
    return "error" if ev.error else ("cancelled" if ev.finish == "abort" else "success")


async def _generate(request: Request, st: State, req, ids: list[int], adapter: str, chat: bool, trace: _Trace,
                    release=None):
    params = _params(st, req, len(ids), chat)
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    trace.rid = rid
    events = st.gen.stream(rid, ids, params, adapter)
    try:
        first = await anext(events)  # Overloaded surfaces here, before any byte is sent
    except Overloaded as exc:
        if st.metrics:
            st.metrics.rejected("rejected", adapter)
        raise oa.APIError(429, f"server overloaded: {exc}; retry later", type="rate_limit_error",
                          code="overloaded", headers={"Retry-After": str(st.cfg.limits.retry_after_s)}) from None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(st, trace.model, rid, first, events, len(ids), chat, include_usage, trace,
                                      release), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(request, st, trace.model, rid, first, events, len(ids), chat, trace)


async def _collect(request: Request, st: State, model: str, rid: str, first: Event, events, n_prompt: int,
                   chat: bool, trace: _Trace):
    """Non-streaming: gather the text while watching for the client going away (which cancels the generation)."""
    parts: list[str] = []

    async def gather() -> Event:
        ev = first
        while True:
            parts.append(ev.text)
            trace.event(ev)
            if ev.finish is not None:
                return ev
            ev = await anext(events)

    task = asyncio.ensure_future(gather())
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                await events.aclose()
                trace.done(None, "cancelled")
                return JSONResponse({}, status_code=499)
        last = task.result()
    finally:
        if not task.done():
            task.cancel()
    trace.done(last, _status(last))
    if last.error:
        raise oa.APIError(500, last.error, type="server_error", code="generation_failed")
    text = "".join(parts)
    make = oa.chat_response if chat else oa.completion_response
    return make(rid, model, text, last.finish, n_prompt, last.completion_tokens)


async def _sse(st: State, model: str, rid: str, first: Event, events, n_prompt: int, chat: bool,
               include_usage: bool, trace: _Trace, release=None):
    """SSE chunks as OpenAI sends them; a client that disconnects closes this generator, which cancels the request."""
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield data(oa.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
        ev = first
        while True:
            trace.event(ev)
            if ev.error:
                trace.done(ev, "error")
                yield data(oa.APIError(500, ev.error, type="server_error", code="generation_failed").body())
                break
            if ev.text or ev.finish:
                if chat:
                    delta = {"content": ev.text} if ev.text else {}
                    yield data(oa.chat_chunk(rid, model, delta, ev.finish))
                else:
                    yield data(oa.completion_chunk(rid, model, ev.text, ev.finish))
            if ev.finish is not None:
                trace.done(ev, _status(ev))
                if include_usage:
                    u = oa.usage(n_prompt, ev.completion_tokens)
                    chunk = oa.chat_chunk if chat else oa.completion_chunk
                    yield data(chunk(rid, model, {} if chat else "", usage_=u, choices=False))
                break
            ev = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        trace.done(None, "cancelled")  # no-op when the request finished
        await events.aclose()
        if release is not None:
            release()
