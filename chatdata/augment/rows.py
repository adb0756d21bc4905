"""What an augmentation may change in a row, and making the new row.

A row's *message* is its last user message (a raw-text row: its text). Paragraphs of the message that more than half
of the rows share (the task instruction an instruction row starts with) are the template and never change; every
operation edits the other paragraphs, and the answer only where the operation says so (slots, counterfactual)."""
from __future__ import annotations

import copy
import random
from collections import Counter
from contextlib import contextmanager
from typing import Callable

from ..files import Example

SEP = "\n\n"


def _last_user(ex: Example) -> int | None:
    users = [i for i, m in enumerate(ex.messages or []) if m["role"] == "user"]
    return users[-1] if users else None


def message(ex: Example) -> str:
    if ex.messages is None:
        return ex.text
    i = _last_user(ex)
    return ex.messages[i]["content"] if i is not None else ""


def answer(ex: Example) -> str | None:
    return ex.reference() if ex.messages is not None else None


def template(rows: list[Example]) -> frozenset[str]:
    """Message paragraphs shared by more than half of the rows."""
    counts = Counter(p for ex in rows for p in set(message(ex).split(SEP)))
    return frozenset(p for p, c in counts.items() if c > len(rows) / 2)


def free_text(ex: Example, shared: frozenset[str]) -> str:
    """The part of the message an operation edits (the paragraphs outside the template)."""
    return SEP.join(p for p in message(ex).split(SEP) if p not in shared)


def derive(ex: Example, shared: frozenset[str], edit: Callable[[str], str], operation: str, k: int,
           answer_edit: Callable[[str], str] | None = None) -> Example:
    """A new row: `edit` applied to each free paragraph of the message (a paragraph it empties is left out),
    `answer_edit` (if any) to the answer; its source names the original, the operation and the copy number."""
    new = Example(source=f"{ex.source}+{operation}#{k}", parent=ex.source, operation=operation,
                  weight=ex.weight)
    text = SEP.join(x for x in (p if p in shared else edit(p) for p in message(ex).split(SEP)) if x)
    if ex.messages is None:
        new.text = text
        return new
    new.messages = copy.deepcopy(ex.messages)
    new.messages[_last_user(ex)]["content"] = text
    if answer_edit is not None:
        last = max(i for i, m in enumerate(new.messages) if m["role"] == "assistant")
        new.messages[last]["content"] = answer_edit(new.messages[last]["content"])
    return new


def copies(rate: float, rng: random.Random) -> int:
    """How many new rows one original gets at `rate` (its whole part always, the fraction by chance)."""
    whole = int(rate)
    return whole + (rng.random() < rate - whole)


@contextmanager
def seeded(seed: int):
    """Seed `random` and numpy's global generator (nlpaug draws from both) and put their states back after."""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def row_seed(seed: int, source: str, k: int) -> int:
    """A per-row seed that does not depend on the row's position (stable when rows are added or removed)."""
    import zlib
    return zlib.crc32(f"{seed}|{source}|{k}".encode())
