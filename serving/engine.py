"""Continuous batching for in-process backends (ONNX Runtime, transformers).

One engine thread owns the model. Every iteration it admits waiting requests into free batch slots (a prefill each),
then runs ONE decode step for every running sequence together: concurrent requests share forward passes instead of
queueing one by one, and a request joins or leaves the batch between any two steps (as vLLM's scheduler does).

The batch's KV cache (`kvcache.Batch`) is left-padded: a sequence that joins is padded on the left to the batch's
length (or the batch to its length), the attention mask hides the padding, and position ids count each row's real
tokens. Rows that finish are dropped and all-padding columns on the left trimmed. A prompt that starts like an
earlier one takes that start's KV from `kvcache.PrefixCache`. Backends only run `forward` on these arrays (see
`Backend`); sampling is in `sampling.py`.

Requests talk to the thread through a bounded waiting queue (full: `Overloaded`, which the API answers with 429) and
an asyncio queue of `Event`s per request; a cancelled request (client gone) leaves the batch at the next step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Protocol

import numpy as np

from .kvcache import Batch, PrefixCache
from .requests import Event, Overloaded, Params, Request  # noqa: F401 - Event, Params: the engine's API
from .sampling import sample
from .token_stream import TokenStream

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the decoder: input_ids/position_ids (B, T), attention_mask (B, past + T), past None or the cache
        arrays [k0, v0, k1, v1, ...] each (B, kv_heads, past, head_dim). Returns the LAST position's logits (B, V)
        as float32 and the new cache arrays (B, kv_heads, past + T, head_dim)."""


class Engine:
    def __init__(self, backend: Backend, tokenizer, eos_ids: set[int], *, max_running: int = 8,
                 max_waiting: int = 32, metrics=None, prefix_cache_mb: int = 0):
        self.backend, self.tok, self.eos = backend, tokenizer, set(eos_ids)
        self.out = TokenStream(tokenizer, self.eos, metrics)
        self.prefix = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        self.max_running, self.max_waiting, self.metrics = max_running, max_waiting, metrics
        self.waiting: collections.deque[Request] = collections.deque()
        self.batch = Batch()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ready = False
        self.steps = 0
        self._admitting = 0  # taken from the queue, prefill not finished yet

    # ------------------------------------------------------------ lifecycle
    def start(self, warmup: bool = True) -> "Engine":
        if warmup:  # one short generation so the first user request does not pay for kernel set-up
            ids = self.tok("warm up", add_special_tokens=False)["input_ids"] or [0]
            logits, past = self.backend.forward(*_prefill_inputs(ids), None)
            self.backend.forward(np.array([[int(np.argmax(logits[0]))]]), np.ones((1, len(ids) + 1), np.int64),
                                 np.array([[len(ids)]]), past)
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()
        self.ready = True
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.ready = False

    # ------------------------------------------------------------ requests
    def submit(self, req: Request) -> Request:
        with self._cv:
            running, waiting = self.load
            if running + waiting >= self.max_running + self.max_waiting:
                raise Overloaded(f"{running} requests running and {waiting} waiting "
                                 f"(limits {self.max_running} / {self.max_waiting})")
            self.waiting.append(req)
            self._gauges()
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify_all()

    @property
    def load(self) -> tuple[int, int]:
        return len(self.batch) + self._admitting, len(self.waiting)

    # ------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.batch.reqs:
                    self._cv.wait()
                if self._stop:
                    break
                admit = []
                while self.waiting and len(self.batch) + len(admit) < self.max_running:
                    admit.append(self.waiting.popleft())
                self._admitting = len(admit)
                self._gauges()
            for req in admit:
                self._guard(self._prefill, req)
                with self._cv:
                    self._admitting -= 1
            if self.batch.reqs:
                self._guard(self._decode, None)
            with self._cv:
                self._gauges()
        for req in list(self.batch.reqs) + list(self.waiting):
            self._finish(req, "abort", error="the server is shutting down")

    def _guard(self, fn, req: Request | None) -> None:
        """A failing step fails the requests it touched, never the engine."""
        try:
            fn(req)
        except Exception as exc:  # noqa: BLE001 - reported to the affected clients and the log
            log.exception("engine step failed")
            victims = [req] if req is not None else list(self.batch.reqs)
            for r in victims:
                self._finish(r, "abort", error=f"generation failed: {type(exc).__name__}: {exc}")
            if req is None:
                self.batch = Batch()

    def _prefill(self, req: Request) -> None:
        if req.cancelled:
            self._finish(req, "abort")
            return
        req.started = time.perf_counter()
        if self.metrics:
            self.metrics.queue_time(req)
        ids = req.prompt_ids
        cached, past = self.prefix.lookup(ids) if self.prefix and not req.adapter else (0, None)
        n = len(ids)
        logits, past = self._forward(np.asarray([ids[cached:]], dtype=np.int64), np.ones((1, n), dtype=np.int64),
                                     np.arange(cached, n, dtype=np.int64)[None, :], past, [req])
        req.cached_tokens = cached
        if self.prefix and not req.adapter:  # adapters change the KV: only the base model's is shared
            self.prefix.store(ids, past)
        tok = self._accept(req, logits[0])
        if req.finish is None:
            self.batch.add(req, past, tok)

    def _decode(self, _=None) -> None:
        b = self.batch
        live = [i for i, r in enumerate(b.reqs) if not r.cancelled]
        for i, r in enumerate(b.reqs):
            if r.cancelled:
                self._finish(r, "abort")
        b.keep(live)
        if not b.reqs:
            return
        ids = np.array(b.next_ids, dtype=np.int64)[:, None]
        positions = b.mask.sum(axis=1, keepdims=True).astype(np.int64)
        mask = np.concatenate([b.mask, np.ones((len(b), 1), np.int64)], axis=1)
        logits, past = self._forward(ids, mask, positions, b.past, b.reqs)
        b.past, b.mask = past, mask
        self.steps += 1
        keep = []
        for i, r in enumerate(b.reqs):
            tok = self._accept(r, logits[i])
            if r.finish is None:
                b.next_ids[i] = tok
                keep.append(i)
        b.keep(keep)

    def _forward(self, ids, mask, positions, past, reqs: list[Request]):
        if any(r.adapter for r in reqs):  # multi-LoRA: one adapter per row (backends that load adapters)
            return self.backend.forward(ids, mask, positions, past, adapters=[r.adapter for r in reqs])
        return self.backend.forward(ids, mask, positions, past)

    def _accept(self, req: Request, logits: np.ndarray) -> int:
        """Sample the next token of `req`, stream its text, finish the request when it is done."""
        tok, lp = sample(logits, req.params, req.rng)
        self.out.accept(req, tok, lp)
        return tok

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        self.out.finish(req, reason, error)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.load(*self.load)


def _prefill_inputs(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(ids)
    return (np.asarray([ids], dtype=np.int64), np.ones((1, n), dtype=np.int64),
            np.arange(n, dtype=np.int64)[None, :])


class EngineGenerator:
    """The API's `Generator` over an in-process `Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def stream(self, rid: str, prompt_ids: list[int], params: Params, adapter: str = ""):
        req = Request(rid, prompt_ids, params, asyncio.get_running_loop(), {"adapter": adapter} if adapter else {})
        self.engine.submit(req)  # Overloaded propagates to the caller's first anext()
        try:
            while True:
                ev = await req.events.get()
                yield ev
                if ev.finish is not None:
                    return
        finally:
            if req.finish is None:
                self.engine.cancel(req)
