"""Counterfactual term groups (a terms.yaml): attributes -> groups -> placeholder -> aligned terms, read with every
problem reported at once (file, line, field). Used by the fairness probes (evaluation/fairness/probes.py) and by the
data pipeline's counterfactual augmentation and reweighing (chatdata/augment/, chatdata/reweigh.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import read_yaml
from core.errors import ConfigError, StackError, collect


@dataclass
class Attribute:
    name: str
    groups: dict[str, dict[str, list[str]]]  # group -> placeholder -> aligned terms
    description: str = ""

    @property
    def placeholders(self) -> set[str]:
        return set(next(iter(self.groups.values())))




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


