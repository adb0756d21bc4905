"""The traffic a retrain learns from: reviewed rows, or drifted / all logged requests; then the seeded split into
rows to train on and rows to score the drifted traffic on."""
from __future__ import annotations

import json
import random
from pathlib import Path

from core.errors import DataError

REVIEWED = ("accepted", "corrected")
REVIEW_VALUES = REVIEWED + ("rejected", "pending")


def read_review(path: str | Path) -> tuple[list[dict], dict]:
    """The accepted and corrected rows of a review file, and counts per review value; DataError naming the line and
    field of every malformed row."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no review file here", file=path, field="traffic.review",
                        hint="export the log with `llmstack log export --out FILE`, review it, then point "
                        "traffic.review at it")
    rows, counts, errors = [], {v: 0 for v in REVIEW_VALUES}, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {n}: not JSON ({exc.msg})")
            continue
        problem = _review_problem(row)
        if problem:
            errors.append(f"line {n}: {problem}")
            continue
        counts[row["review"]] += 1
        if row["review"] in REVIEWED:
            rows.append({"messages": row["messages"], "meta": row.get("meta") or {}, "review": row["review"]})
    if errors:
        raise DataError(f"{len(errors)} malformed rows: " + "; ".join(errors[:5]), file=path, field="traffic.review")
    return rows, counts


def _review_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    if row.get("review") not in REVIEW_VALUES:
        return f"field 'review' must be one of {', '.join(REVIEW_VALUES)} (got {row.get('review')!r})"
    msgs = row.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
        return "field 'messages' must hold the prompt's messages and the assistant answer"
    if row["review"] not in REVIEWED:  # not trained on: its answer may be anything
        return None
    last = msgs[-1]
    if last.get("role") != "assistant" or not str(last.get("content") or "").strip():
        return "field 'messages': the last message must be the assistant answer (non-empty)"
    return None


def from_log(log_path: str | Path, out: Path, drifted_only: bool, reference, since_hours: float | None) -> list[dict]:
    """Logged requests (rotated files included, oldest first) as chat rows with the served model's answers."""
    import time

    from monitoring import requestlog

    log_path = Path(log_path)
    files = sorted(log_path.parent.glob(f"{log_path.stem}.*{log_path.suffix}"), reverse=True) + [log_path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError("no request log here", file=log_path, field="traffic.request_log",
                        hint="turn it on with monitoring.request_log.enabled=true in the serve config and send traffic")
    since = time.time() - since_hours * 3600 if since_hours else None
    rows = []
    for i, f in enumerate(files):
        part = out.with_name(f"{out.stem}.{i}{out.suffix}")
        requestlog.export(f, part, since=since, drifted_only=drifted_only, reference=reference)
        rows += [json.loads(x) for x in part.read_text(encoding="utf-8").splitlines() if x.strip()]
        part.unlink()
    return rows


def split(rows: list[dict], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded shuffle, `holdout` of the rows kept out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = round(len(rows) * holdout)
    held = sorted(order[:k])
    keep = sorted(order[k:])
    return [rows[i] for i in keep], [rows[i] for i in held]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
