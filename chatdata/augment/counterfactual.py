"""Counterfactual data augmentation: a new row with the terms of one group (names, gendered words, nationalities)
swapped for another group's, from term groups in the fairness check's format (chatdata/terms.py). Labels stay: the
answer changes only where it repeats a swapped term.

A term's place in its group (placeholder and index) picks its replacement: the k-th name of group A becomes the k-th
name of group B (modulo B's list), `she` becomes `he`. Lower-case terms match any case and keep the case they had;
capitalised terms (names) match as written. An ambiguous term (`her`: object or possessive) takes the first
placeholder that lists it."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..files import Example
from ..terms import Attribute
from .config import AugmentOp
from .rows import derive, free_text


@dataclass(frozen=True)
class Place:
    attribute: str
    group: str
    placeholder: str
    index: int


class TermIndex:
    def __init__(self, attributes: dict[str, Attribute]):
        self.attributes = attributes
        self.exact: dict[str, Place] = {}   # capitalised terms (names): as written
        self.lower: dict[str, Place] = {}   # lower-case terms: any case
        for a in attributes.values():
            for g, terms in a.groups.items():
                for ph, values in terms.items():
                    for i, t in enumerate(values):
                        (self.lower if t.islower() else self.exact).setdefault(t, Place(a.name, g, ph, i))
        alts = sorted({*self.exact, *self.lower}, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in alts) + r")\b", re.IGNORECASE) if alts \
            else None

    def place(self, word: str) -> Place | None:
        return self.exact.get(word) or self.lower.get(word.lower())

    def find(self, text: str) -> list[tuple[str, Place]]:
        """(matched text, place) of every term in `text`."""
        hits = ((m.group(0), self.place(m.group(0))) for m in (self.pattern.finditer(text) if self.pattern else ()))
        return [(w, p) for w, p in hits if p is not None]

    def replacement(self, word: str, place: Place, group: str) -> str:
        values = self.attributes[place.attribute].groups[group][place.placeholder]
        new = values[place.index % len(values)]
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new[:1].upper() + new[1:] if word[:1].isupper() else new


def group_of(found: list[tuple[str, Place]]) -> tuple[str, str] | None:
    """(attribute, group) most of a row's terms belong to; None without terms."""
    if not found:
        return None
    counts: dict[tuple[str, str], int] = {}
    for _, p in found:
        counts[(p.attribute, p.group)] = counts.get((p.attribute, p.group), 0) + 1
    return max(counts, key=lambda key: counts[key])


def build(op: AugmentOp, ex: Example, k: int, rnd: random.Random, shared, index: TermIndex) -> Example | None:
    found = index.find(free_text(ex, shared))
    if op.attributes:
        found = [(w, p) for w, p in found if p.attribute in op.attributes]
    source = group_of(found)
    if source is None:
        return None
    attribute, group = source
    target = rnd.choice(sorted(g for g in index.attributes[attribute].groups if g != group))

    def edit(text: str) -> str:
        def one(m):
            word, place = m.group(0), index.place(m.group(0))
            return word if place is None or place.attribute != attribute else index.replacement(word, place, target)
        return index.pattern.sub(one, text)
    return derive(ex, shared, edit, f"counterfactual:{attribute}:{group}->{target}", k, answer_edit=edit)
