"""Reweighing (Kamiran & Calders, 2012): per-example loss weights that make the protected group and the label
statistically independent in the training split.

    w(g, y) = P(g) * P(y) / P(g, y) = n_g * n_y / (N * n_gy)

The group of a row is the term group most of its terms belong to (`data.reweigh.terms`, the fairness check's format;
`none` for a row that mentions no term); the label is a field of its JSON answer. A (group, label) cell rarer than
independence predicts gets a weight above 1, a more frequent one below. The weights reach the trainer's loss
(modeling/collate.py: each answer token's cross-entropy times its row's weight)."""
from __future__ import annotations

from collections import Counter

from core.errors import ConfigError

from .augment.counterfactual import TermIndex, group_of
from .augment.quality import json_object
from .augment.rows import free_text, template
from .files import Example

NONE = "none"


def _label(ex: Example, field: str) -> str | None:
    if ex.messages is None:
        return None
    value = (json_object(ex.reference()) or {}).get(field)
    return None if value is None else str(value)


def reweigh(rows: list[Example], cfg) -> dict:
    """Set each row's `weight` (rows without the label field keep 1.0) and return the report: per (group, label) the
    count, the count independence predicts and the weight."""
    from .terms import load_terms

    index = TermIndex({n: a for n, a in load_terms(cfg.terms).items() if not cfg.attributes or n in cfg.attributes})
    shared = template(rows)
    cells = []
    for ex in rows:
        found = group_of(index.find(free_text(ex, shared)))
        cells.append((found[1] if found else NONE, _label(ex, cfg.label_field)))
    labelled = [(g, y) for g, y in cells if y is not None]
    if not labelled:
        raise ConfigError(f"no training row has the answer field {cfg.label_field!r}", field="data.reweigh.label_field",
                          hint="name a field of the JSON answers, e.g. urgency")
    n, n_g, n_y, n_gy = len(labelled), Counter(g for g, _ in labelled), Counter(y for _, y in labelled), \
        Counter(labelled)
    weight = {c: min(n_g[c[0]] * n_y[c[1]] / (n * k), cfg.max_weight) for c, k in n_gy.items()}
    for ex, cell in zip(rows, cells):  # a row mixed in twice is one object: assigned, not multiplied
        ex.weight = weight[cell] if cell[1] is not None else 1.0
    table = [{"group": g, "label": y, "rows": n_gy[(g, y)], "expected": round(n_g[g] * n_y[y] / n, 2),
              "weight": round(weight[(g, y)], 4)} for g, y in sorted(n_gy)]
    return {"label_field": cfg.label_field, "terms": cfg.terms, "rows": n, "unlabelled": len(cells) - n,
            "groups": dict(n_g), "cells": table}


def markdown(report: dict | None) -> list[str]:
    if not report:
        return []
    lines = ["", f"## Reweighing (Kamiran & Calders; groups from {report['terms']}, label `{report['label_field']}`)",
             "", "| group | label | rows | expected if independent | loss weight |", "|---|---|---|---|---|"]
    lines += [f"| {c['group']} | {c['label']} | {c['rows']} | {c['expected']:g} | {c['weight']:.3f} |"
              for c in report["cells"]]
    if report["unlabelled"]:
        lines.append(f"\n{report['unlabelled']} rows have no `{report['label_field']}` and keep weight 1.")
    return lines
