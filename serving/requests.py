"""What flows between the API and a backend: a request's parameters (`Params`), the request itself as a backend
sees it (`Request`: prompt, timings, generated tokens, its event queue) and what its stream receives (`Event`)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class Overloaded(Exception):
    """Every batch slot is busy and the waiting queue is full."""


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Event:
    """What a request's stream receives: new text (possibly empty), the running token count, and at the end the
    finish reason ("stop", "length", "abort") or an error message; the last event carries the sum of the generated
    tokens' log-probabilities when the backend knows it (drift monitoring)."""
    text: str
    completion_tokens: int
    finish: Optional[str] = None
    error: Optional[str] = None
    logprob_sum: Optional[float] = None


class Request:
    def __init__(self, rid: str, prompt_ids: list[int], params: Params, loop: asyncio.AbstractEventLoop,
                 labels: dict):
        self.id, self.prompt_ids, self.params, self.loop, self.labels = rid, list(prompt_ids), params, loop, labels
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.started: float | None = None  # prefill start (end of queueing)
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.generated: list[int] = []
        self.sent = 0  # characters of the decoded text already streamed
        self.logprob_sum = 0.0
        self.finish: str | None = None
        self.rng = np.random.default_rng(params.seed)
        self.adapter: str | None = labels.get("adapter") or None
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache

    def push(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True
