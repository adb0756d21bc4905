"""The opt-in request log: one SQLite row per finished request (prompt, output, timings, model, adapter, drift
features), PII redacted before it is written, a size cap with rotation (requests.sqlite -> requests.1.sqlite ...).

Export turns it into a dataset the training pipeline accepts (chat `messages` JSONL), so drifted traffic can be
reviewed, corrected and fed into the next fine-tune.
"""
from __future__ import annotations

import importlib
import json
import sqlite3
from pathlib import Path
from typing import Callable

from chatdata import pii
from core.errors import ConfigError, DataError

SCHEMA = """CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, ts REAL NOT NULL, endpoint TEXT, model TEXT, adapter TEXT, backend TEXT,
    prompt TEXT, output TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason TEXT, status TEXT,
    ttft_s REAL, e2e_s REAL, features TEXT)"""
COLUMNS = ("id", "ts", "endpoint", "model", "adapter", "backend", "prompt", "output", "prompt_tokens",
           "completion_tokens", "finish_reason", "status", "ttft_s", "e2e_s", "features")

# Built-in redaction: e-mail addresses, card-like digit runs, phone numbers, IPv4 addresses (chatdata/pii.py: the same
# patterns the data report looks for in training data).
redact_builtin = pii.redact


def redactor(spec: str) -> Callable[[str], str]:
    """'builtin', 'none', or 'module:function' (a str -> str function on the import path)."""
    if spec == "builtin":
        return redact_builtin
    if spec == "none":
        return lambda s: s
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ConfigError(f"redact must be builtin, none or module:function, got {spec!r}",
                          field="monitoring.request_log.redact")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import the redaction hook {spec!r}: {exc}",
                          field="monitoring.request_log.redact") from None
    if not callable(f):
        raise ConfigError(f"{spec!r} is not callable", field="monitoring.request_log.redact")
    return f


class RequestLog:
    """Writes are batched by the caller (the monitor's worker thread); one connection, one thread."""

    def __init__(self, path: str | Path, max_mb: float = 64, keep: int = 3, redact: str = "builtin"):
        self.path, self.max_bytes, self.keep = Path(path), int(max_mb * (1 << 20)), keep
        self.redact = redactor(redact)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open()
        self.rotations = 0

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute(SCHEMA)
        db.commit()
        return db

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        vals = []
        for r in rows:
            r = dict(r, prompt=self.redact(r.get("prompt") or ""), output=self.redact(r.get("output") or ""),
                     features=json.dumps(r.get("features") or {}))
            vals.append(tuple(r.get(c) for c in COLUMNS))
        self.db.executemany(f"INSERT OR REPLACE INTO requests VALUES ({','.join('?' * len(COLUMNS))})", vals)
        self.db.commit()
        if self.path.stat().st_size > self.max_bytes:
            self.rotate()

    def rotate(self) -> None:
        """requests.sqlite -> requests.1.sqlite -> ... -> requests.<keep>.sqlite (the oldest dropped)."""
        self.db.close()
        for i in range(self.keep, 0, -1):
            src = self._numbered(i - 1) if i > 1 else self.path
            if src.exists():
                if i == self.keep and self._numbered(i).exists():
                    self._numbered(i).unlink()
                src.rename(self._numbered(i))
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        self.db = self._open()
        self.rotations += 1

    def _numbered(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.{i}{self.path.suffix}")

    def close(self) -> None:
        self.db.close()


def read(path: str | Path, since: float | None = None, limit: int | None = None) -> list[dict]:
    """Rows of one log file (oldest first), features decoded."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no request log here", file=path,
                        hint="enable it with monitoring.request_log.enabled=true in the serve config")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        q = "SELECT * FROM requests" + (" WHERE ts >= ?" if since else "") + " ORDER BY ts"
        q += f" LIMIT {int(limit)}" if limit else ""
        cur = db.execute(q, (since,) if since else ())
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    except sqlite3.DatabaseError as exc:
        raise DataError(f"not a request log: {exc}", file=path) from None
    finally:
        db.close()
    for r in rows:
        r["features"] = json.loads(r["features"] or "{}")
    return rows


def export(path: str | Path, out: str | Path, since: float | None = None, drifted_only: bool = False,
           reference=None) -> int:
    """Finished requests as a training dataset (chat `messages` JSONL: the prompt's messages plus the model's
    answer as the assistant turn, to review and correct before training; `review: pending` for the reviewer to set
    to accepted, corrected or rejected: `llmstack retrain` with traffic.select=review trains on the first two). drifted_only keeps rows whose prompt
    features lie outside the reference's central 95% for at least one numeric prompt feature."""
    rows = [r for r in read(path, since) if r["status"] == "success" and r["output"]]
    if drifted_only:
        if reference is None:
            raise ConfigError("drifted_only needs the drift reference", field="reference")
        rows = [r for r in rows if _outside(r["features"], reference)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            prompt = json.loads(r["prompt"]) if r["endpoint"] == "chat" else [{"role": "user", "content": r["prompt"]}]
            msgs = prompt + [{"role": "assistant", "content": r["output"]}]
            f.write(json.dumps({"messages": msgs, "review": "pending", "meta": {
                "request_id": r["id"], "ts": r["ts"], "model": r["model"], "finish_reason": r["finish_reason"]}},
                ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(rows)


def _outside(features: dict, reference) -> bool:
    import numpy as np
    for f in ("prompt_tokens", "prompt_novel_token_rate", "prompt_embedding_distance"):
        ref = reference.values.get(f) or []
        if f in features and len(ref) >= 20:
            lo, hi = np.percentile(ref, [2.5, 97.5])
            if not lo <= features[f] <= hi:
                return True
    return False
