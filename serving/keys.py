"""Named API keys: who called what, within which limits.

The keys file (`auth.keys_file`, YAML) maps a name to the SHA-256 of its key and optional limits; the key itself is
never stored, logged or exported (`llmstack keys add` prints it once):

    keys:
      team-a: {sha256: 9f86d0..., requests_per_min: 60, tokens_per_min: 20000}
      batch-jobs: {sha256: 60303a...}

The file is re-read when it changes (checked at most once a second, on requests), so a revoked key is refused from
the next request on; a file that no longer parses keeps the last good keys and logs the error. The single key of
`auth.api_key_env` (if set) is the key named `default`.

Limits are sliding 60-second windows per key: requests counted when they arrive, tokens (prompt + completion) when
they finish; over either, the request is answered 429 with Retry-After (seconds until enough of the window has
passed). Every request through a key is counted in /metrics by key name (`llm_key_requests`, `llm_key_tokens`,
`llm_key_rate_limited`) and written as one audit line: time, key name, route, status, tokens, duration (no prompt
text: that is the request log's, when it is on)."""
from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from core.config import read_yaml
from core.errors import ConfigError

log = logging.getLogger("llmstack.audit")
WINDOW_S = 60.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    name: str
    sha256: str
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    admin: bool = False  # may call /admin/* (model swaps); the single default key always may


def read_keys(path: str | Path) -> dict[str, Key]:
    """{sha256: Key} from a keys file; ConfigError naming the file, line and field of the first problem."""
    data, lines = read_yaml(path)  # a missing file or bad YAML: ConfigError with the line
    keys = data.get("keys")
    if not isinstance(keys, dict):
        raise ConfigError("needs a top-level `keys:` mapping of name -> {sha256, requests_per_min, tokens_per_min}",
                          file=path, line=1, field="keys")
    out: dict[str, Key] = {}
    for name, spec in keys.items():
        where = dict(file=path, line=lines.get(("keys", name)), field=f"keys.{name}")
        spec = spec if isinstance(spec, dict) else {}
        sha = str(spec.get("sha256", ""))
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ConfigError("needs `sha256:` the 64 hex digits of the key's SHA-256 (llmstack keys add makes one)",
                              **where)
        limits = {k: spec.get(k) for k in ("requests_per_min", "tokens_per_min")}
        for k, v in limits.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"{k} must be a whole number >= 1 (or left out: no limit)", **where)
        admin = spec.get("admin", False)
        if not isinstance(admin, bool):
            raise ConfigError("admin must be true or false", **where)
        unknown = set(spec) - {"sha256", "requests_per_min", "tokens_per_min", "admin"}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}", **where)
        out[sha] = Key(str(name), sha, **limits, admin=admin)
    return out


class KeyRing:
    """The keys a request may present: the file's (reloaded on change) and the single `default` key."""

    def __init__(self, path: str | None = None, single_key: str | None = None):
        self.path, self.single = path, single_key
        self.keys: dict[str, Key] = read_keys(path) if path else {}
        self._stamp, self._checked = self._file_stamp(), time.monotonic()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.path or self.single)

    def _file_stamp(self):
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self.path or now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self.keys = read_keys(self.path)
                log.info(f"keys file reloaded: {len(self.keys)} keys")
            except ConfigError as exc:
                log.error(f"keys file not reloaded, the previous keys stay: {exc}")

    def lookup(self, presented: str) -> Key | None:
        self._maybe_reload()
        if self.single is not None and hmac.compare_digest(presented.encode(), self.single.encode()):
            return Key("default", digest(self.single), admin=True)
        return self.keys.get(digest(presented))


class Limiter:
    """Sliding 60-second windows of requests and tokens per key name."""

    def __init__(self):
        self.requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def admit(self, key: Key, now: float | None = None) -> tuple[str, int] | None:
        """None when the request may go; else (the limit hit, seconds to wait). An admitted request counts."""
        now = time.monotonic() if now is None else now
        with self._lock:
            reqs, toks = self._trim(self.requests[key.name], now), self._trim(self.tokens[key.name], now)
            if key.requests_per_min and len(reqs) >= key.requests_per_min:
                return "requests_per_min", _wait(reqs[0][0], now)
            if key.tokens_per_min and sum(n for _, n in toks) >= key.tokens_per_min:
                return "tokens_per_min", _wait(toks[0][0], now)
            reqs.append((now, 1))
            return None

    def spend(self, name: str, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            with self._lock:
                self.tokens[name].append((time.monotonic() if now is None else now, tokens))

    @staticmethod
    def _trim(window: collections.deque, now: float) -> collections.deque:
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()
        return window


def _wait(oldest: float, now: float) -> int:
    return max(1, int(oldest + WINDOW_S - now + 0.999))


class KeyMetrics:
    """Per-key counters (label key_name; never the key). Built lazily, in the serving process (see metrics.py)."""

    def __init__(self, registry=None):
        from prometheus_client import REGISTRY, Counter

        kw = {"registry": registry if registry is not None else REGISTRY}
        self.requests = Counter("llm_key_requests", "Requests by API key name, route and HTTP status",
                                ("key_name", "route", "status"), **kw)
        self.tokens = Counter("llm_key_tokens", "Tokens by API key name: prompt and completion",
                              ("key_name", "kind"), **kw)
        self.limited = Counter("llm_key_rate_limited", "Requests refused with 429 by a key's limit",
                               ("key_name", "limit"), **kw)


_METRICS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def key_metrics(registry=None) -> KeyMetrics:
    """The per-key counters of `registry` (default: prometheus-client's), made once per registry."""
    from .metrics import per_registry
    return per_registry(_METRICS, KeyMetrics, registry)


class Audit:
    """One JSON line per request through a key: to `path` (appended) or, without one, to the llmstack.audit log."""

    def __init__(self, path: str | None = None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if self.path is None:
            log.info(line)
            return
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# ---------------------------------------------------------------- the keys file, edited (llmstack keys)
def _load_raw(path: Path) -> dict:
    if not path.exists():
        return {"keys": {}}
    read_keys(path)  # refuse to edit a file that does not validate
    data, _ = read_yaml(path)
    return data


def _save(path: Path, data: dict) -> None:
    import yaml

    from core import artifacts
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(path, "# API keys for `llmstack serve` (auth.keys_file): name -> SHA-256 of the key and its "
                         "limits.\n# Edited by `llmstack keys`; the keys themselves are never stored.\n" +
                         yaml.safe_dump(data, sort_keys=False))


def add_key(path: str | Path, name: str, requests_per_min: int | None = None,
            tokens_per_min: int | None = None, admin: bool = False) -> str:
    """A new random key named `name`, its hash and limits written to the keys file; returns the key (shown once)."""
    import secrets

    path = Path(path)
    data = _load_raw(path)
    if name in data["keys"]:
        raise ConfigError(f"a key named '{name}' exists already", file=path, field=f"keys.{name}",
                          hint="revoke it first, or choose another name")
    key = "sk-" + secrets.token_urlsafe(32)
    entry = {"sha256": digest(key)}
    entry.update({k: v for k, v in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min),
                                    ("admin", admin)) if v})
    data["keys"][name] = entry
    _save(path, data)
    return key


def revoke_key(path: str | Path, name: str) -> None:
    path = Path(path)
    data = _load_raw(path)
    if name not in data["keys"]:
        raise ConfigError(f"no key named '{name}' (the file has: {', '.join(data['keys']) or 'none'})", file=path,
                          field=f"keys.{name}")
    del data["keys"][name]
    _save(path, data)
