"""Every metric the service defines, in one place (prometheus-client; BentoML's own bentoml_* series stay).

Base units, no colons, low-cardinality labels (model, adapter, backend). Under `bentoml serve` the worker sets
PROMETHEUS_MULTIPROC_DIR before the service is created, so these are built lazily (in `Metrics.__init__`) and land
in BentoML's multiprocess registry, which its /metrics endpoint exports; tests pass their own registry.
"""
from __future__ import annotations

import time
import weakref

# LLM-scale latency buckets: 5 ms .. 180 s
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
           15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0)
LABELS = ("model", "adapter", "backend")


class Series:
    """The service's series, created once per registry: a model swapped in (serving/swap.py) reuses them with its
    own `model` label instead of registering them again."""

    def __init__(self, reg):
        from prometheus_client import Counter, Gauge, Histogram

        kw = {"registry": reg}
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time from arrival to the first generated token",
                              LABELS, buckets=BUCKETS, **kw)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             LABELS, buckets=BUCKETS, **kw)
        self.e2e = Histogram("llm_e2e_request_latency_seconds", "Time from arrival to the last token",
                             LABELS, buckets=BUCKETS, **kw)
        self.queue = Histogram("llm_request_queue_time_seconds", "Time a request waited for a batch slot",
                               LABELS, buckets=BUCKETS, **kw)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", LABELS, **kw)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated", LABELS, **kw)
        self.requests = Counter("llm_requests", "Finished requests by status and finish reason",
                                LABELS + ("status", "finish_reason"), **kw)
        self.running = Gauge("llm_requests_running", "Requests in the running batch", LABELS,
                             multiprocess_mode="livesum", **kw)
        self.waiting = Gauge("llm_requests_waiting", "Requests waiting for a batch slot", LABELS,
                             multiprocess_mode="livesum", **kw)
        self.info: dict[tuple, object] = {}  # one llm_model_info gauge per label set (lineage keys differ by model)
        self.reg = reg

    def info_gauge(self, names: tuple):
        from prometheus_client import Gauge

        if names not in self.info:
            if self.info:  # one metric name per registry: later models with other lineage keys reuse the first set
                return next(iter(self.info.values())), next(iter(self.info))
            self.info[names] = Gauge("llm_model_info", "The served model: 1, with its lineage in labels "
                                     "(0 once swapped out)", names, multiprocess_mode="max", registry=self.reg)
        return self.info[names], names


def per_registry(cache: weakref.WeakKeyDictionary, make, registry=None):
    """`make(registry)` once per registry (default: prometheus-client's): a metric name registers once. Weak keys:
    a registry's id may be reused once it is gone."""
    from prometheus_client import REGISTRY

    reg = registry if registry is not None else REGISTRY
    if reg not in cache:
        cache[reg] = make(reg)
    return cache[reg]


_SERIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def series(registry=None) -> Series:
    return per_registry(_SERIES, Series, registry)


class Metrics:
    """One served model's view of the series: its `model` / `backend` labels and its info line."""

    def __init__(self, model: str, backend: str, info: dict | None = None, registry=None):
        s = series(registry)
        self.base = {"model": model, "adapter": "", "backend": backend}
        for name in ("ttft", "itl", "e2e", "queue", "prompt_tokens", "generation_tokens", "requests", "running",
                     "waiting"):
            setattr(self, name, getattr(s, name))
        info = {k: str(v) for k, v in (info or {}).items()}
        self.info, names = s.info_gauge(tuple(LABELS) + tuple(sorted(info)))
        self._info_labels = {n: {**self.base, **info}.get(n, "") for n in names}
        self.info.labels(**self._info_labels).set(1)
        self.running.labels(**self.base).set(0)
        self.waiting.labels(**self.base).set(0)

    def retire(self) -> None:
        """The model was swapped out: its info line reads 0 and its load gauges are zero."""
        self.info.labels(**self._info_labels).set(0)
        self.load(0, 0)

    def _l(self, req) -> dict:
        return {**self.base, **(req.labels or {})}

    # called by the engine thread
    def queue_time(self, req) -> None:
        l = self._l(req)
        self.queue.labels(**l).observe(req.started - req.arrival)
        self.prompt_tokens.labels(**l).inc(len(req.prompt_ids))

    def token(self, req, now: float) -> None:
        l = self._l(req)
        if req.first_token is None:
            self.ttft.labels(**l).observe(now - req.arrival)
        else:
            self.itl.labels(**l).observe(now - req.last_token)

    def finished(self, req, error: str | None) -> None:
        l = self._l(req)
        self.generation_tokens.labels(**l).inc(len(req.generated))
        status = "error" if error else ("cancelled" if req.finish == "abort" else "success")
        self.requests.labels(**l, status=status, finish_reason=req.finish or "none").inc()
        if status == "success":
            self.e2e.labels(**l).observe(time.perf_counter() - req.arrival)

    def load(self, running: int, waiting: int) -> None:
        self.running.labels(**self.base).set(running)
        self.waiting.labels(**self.base).set(waiting)

    # called by the API for requests that never reach the engine
    def rejected(self, status: str, adapter: str = "") -> None:
        self.requests.labels(**{**self.base, "adapter": adapter}, status=status, finish_reason="none").inc()
