"""Monitoring's settings, beside the code they drive: the drift reference a training run stores (`drift:` of a
training config; drift.py builds it), and live drift and the request log of the service (`monitoring:` of a serve
config; live.py and requestlog.py run them)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from core.config import Section


class DriftRefCfg(Section):
    enabled: bool = True
    """Store a drift reference profile in the artifact (drift_reference.json), which serving compares live traffic
    with: the vocabulary and embedding centroid of the training prompts; prompt length, novel-token rate and
    embedding distance of the validation prompts; output length, confidence (mean token log-probability) and finish
    reason of the model's answers."""
    max_prompts: int = Field(1000, ge=1)
    """Training prompts the vocabulary and the embedding centroid are fitted on."""
    outputs_from: Literal["eval", "validation"] = "eval"
    """Where the reference answers come from: eval reuses the after-training evaluation's greedy generations (test
    split, no extra cost); validation generates on the validation split (one more generation pass)."""
    max_outputs: int = Field(200, ge=0)
    """Answers profiled (validation: the first N validation rows)."""


class DriftCfg(Section):
    enabled: bool = True
    """Live drift against the reference profile the training run stored (drift_reference.json, carried through
    compression); off with a logged reason when the served model has none."""
    reference: Optional[str] = None
    """A drift_reference.json (or its folder) to use instead of the one found next to the served model."""
    window: int = Field(200, ge=10)
    """Rolling window: the last N successful requests are compared with the reference."""
    min_rows: int = Field(30, ge=5)
    """No verdict until the window holds this many requests."""
    interval_s: float = Field(10.0, gt=0)
    """How often the worker recomputes (only when new requests arrived)."""
    method: Literal["auto", "psi"] = "auto"
    """auto: Evidently's defaults (reference <= 1000 rows: KS / chi-squared / Z-test at p < 0.05; larger: normed
    Wasserstein / Jensen-Shannon >= 0.1); psi: Population Stability Index >= 0.1 for numeric features."""
    share: float = Field(0.5, gt=0, le=1)
    """Dataset drift when at least this share of the features drift."""
    queue_size: int = Field(10000, ge=100)
    """Finished requests waiting for the monitor thread; beyond it they are counted (llm_monitor_dropped_total)
    and not monitored, never blocking a request."""


class RequestLogCfg(Section):
    enabled: bool = False
    """Opt-in: store every finished request (prompt, output, timings, model, adapter, drift features) in SQLite."""
    path: str = "artifacts/serve/requests.sqlite"
    """The SQLite file (rotated files get .1, .2, ... before the suffix)."""
    max_mb: float = Field(64, gt=0)
    """Rotate when the file grows past this size."""
    keep: int = Field(3, ge=0)
    """Rotated files kept (the oldest is deleted)."""
    redact: str = "builtin"
    """PII redaction before writing: builtin (e-mails, card numbers, phone numbers, IPs), none, or
    module:function (your str -> str function on the Python path)."""


class MonitoringCfg(Section):
    drift: DriftCfg = DriftCfg()
    """Live drift detection (/drift, llm_drift_* metrics)."""
    request_log: RequestLogCfg = RequestLogCfg()
    """The request log (`llmstack log export`, `llmstack drift report`)."""
