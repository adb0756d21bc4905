"""The augmentation's part of the data report (counts per operation, drops per reason, examples) and of the
manifest (each new row with its parent and operation)."""
from __future__ import annotations

from collections import Counter

from ..files import Example
from .quality import REASONS
from .rows import free_text

EXAMPLES_PER_OP = 2


def summary(report: dict, kept: list[Example], originals: list[Example], shared) -> dict:
    """`report` (augment()'s) completed with the rows kept after the length filter, drops per operation and reason,
    examples and the lineage of every new row."""
    by_source = {ex.source: ex for ex in originals}
    kept_by_op = Counter(ex.operation.split(":")[0] for ex in kept)
    drops = Counter((d["operation"].split(":")[0], d["reason"]) for d in report["dropped"])
    for op in report["operations"]:
        op["kept"] = kept_by_op.get(op["operation"], 0)
        op["dropped"] = {r: drops[(op["operation"], r)] for r in REASONS if drops[(op["operation"], r)]}
    examples, shown = [], Counter()
    for ex in kept:
        op = ex.operation.split(":")[0]
        if shown[op] < EXAMPLES_PER_OP:
            shown[op] += 1
            examples.append({"operation": ex.operation, "parent": ex.parent,
                             "before": free_text(by_source[ex.parent], shared), "after": free_text(ex, shared)})
    return report | {"rows_added": len(kept), "examples": examples,
                     "lineage": [{"row": ex.source, "parent": ex.parent, "operation": ex.operation} for ex in kept]}


def manifest_entry(report: dict | None) -> dict | None:
    """What the manifest records: the counts, and every new row's parent and operation."""
    if not report:
        return None
    return {"rows_original": report["rows_original"], "rows_added": report["rows_added"],
            "operations": report["operations"], "lineage": report["lineage"]}


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return (text[:limit] + "...") if len(text) > limit else text


def markdown(report: dict | None) -> list[str]:
    if not report:
        return []
    lines = ["", f"## Augmentation ({report['rows_added']} new training rows from {report['rows_original']})", "",
             "| operation | rate | seed | made | not applicable | kept | dropped (reason: rows) |", "|---|---|---|---|---|---|---|"]
    for op in report["operations"]:
        dropped = ", ".join(f"{r}: {n}" for r, n in op["dropped"].items()) or "-"
        lines.append(f"| {op['operation']} | {op['rate']:g} | {op['seed']} | {op['made']} | {op['not_applicable']} "
                     f"| {op['kept']} | {dropped} |")
    if report.get("label_fields"):
        lines.append(f"\nLabel check on: {', '.join(report['label_fields'])}.")
    for ex in report["examples"]:
        lines += ["", f"- `{ex['operation']}` from {ex['parent']}:", f"  - before: {_cell(ex['before'])}",
                  f"  - after: {_cell(ex['after'])}"]
    if report["dropped"]:
        lines += ["", f"Dropped new rows ({len(report['dropped'])}, all in the JSON report), the first 20:", ""]
        lines += [f"- {d['row']} {d['reason']}: {d['detail']}" for d in report["dropped"][:20]]
    lines.append("\nEach new row names its parent row and operation (`parent`, `operation` in the written rows; a "
                 "training artifact's data/train.jsonl and its manifest's `augmentation.lineage`).")
    return lines
