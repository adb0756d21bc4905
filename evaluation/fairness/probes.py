"""Fairness inputs: the term groups (terms.yaml) and the counterfactual probes (JSONL / CSV), read with every
problem reported at once (file, line, field), and the expansion of a probe into its variants (one per term group and
aligned term index). Light at import: evaluation/fairness/check.py runs the checks."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.config import read_yaml
from core.errors import ConfigError, DataError, StackError, collect

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ---------------------------------------------------------------- inputs
@dataclass
class Attribute:
    name: str
    groups: dict[str, dict[str, list[str]]]  # group -> placeholder -> aligned terms
    description: str = ""

    @property
    def placeholders(self) -> set[str]:
        return set(next(iter(self.groups.values())))


@dataclass
class Probe:
    id: str
    attribute: str
    template: str
    instruction: str = ""
    reference: dict = field(default_factory=dict)
    source: str = ""


def load_terms(path: str | Path) -> dict[str, Attribute]:
    """attributes.<attribute>.groups.<group>.<placeholder>: [terms] (a single string is one term)."""
    data, lines = read_yaml(path)  # ConfigError for a missing file / bad YAML, with the line
    errors: list[StackError] = []
    attrs = data.get("attributes")
    if not isinstance(attrs, dict) or not attrs:
        raise ConfigError("needs a top-level `attributes:` mapping of attribute -> groups", file=path, line=1,
                          field="attributes")
    out = {}
    for name, spec in attrs.items():
        where = dict(file=path, line=lines.get(("attributes", name)))
        groups = spec.get("groups") if isinstance(spec, dict) else None
        if not isinstance(groups, dict) or len(groups) < 2:
            errors.append(ConfigError("needs `groups:` with at least two term groups to compare", **where,
                                      field=f"attributes.{name}.groups"))
            continue
        clean: dict[str, dict[str, list[str]]] = {}
        for g, terms in groups.items():
            gl = dict(file=path, line=lines.get(("attributes", name, "groups", g)),
                      field=f"attributes.{name}.groups.{g}")
            if not isinstance(terms, dict) or not terms:
                errors.append(ConfigError("must map placeholders to term lists, e.g. {name: [Emily, Sarah]}", **gl))
                continue
            clean[g] = {}
            for ph, values in terms.items():
                values = [values] if isinstance(values, str) else values
                if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                    errors.append(ConfigError(f"placeholder '{ph}' needs a non-empty list of strings", **gl))
                    continue
                clean[g][ph] = values
        keys = {g: set(groups[g]) for g in clean}  # as written: a bad term list is reported once, above
        if clean and len({frozenset(k) for k in keys.values()}) > 1:
            union = set().union(*keys.values())
            for g, k in keys.items():
                if k != union:
                    errors.append(ConfigError(f"group lacks placeholders {sorted(union - k)} that other groups of "
                                              f"'{name}' define (every group must fill every placeholder)",
                                              file=path, line=lines.get(("attributes", name, "groups", g)),
                                              field=f"attributes.{name}.groups.{g}"))
        out[name] = Attribute(name, clean, spec.get("description", "") if isinstance(spec, dict) else "")
    collect(errors, "problems in the term groups")
    return out


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
