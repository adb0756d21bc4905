"""`llmstack drift demo` / `make drift-demo`: send in-distribution traffic to a running service, then each shifted
set (another language, another domain, much longer prompts), and show the drift verdicts flip (the terminal here,
the gauges on /dashboard and in Grafana)."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.errors import StackError

SETS = ("in_distribution", "language", "domain", "long")
DATA = Path(__file__).resolve().parent.parent / "data" / "drift"


def _rows(name: str, data_dir: Path) -> list[list[dict]]:
    path = data_dir / f"{name}.jsonl"
    if not path.is_file():
        raise StackError(f"no traffic set '{name}'", file=path, hint=f"one of {', '.join(SETS)}; "
                         "python data/generate_drift_sets.py writes them")
    rows = [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    # in-distribution: the test split's later rows come first (the validation rows are the reference's own)
    return rows[100:] + rows[:100] if name == "in_distribution" else rows


def run(url: str, sets: list[str], n: int | None = None, concurrency: int = 4, max_tokens: int = 64,
        api_key: str | None = None, data_dir: Path = DATA, out=print) -> list[dict]:
    import logging

    import httpx
    from tqdm import tqdm

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the verdicts
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=300, headers=headers)
    try:
        snap = client.get(base + "/drift").json()
    except httpx.HTTPError as exc:
        raise StackError(f"cannot reach the service at {base}: {exc}", field="--url",
                         hint="start it first: make serve") from None
    if not snap.get("enabled"):
        raise StackError(f"drift monitoring is off in the service: {snap.get('reason')}", field="--url")
    model = client.get(base + "/v1/models").json()["data"][0]["id"]
    size = n or snap["window"]["size"]
    interval = float(snap["window"].get("interval_s") or 10)
    out(f"service {base}, model {model}; window {snap['window']['size']} requests, {size} per phase\n")
    results, offset = [], {}
    for name in sets:
        rows = _rows(name, data_dir)
        start = offset.get(name, 0)  # a set used twice continues where it stopped
        batch = [rows[(start + i) % len(rows)] for i in range(size)]
        offset[name] = start + size

        def send(msgs):
            r = client.post(base + "/v1/chat/completions", json={"model": model, "messages": msgs,
                                                                 "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()

        t0 = time.time()
        with ThreadPoolExecutor(concurrency) as pool:
            list(tqdm(pool.map(send, batch), total=len(batch), desc=f"{name:>15}", unit="req", leave=False))
        snap = _fresh(client, base, t0, interval)
        drifted = [e["name"] for e in snap["features"] if e.get("drift")]
        results.append({"phase": name, "dataset_drift": snap["dataset_drift"], "drift_share": snap["drift_share"],
                        "drifted": drifted, "features": snap["features"]})
        verdict = "DRIFT" if snap["dataset_drift"] else "ok   "
        out(f"{name:>15}: {verdict}  share {snap['drift_share']:.2f}  drifting: {', '.join(drifted) or '-'}")
    client.close()
    return results


def _fresh(client, base: str, since: float, interval: float) -> dict:
    """The first /drift computed after the phase's last request reached the monitor (it recomputes every
    interval_s while requests arrive)."""
    deadline = time.time() + max(30.0, interval * 4)
    while time.time() < deadline:
        snap = client.get(base + "/drift").json()
        last, at = snap.get("last_request_unix") or 0, snap.get("computed_at_unix") or 0
        if last >= since and at >= last and snap.get("features"):
            time.sleep(0.3)  # a straggler of this phase may still be in the monitor's queue
            again = client.get(base + "/drift").json()
            if (again.get("last_request_unix") or 0) <= at:
                return again
        time.sleep(min(1.0, interval / 4))
    raise StackError("the service did not recompute drift in time", hint="check monitoring.drift.interval_s")
