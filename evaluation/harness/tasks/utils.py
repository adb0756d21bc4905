"""Helpers for the shipped lm-evaluation-harness tasks (YAMLs beside this file), all offline.

The tasks read the demo's held-out split, data/tickets/test.jsonl (alpaca rows whose output is a JSON object), or any
JSONL of the same shape named by the `data_file` metadata (`llmstack harness --data FILE`). The multiple-choice tasks
are generated from the same rows: the gold field of each answer is the right choice, the field's other values are
the distractors.
"""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "data" / "tickets" / "test.jsonl"
FIELDS = ("category", "product", "urgency")
CATEGORIES = ["billing", "technical", "account", "shipping", "returns", "feature_request"]
URGENCIES = ["low", "medium", "high", "critical"]


def _rows(data_file=None) -> list[dict]:
    path = Path(data_file or DEFAULT_DATA)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: harness task data not found (pass --data FILE, a JSONL of "
                                "instruction/input/output rows)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("instruction", "output") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: row lacks {', '.join(missing)} (expected instruction/input/output rows)")
        inp = str(row.get("input") or "")
        prompt = f"{row['instruction']}\n\n{inp}" if inp.strip() else row["instruction"]  # as training renders it
        rows.append({"prompt": prompt, "ticket": str(row.get("input") or row["instruction"]),
                     "output": row["output"], "line": n})
    return rows


def tickets_test(data_file=None, **_):
    """The triage task's dataset: one `test` split (custom_dataset hook; other metadata keys are ignored)."""
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(data_file))})


def _choice_set(values: list[str]):
    def make(data_file=None, field: str = "", **_):
        import datasets
        docs = []
        for r in _rows(data_file):
            try:
                gold = str(json.loads(r["output"]).get(field, "")).strip().lower()
            except (json.JSONDecodeError, AttributeError):
                continue
            if gold in values:
                docs.append({"ticket": r["ticket"], "choices": values, "gold": values.index(gold), "line": r["line"]})
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    return make


_category = _choice_set(CATEGORIES)
_urgency = _choice_set(URGENCIES)


def category_choices(data_file=None, **kw):
    return _category(data_file, field="category")


def urgency_choices(data_file=None, **kw):
    return _urgency(data_file, field="urgency")


def _norm(v) -> str:
    return str(v).strip().lower() if v is not None else ""


def triage_results(doc: dict, results: list[str]) -> dict:
    """Per-row scores of a generated triage answer: JSON valid, each field right, all fields right (exact match);
    the same definitions as `llmstack eval` (evaluation.metrics.json_metrics)."""
    from evaluation.metrics import parse_json

    pred = parse_json(results[0]) if results else None
    ref = parse_json(doc["output"]) or {}
    ok = {f: float(pred is not None and f in pred and _norm(pred.get(f)) == _norm(ref.get(f))) for f in FIELDS}
    return {"json_valid": float(pred is not None), "exact_match": float(all(ok.values())),
            **{f"acc_{f}": v for f, v in ok.items()}}
