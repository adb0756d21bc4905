"""The quality filter for augmented rows. Checks run cheapest first; each drop is recorded with its reason:

- unchanged: the operation produced its original's text;
- length: the new message is shorter / longer than the configured ratios of its original's;
- language: py3langid (its model ships inside the package; nothing is downloaded) names another language than it
  names for the original;
- exact_duplicate / near_duplicate: the same text as, or a near duplicate (MinHash at filter.near_dup_threshold; here
  case counts, so that a casing variant is not its original's duplicate) of, an original row or an earlier new row;
- label_changed: the label-check model, answering the new prompt, gives another value for a label field than the
  original's answer has;
- cap: the original already has filter.max_per_original new rows;
- overlong: more tokens than data.max_seq_len (the pipeline's length filter, after this one)."""
from __future__ import annotations

import json
import re
from typing import Callable

from ..files import Example
from ..similarity import minhash
from .config import AugmentFilter
from .rows import free_text

REASONS = ("unchanged", "length", "language", "exact_duplicate", "near_duplicate", "label_changed", "cap",
           "overlong")


def drop(drops: list[dict], ex: Example, reason: str, detail: str = "") -> None:
    drops.append({"row": ex.source, "parent": ex.parent, "operation": ex.operation, "reason": reason,
                  "detail": detail})


def _language(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


def json_object(text: str) -> dict | None:
    """The JSON object in a model's answer (alone, or the first {...} in it)."""
    for candidate in (text, *re.findall(r"\{.*\}", text, re.DOTALL)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


class Filter:
    def __init__(self, cfg: AugmentFilter, originals: list[Example], shared, near_threshold: float,
                 label_fields: list[str], label_generate: Callable | None):
        self.cfg, self.shared, self.drops = cfg, shared, []
        self.by_source = {ex.source: ex for ex in originals}
        self.label_fields, self.label_generate = label_fields, label_generate
        self.seen = {ex.flat_text(): ex.source for ex in originals}
        self.lsh = None
        if cfg.dedup:
            from datasketch import MinHashLSH
            self.lsh = MinHashLSH(threshold=near_threshold, num_perm=128)
            for ex in dict((e.source, e) for e in originals).values():
                self.lsh.insert(ex.source, minhash(ex.flat_text(), lower=False))
        self.per_parent: dict[str, int] = {}

    def __call__(self, new: list[Example]) -> list[Example]:
        """The new rows that pass, in order."""
        rows = [ex for ex in new if self._text_ok(ex)]
        rows = [ex for ex in rows if self._unique(ex)]
        if self.label_generate is not None and self.label_fields:
            rows = self._labels_kept(rows)
        return [ex for ex in rows if self._under_cap(ex)]

    def _text_ok(self, ex: Example) -> bool:
        parent = self.by_source[ex.parent]
        old, new = free_text(parent, self.shared), free_text(ex, self.shared)
        if new == old:
            drop(self.drops, ex, "unchanged")
            return False
        ratio = len(new) / max(len(old), 1)
        if not self.cfg.min_length_ratio <= ratio <= self.cfg.max_length_ratio:
            drop(self.drops, ex, "length", f"{ratio:.2f} x its original's length (allowed "
                 f"{self.cfg.min_length_ratio:g}-{self.cfg.max_length_ratio:g})")
            return False
        if self.cfg.same_language:
            was, now = _language(old), _language(new)
            if was != now:
                drop(self.drops, ex, "language", f"{now}, its original is {was}")
                return False
        return True

    def _unique(self, ex: Example) -> bool:
        text = ex.flat_text()
        if not self.cfg.dedup:
            return True
        if text in self.seen:
            drop(self.drops, ex, "exact_duplicate", f"same as {self.seen[text]}")
            return False
        mh = minhash(text, lower=False)
        hits = self.lsh.query(mh)
        if hits:
            drop(self.drops, ex, "near_duplicate", f"near {sorted(hits)[0]}")
            return False
        self.seen[text] = ex.source
        self.lsh.insert(ex.source, mh)
        return True

    def _labels_kept(self, rows: list[Example]) -> list[Example]:
        answers = self.label_generate([ex.prompt_messages() for ex in rows])
        kept = []
        for ex, text in zip(rows, answers):
            want = json_object(self.by_source[ex.parent].reference()) or {}
            got = json_object(text) or {}
            changed = [f"{f}: {want.get(f)!r} -> {got.get(f)!r}" for f in self.label_fields
                       if f in want and got.get(f) != want[f]]
            if changed:
                drop(self.drops, ex, "label_changed", "; ".join(changed))
            else:
                kept.append(ex)
        return kept

    def _under_cap(self, ex: Example) -> bool:
        n = self.per_parent.get(ex.parent, 0)
        if n >= self.cfg.max_per_original:
            drop(self.drops, ex, "cap", f"{ex.parent} has {n} new rows already (filter.max_per_original)")
            return False
        self.per_parent[ex.parent] = n + 1
        return True
