"""Fairness inputs: the counterfactual probes (JSONL / CSV), read with every problem reported at once (file, line,
field), checked against the term groups (chatdata/terms.py reads terms.yaml), and the expansion of a probe into its variants (one per term group and
aligned term index). Light at import: evaluation/fairness/check.py runs the checks."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from chatdata.terms import Attribute
from core.errors import DataError, StackError, collect

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---------------------------------------------------------------- inputs
@dataclass
class Probe:
    id: str
    attribute: str
    template: str
    instruction: str = ""
    reference: dict = field(default_factory=dict)
    source: str = ""


def _read_rows(path: Path) -> list[tuple[int, dict | None, str]]:
    """(line, row or None, error) for a JSONL or CSV file."""
    if not path.is_file():
        raise DataError("file not found", file=path, hint="check the path (the demo probes come from "
                        "`.venv/bin/python data/generate_fairness.py`)")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return [(i + 2, dict(r), "") for i, r in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((n, None, f"not valid JSON: {exc.msg}"))
            continue
        rows.append((n, row, "" if isinstance(row, dict) else "must be a JSON object"))
    return rows


def _placeholders(text: str) -> list[str]:
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def _key(ph: str) -> str:
    """{Pronoun} is the capitalised form of {pronoun}."""
    return ph[:1].lower() + ph[1:]


def load_probes(path: str | Path, terms: dict[str, Attribute], terms_file: str | Path = "terms.yaml") -> list[Probe]:
    path = Path(path)
    errors: list[StackError] = []
    probes: list[Probe] = []
    for n, row, err in _read_rows(path):
        where = dict(file=path, line=n)
        if err:
            errors.append(DataError(err, **where))
            continue
        text, attr = row.get("input"), row.get("attribute")
        if not isinstance(text, str) or not text.strip():
            errors.append(DataError("needs the message text with placeholders, e.g. \"Hi, I'm {name}. ...\"",
                                    **where, field="input"))
            continue
        if attr not in terms:
            errors.append(DataError(f"unknown attribute {attr!r}", **where, field="attribute",
                                    hint=f"{terms_file} defines: {', '.join(terms)}"))
            continue
        found = _placeholders(text)
        if not found:
            errors.append(DataError(f"has no placeholders: a probe must mention the customer through "
                                    f"{attr} terms, e.g. {{{sorted(terms[attr].placeholders)[0]}}}",
                                    **where, field="input"))
            continue
        missing = [p for p in found if _key(p) not in terms[attr].placeholders]
        if missing:
            errors.append(DataError(f"placeholder {{{missing[0]}}} has no term group in attribute '{attr}' (it "
                                    f"defines {', '.join(sorted(terms[attr].placeholders))})", **where,
                                    field="input", hint=f"add '{_key(missing[0])}' to every group of '{attr}' "
                                    f"in {terms_file}, or fix the placeholder"))
            continue
        ref = row.get("reference") or {}
        if isinstance(ref, str):
            ref = _parse_answer(ref) or {}
        probes.append(Probe(str(row.get("id", f"{path.name}:{n}")), attr, text, row.get("instruction") or "",
                            ref if isinstance(ref, dict) else {}, f"{path}:{n}"))
    if not probes and not errors:
        errors.append(DataError("no probes", file=path))
    collect(errors, "problems in the probes")
    return probes


# ---------------------------------------------------------------- counterfactual variants
@dataclass
class Variant:
    probe: Probe
    group: str
    index: int           # which aligned term of the group
    terms: dict          # placeholder -> term used
    text: str


def fill(template: str, terms: dict[str, str]) -> str:
    def one(m):
        ph = m.group(1)
        term = terms[_key(ph)]
        return term[:1].upper() + term[1:] if ph[:1].isupper() else term
    return PLACEHOLDER.sub(one, template)


def variants(probe: Probe, attr: Attribute, max_terms: int = 0) -> list[Variant]:
    """One variant per group and aligned term index: variant k takes the k-th term of every list of the group
    (one-term lists serve every k). Only the placeholders the template uses count towards k."""
    used = {_key(p) for p in _placeholders(probe.template)}
    out = []
    for g, terms in attr.groups.items():
        n = max(len(terms[p]) for p in used)
        n = min(n, max_terms) if max_terms else n
        for k in range(n):
            chosen = {p: terms[p][k % len(terms[p])] for p in used}
            out.append(Variant(probe, g, k, chosen, fill(probe.template, chosen)))
    return out


def prompt_messages(instruction: str, message: str, system_prompt: str | None = None) -> list[dict]:
    """The chat prompt the training pipeline builds from an instruction row (chatdata/pipeline.py to_example)."""
    content = f"{instruction}\n\n{message}" if instruction.strip() else message
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": content}]


def _parse_answer(text: str) -> dict | None:
    from evaluation.metrics import parse_json
    return parse_json(text)
