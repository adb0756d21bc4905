"""Live drift in the service, off the request path.

The API hands each finished request to `Monitor.observe` (a non-blocking queue put). One worker thread computes the
request's features, keeps the last `window` rows, writes the request log, and every `interval_s` compares the
window with the reference (monitoring/drift.py). Results go to Prometheus gauges (llm_drift_score{feature,method},
llm_drift_detected{feature}, llm_dataset_drift, llm_drift_window_rows) and to `snapshot()` (the /drift JSON).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from . import drift
from .requestlog import RequestLog

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, cfg, reference: drift.Reference | None, reference_path: str | Path | None = None,
                 registry=None, reason: str = ""):
        """cfg: monitoring.config.MonitoringCfg. reference None: drift off (reason says why); the log may still run."""
        from prometheus_client import REGISTRY, Counter, Gauge

        self.cfg, self.ref, self.ref_path = cfg, reference, str(reference_path) if reference_path else None
        self.reason = reason
        d = cfg.drift
        self.window: collections.deque[dict] = collections.deque(maxlen=d.window)
        self.q: queue.Queue = queue.Queue(maxsize=d.queue_size)
        self.log = (RequestLog(cfg.request_log.path, cfg.request_log.max_mb, cfg.request_log.keep,
                               cfg.request_log.redact) if cfg.request_log.enabled else None)
        kw = {"registry": registry if registry is not None else REGISTRY}
        self.g_score = Gauge("llm_drift_score", "Drift test result per feature: a p-value (ks, chisquare, z; drift "
                             "below 0.05) or a distance (wasserstein, jensenshannon, psi; drift from 0.1)",
                             ("feature", "method"), multiprocess_mode="livemostrecent", **kw)
        self.g_detected = Gauge("llm_drift_detected", "1 when the feature drifted in the last computation",
                                ("feature",), multiprocess_mode="livemostrecent", **kw)
        self.g_dataset = Gauge("llm_dataset_drift", "1 when at least share_threshold of the features drifted",
                               multiprocess_mode="livemostrecent", **kw)
        self.g_rows = Gauge("llm_drift_window_rows", "Requests in the live drift window",
                            multiprocess_mode="livemostrecent", **kw)
        self.c_dropped = Counter("llm_monitor_dropped", "Finished requests the monitor could not take (queue full)",
                                 **kw)
        self.g_rows.set(0)
        self.result: dict | None = None
        self.computed_at: float | None = None
        self.last_row: float | None = None
        self.dropped = 0
        self._new = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.ref is not None

    # ------------------------------------------------------------ called on the request path: O(1), never blocks
    def observe(self, record: dict) -> None:
        try:
            self.q.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self.c_dropped.inc()
            if self.dropped in (1, 100, 10000):
                log.warning(f"drift monitor queue full: {self.dropped} finished requests not monitored so far")

    # ------------------------------------------------------------ the worker
    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                batch = [self.q.get(timeout=0.2)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < 256:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._ingest(batch)
                if self._new and time.monotonic() - last >= self.cfg.drift.interval_s:
                    self.compute()
                    last = time.monotonic()
            except Exception:  # noqa: BLE001 - monitoring must never take the service down
                log.exception("drift monitor step failed")
            finally:
                for _ in batch:
                    self.q.task_done()

    def _ingest(self, batch: list[dict]) -> None:
        rows = []
        for rec in batch:
            feats = drift.output_features(rec.get("completion_tokens", 0), rec.get("logprob_sum"), rec.get("finish"))
            if self.ref is not None:
                feats |= drift.prompt_features(rec.get("text", ""), rec.get("prompt_ids") or [], self.ref.basis)
            rec["features"] = feats
            if rec.get("status", "success") == "success":
                with self._lock:
                    self.window.append(feats)
                self._new += 1
            rows.append(rec)
        self.g_rows.set(len(self.window))
        if batch:
            self.last_row = time.time()
        if self.log is not None and rows:
            self.log.write([{"id": r["id"], "ts": r.get("ts", time.time()), "endpoint": r.get("endpoint"),
                             "model": r.get("model"), "adapter": r.get("adapter") or "", "backend": r.get("backend"),
                             "prompt": r.get("prompt"), "output": r.get("output"),
                             "prompt_tokens": len(r.get("prompt_ids") or []),
                             "completion_tokens": r.get("completion_tokens"), "finish_reason": r.get("finish"),
                             "status": r.get("status"), "ttft_s": r.get("ttft_s"), "e2e_s": r.get("e2e_s"),
                             "features": r["features"]} for r in rows])

    def compute(self) -> dict | None:
        """Compare the window with the reference now (the worker does this every interval_s)."""
        if self.ref is None:
            return None
        with self._lock:
            rows = list(self.window)
        self._new = 0
        d = self.cfg.drift
        if len(rows) < d.min_rows:
            return None
        res = drift.compare(self.ref, rows, d.method, d.share, d.min_rows)
        for e in res["features"]:
            if e["drift"] is None:
                continue
            self.g_score.labels(feature=e["name"], method=e["method"]).set(e["score"])
            self.g_detected.labels(feature=e["name"]).set(int(e["drift"]))
        self.g_dataset.set(int(res["dataset_drift"]))
        self.result, self.computed_at = res, time.time()
        if self.last_row and self.computed_at < self.last_row:  # same clock tick: keep "computed after" true
            self.computed_at = self.last_row
        return res

    def flush(self, timeout: float = 30) -> None:
        """Wait until every observed request is ingested (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def snapshot(self) -> dict:
        d = self.cfg.drift
        out = {"enabled": self.enabled, "reason": self.reason or None,
               "reference": {"path": self.ref_path, "rows": (self.ref.meta.get("rows") if self.ref else None)},
               "window": {"size": d.window, "rows": len(self.window), "min_rows": d.min_rows,
                          "interval_s": d.interval_s},
               "computed_at": (datetime.fromtimestamp(self.computed_at, timezone.utc).isoformat(timespec="seconds")
                               if self.computed_at else None),
               "computed_at_unix": self.computed_at, "last_request_unix": self.last_row,
               "dropped": self.dropped,
               "request_log": str(self.log.path) if self.log else None}
        res = self.result or {"features": [], "drift_share": None, "share_threshold": d.share,
                              "dataset_drift": None}
        return out | res

    def rebase(self, served_folder: str | Path) -> None:
        """A new model is served (a swap): compare with its reference from now on, starting from an empty window.
        The request log goes on (one log across models: each row names its model)."""
        ref, path, reason = reference_for(self.cfg, served_folder)
        with self._lock:
            self.ref, self.ref_path, self.reason = ref, str(path) if path else None, reason
            self.window.clear()
            self.result, self.computed_at, self._new = None, None, 0
        self.g_rows.set(0)
        if ref is None:  # the last verdicts belong to the old model's reference
            self.g_dataset.set(0)

    def close(self) -> None:
        self.flush(5)
        self._stop.set()
        self._thread.join(5)
        if self.log is not None:
            self.log.close()


def reference_for(cfg, served_folder: str | Path) -> tuple[drift.Reference | None, Path | None, str]:
    """The drift reference for a served model: cfg.drift.reference, else the one found next to the model; or None
    and the reason in words."""
    if not cfg.drift.enabled:
        return None, None, "monitoring.drift.enabled is false"
    found = Path(cfg.drift.reference) if cfg.drift.reference else drift.find_reference(served_folder)
    if found is None:
        reason = (f"no {drift.FILE} next to {served_folder} or its parent artifacts (train with drift.enabled, "
                  "or set monitoring.drift.reference)")
        log.warning(f"drift monitoring off: {reason}")
        return None, None, reason
    return drift.Reference.load(found), found, ""


def build(cfg, served_folder: str | Path, registry=None) -> Monitor:
    """The service's monitor: the reference from cfg.drift.reference, else found next to the served model."""
    ref, path, reason = reference_for(cfg, served_folder)
    return Monitor(cfg, ref, path, registry=registry, reason=reason)
