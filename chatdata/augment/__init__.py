"""Augmentation of the training split (`data.augment:`, `llmstack augment`): operations make new rows from the
original rows, the quality filter keeps the good ones, and each new row carries its lineage (parent row, operation).

    new rows = filter(op(originals) for op in operations)

The operations are in text.py (noise, casing, slots), generate.py (paraphrase by a language model) and
counterfactual.py (term-group swaps, for bias mitigation); the filter is quality.py; the report is report.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.log import log

from ..files import Example
from .config import AugmentCfg, AugmentOp
from .quality import Filter
from .rows import template


@dataclass
class Augmented:
    rows: list[Example]                       # the new rows that passed the filter
    report: dict = field(default_factory=dict)


def _label_fields(cfg: AugmentCfg, rows: list[Example]) -> list[str]:
    if cfg.filter.label_fields:
        return cfg.filter.label_fields
    from ..eda import label_fields
    return sorted(label_fields({"train": rows}))


def _make(op: AugmentOp, i: int, rows: list[Example], shared, base_model: str, where: str) -> tuple[list, int]:
    """The candidate rows of one operation and how many rows it could not apply to."""
    from . import text
    if op.op == "paraphrase":
        from .generate import generator, paraphrases
        at = f"{where}.operations.{i}"
        answer = generator(op.answer_model, base_model, f"{at}.answer_model", greedy=True) if op.answer_model else None
        return paraphrases(op, rows, shared, generator(op.generator, base_model, f"{at}.generator"), answer), 0
    if op.op == "counterfactual":
        from ..terms import load_terms
        from .counterfactual import TermIndex, build
        return text.per_row(op, rows, shared, build, TermIndex(load_terms(op.terms)))
    context = text.slot_values(op, rows, shared) if op.op == "slots" else \
        text.synonym_groups(op) if op.op == "synonyms" else None
    return text.per_row(op, rows, shared, text.BUILDERS[op.op], context)


def augment(rows: list[Example], cfg: AugmentCfg, *, near_threshold: float, base_model: str = "",
            where: str = "data.augment") -> Augmented:
    """New rows from `rows` (the training split, each distinct row once) by each operation in turn, filtered;
    `base_model` is what a generator's `model: base` means; `where` names the config section in errors."""
    if not cfg.operations or not rows:
        return Augmented([])
    rows = list({ex.source: ex for ex in rows}.values())  # a row mixed in more than once is augmented once
    shared = template(rows)
    label_generate = None
    if cfg.filter.label_check is not None:
        from .generate import generator
        label_generate = generator(cfg.filter.label_check, base_model, f"{where}.filter.label_check", greedy=True)
    keep = Filter(cfg.filter, rows, shared, cfg.filter.near_dup_threshold or near_threshold, _label_fields(cfg, rows),
                  label_generate)
    out, per_op = [], []
    for i, op in enumerate(cfg.operations):
        made, not_applicable = _make(op, i, rows, shared, base_model, where)
        kept = keep(made)
        per_op.append({"operation": op.op, "rate": op.rate, "seed": op.seed, "made": len(made), "kept": len(kept),
                       "not_applicable": not_applicable})
        log.info(f"augment {op.op}: {len(made)} new rows, {len(kept)} kept")
        out += kept
    return Augmented(out, {"rows_original": len(rows), "operations": per_op, "dropped": keep.drops,
                           "label_fields": keep.label_fields if label_generate else []})
