"""Config is data: YAML -> pydantic model -> code.

`load(Model, path, overrides)` reads a YAML file, applies `section.key=value` overrides, validates with pydantic and
turns every validation problem into one error naming the file, the YAML line and the field. `describe(Model)` renders
the field docstrings as `--help` text.
"""
from __future__ import annotations

import hashlib
import json
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, StackError, collect


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be silently ignored)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _key_lines(node, prefix=()) -> dict[tuple, int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            lines.update(_key_lines(item, prefix + (i,)))
    return lines


def read_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", file=path, hint="pass --config with an existing YAML file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", file=path,
                          line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", file=path, line=1)
    return data, _key_lines(node) if node is not None else {}


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value", field=text)
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set '{text}': '{k}' is not a section", field=".".join(keys))
        node[keys[-1]] = value
    return data


class FieldProblems(ValueError):
    """Raised by a model validator that checks across fields: several problems, each at its own path below the
    model (e.g. ("stages", 1, "mix", "nope")), so each is reported with its own field and YAML line."""

    def __init__(self, problems: list[tuple[tuple, str]]):
        self.problems = problems
        super().__init__("; ".join(msg for _, msg in problems))


def _located(errors: list[dict]) -> list[dict]:
    """Pydantic errors with every FieldProblems expanded to one error per problem, at its own location."""
    out = []
    for err in errors:
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldProblems):
            out += [{"loc": tuple(err["loc"]) + tuple(sub), "msg": msg, "type": "value_error"}
                    for sub, msg in cause.problems]
        else:
            out.append(err)
    return out


def validate(model: type[BaseModel], data: dict, *, file=None, lines: dict | None = None,
             overridden: set[str] = frozenset()):
    """Validate `data`; every problem becomes a ConfigError with the field path and YAML line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors: list[StackError] = []
        for err in _located(exc.errors()):
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc)
            line = None
            for n in range(len(loc), 0, -1):
                if lines and loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            in_file = loc in (lines or {})
            # an override set this field, or created it (a misspelled section: trian.lr=1 -> unknown 'trian')
            from_cli = any(field == o or field.startswith(o + ".") or (o.startswith(field + ".") and not in_file)
                           for o in overridden)
            where = "command line" if from_cli else file
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; `--help` lists every option)"
            elif isinstance(err.get("input"), dict):  # a rule across fields (model_validator): its message only
                msg = str(err.get("ctx", {}).get("error", msg))
            elif "input" in err and err["type"] not in ("missing",):
                msg = f"{msg} (got {err['input']!r})"
            errors.append(ConfigError(msg, file=where, line=line if where == file else None, field=field))
        collect(errors, "config problems")


def load(model: type[BaseModel], path: str | Path | None, overrides: list[str] = ()):
    data, lines = read_yaml(path) if path else ({}, {})
    data = apply_overrides(data, list(overrides))
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    return validate(model, data, file=path, lines=lines, overridden=overridden)


def config_hash(cfg: BaseModel, exclude: set[str] = frozenset()) -> str:
    data = cfg.model_dump(mode="json")
    for key in exclude:
        section, _, leaf = key.partition(".")
        if leaf:
            data.get(section, {}).pop(leaf, None)
        else:
            data.pop(section, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (optional)"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def describe(model: type[BaseModel], prefix: str = "", _seen: set | None = None) -> str:
    """Every option as `section.key (type, default): docstring`, the `--help` text."""
    out, _seen = [], set() if _seen is None else _seen
    for name, field in model.model_fields.items():
        tp = field.annotation
        key = f"{prefix}{name}"
        sub = tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
        if sub is not None:
            out.append(f"\n[{key}] {field.description or ''}".rstrip())
            out.append(describe(sub, key + ".", _seen))
            continue
        default = field.get_default(call_default_factory=True)
        default = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default] \
            if isinstance(default, list) else default
        shown = "required" if field.is_required() else f"default {json.dumps(default, default=str)}"
        out.append(f"  {key} ({_type_name(tp)}, {shown})")
        if field.description:
            out.append(f"      {' '.join(field.description.split())}")
        item = (typing.get_args(tp) or [None])[0] if typing.get_origin(tp) is list else None
        if isinstance(item, type) and issubclass(item, BaseModel) and item not in _seen:
            _seen.add(item)
            out.append(describe(item, f"{key}[].", _seen))
    return "\n".join(out)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
