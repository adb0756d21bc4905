"""Operations that edit the text itself: character and word noise (nlpaug: its character and word augmenters work
on the text alone, with no downloaded model or dictionary), casing, and slot values.

Noise never touches a word that also appears in the answer (an error code, a product name the summary repeats), so
what the answer says stays true of the new message."""
from __future__ import annotations

import random
import re
from typing import Callable

from core.errors import ConfigError

from ..files import Example
from .config import AugmentOp
from .rows import answer, copies, derive, free_text, row_seed, seeded

CHAR_ACTIONS = ("keyboard", "swap", "delete", "insert", "substitute")
WORD_ACTIONS = ("delete", "swap")


def _tokens(text: str) -> list[str]:
    return re.findall(r"\S+|\n", text)


def _untokens(tokens: list[str]) -> str:
    return re.sub(r" ?\n ?", "\n", " ".join(tokens))


def _protected(ex: Example) -> list[str]:
    """Words of the answer (and line breaks): noise leaves them as they are."""
    return sorted(set(_tokens(answer(ex) or "")) | {"\n"})


def _char_augmenter(action: str, strength: float, stop: list[str]):
    import nlpaug.augmenter.char as nac

    common = dict(aug_word_p=strength, aug_word_min=1, stopwords=stop, tokenizer=_tokens,
                  reverse_tokenizer=_untokens, min_char=4)
    if action == "keyboard":
        return nac.KeyboardAug(aug_char_p=0.2, include_numeric=False, include_special_char=False, **common)
    return nac.RandomCharAug(action=action, aug_char_p=0.2, include_numeric=False, spec_char="", **common)


def _word_augmenter(action: str, strength: float, stop: list[str]):
    import nlpaug.augmenter.word as naw

    return naw.RandomWordAug(action=action, aug_p=strength, aug_min=1, stopwords=stop, tokenizer=_tokens,
                             reverse_tokenizer=_untokens)


def _nlpaug_edit(make_augmenter: Callable, actions: tuple[str, ...]):
    def build(op: AugmentOp, ex: Example, k: int, rnd: random.Random, shared, context) -> Example:
        action = rnd.choice(actions)
        aug = make_augmenter(action, op.strength, _protected(ex))

        def edit(paragraph: str) -> str:
            out = aug.augment(paragraph, n=1)
            return out[0] if out else paragraph

        with seeded(row_seed(op.seed, ex.source, k)):
            return derive(ex, shared, edit, f"{op.op}:{action}", k)
    return build


def _casing(op: AugmentOp, ex: Example, k: int, rnd: random.Random, shared, context) -> Example:
    """Half the copies lower-case the whole message (as people type in a hurry); the others lower- or upper-case a
    `strength` share of the words."""
    keep = set(_protected(ex))
    whole = rnd.random() < 0.5

    def edit(paragraph: str) -> str:
        if whole:
            return _untokens([t if t in keep else t.lower() for t in _tokens(paragraph)])
        return _untokens([t if t in keep or rnd.random() >= op.strength else rnd.choice((t.lower(), t.upper()))
                          for t in _tokens(paragraph)])
    return derive(ex, shared, edit, "casing:lower" if whole else "casing:words", k)


def slot_values(op: AugmentOp, rows: list[Example], shared) -> dict[str, list[str]]:
    """Every distinct value of each slot in the rows' messages, in order of first appearance."""
    values: dict[str, list[str]] = {}
    for name, pattern in op.slots.items():
        found = (m.group(0) for ex in rows for m in re.finditer(pattern, free_text(ex, shared)))
        values[name] = list(dict.fromkeys(found))
    return values


def _slots(op: AugmentOp, ex: Example, k: int, rnd: random.Random, shared, values) -> Example | None:
    """One slot of the message, every value of it replaced by another value of that slot, in the answer too."""
    text = free_text(ex, shared)
    present = [n for n, p in op.slots.items() if re.search(p, text) and len(values[n]) > 1]
    if not present:
        return None
    name = rnd.choice(present)
    mapping = {}
    for v in dict.fromkeys(m.group(0) for m in re.finditer(op.slots[name], text)):
        mapping[v] = rnd.choice([x for x in values[name] if x != v and x not in mapping.values()] or [v])
    swap = re.compile("|".join(re.escape(v) for v in sorted(mapping, key=len, reverse=True)))

    def edit(s: str) -> str:
        return swap.sub(lambda m: mapping[m.group(0)], s)
    return derive(ex, shared, edit, f"slots:{name}", k, answer_edit=edit)


def synonym_groups(op: AugmentOp) -> dict[str, list[str]]:
    """op.synonyms, read from its YAML file when it names one (a mapping of group -> list of forms)."""
    if not isinstance(op.synonyms, str):
        return op.synonyms
    from core.config import read_yaml
    groups, lines = read_yaml(op.synonyms)
    for name, forms in groups.items():
        if not (isinstance(forms, list) and len(forms) > 1 and all(isinstance(f, str) and f for f in forms)):
            raise ConfigError("must list at least two interchangeable forms (strings)", file=op.synonyms,
                              line=lines.get((name,)), field=str(name))
    return groups


def _synonyms(op: AugmentOp, ex: Example, k: int, rnd: random.Random, shared, groups) -> Example | None:
    """Every form of one synonym group found in the message replaced by another form of the group (matched in any
    case; a form found all lower-case is written lower-case)."""
    text = free_text(ex, shared)
    found = [name for name, forms in groups.items() if len(forms) > 1 and _alternation(forms).search(text)]
    if not found:
        return None
    name = rnd.choice(found)
    group, pattern = groups[name], _alternation(groups[name])

    def one(m):
        old = m.group(0)
        new = rnd.choice([f for f in group if f.lower() != old.lower()])
        return new.lower() if old.islower() else new
    return derive(ex, shared, lambda p: pattern.sub(one, p), f"synonyms:{name}", k)


def _alternation(forms: list[str]) -> re.Pattern:
    alts = sorted(forms, key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(f) for f in alts) + r")(?!\w)", re.IGNORECASE)


BUILDERS = {"char_noise": _nlpaug_edit(_char_augmenter, CHAR_ACTIONS),
            "word_noise": _nlpaug_edit(_word_augmenter, WORD_ACTIONS),
            "casing": _casing, "slots": _slots, "synonyms": _synonyms}


def per_row(op: AugmentOp, rows: list[Example], shared, build: Callable, context=None) -> tuple[list[Example], int]:
    """Run `build` for each copy of each row (copies drawn at op.rate with op.seed); (new rows, rows the operation
    could not apply to)."""
    rnd = random.Random(op.seed)
    out, skipped = [], 0
    for ex in rows:
        for k in range(1, copies(op.rate, rnd) + 1):
            new = build(op, ex, k, random.Random(row_seed(op.seed, ex.source, k)), shared, context)
            if new is None:
                skipped += 1
            else:
                out.append(new)
    return out, skipped
