"""Reading training data: a file (JSONL read line by line with the json module so values keep their JSON types;
JSON, CSV, Parquet through `datasets`) -> rows with their file:line locations -> the format (instruction, chat, text)
-> `Example`s, with every invalid row reported at once (file, line, field). chatdata/pipeline.py runs the rest of the
pipeline (clean, deduplicate, tokenize, filter, split, mix)."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import DataError, collect

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One normalised row: chat `messages` (instruction rows become a user/assistant pair) or raw `text`."""
    source: str                       # "file:line" (or "file:row N" where lines are unknown)
    messages: list[dict] | None = None
    text: str | None = None
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    parent: str | None = None         # an augmented row: its original's source (chatdata/augment/)
    operation: str | None = None      # ... and the operation that made it
    weight: float = 1.0               # loss weight (chatdata/reweigh.py); 1.0 unless reweighing is on

    def flat_text(self) -> str:
        if self.text is not None:
            return self.text
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)

    def prompt_messages(self) -> list[dict]:
        """Messages before the last assistant turn (the evaluation prompt)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    def reference(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


# ---------------------------------------------------------------- loading and validation
def _locations(path: Path, n_rows: int) -> list[str]:
    """Human locations for each row read by `datasets`: CSV rows map to line row+2 (header on line 1)."""
    if path.suffix.lower() == ".csv":
        return [f"{path}:{i + 2}" for i in range(n_rows)]
    return [f"{path}:item {i + 1}" for i in range(n_rows)]


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """JSONL line by line with the json module (no type inference across rows); every malformed line is named."""
    rows, locs, errors = [], [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(DataError(f"malformed JSON line: {exc.msg} (column {exc.colno})", file=path, line=i))
            continue
        if not isinstance(obj, dict):
            errors.append(DataError(f"each line must be a JSON object, got {type(obj).__name__}", file=path, line=i))
            continue
        rows.append(obj)
        locs.append(f"{path}:{i}")
    collect(errors, "malformed lines")
    return rows, locs


def _scan_json(path: Path):
    """The parsed file (None when blank), or the exact line of a JSON syntax error (datasets' message lacks it)."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg}", file=path, line=exc.lineno) from None


def _no_rows(path: Path, builder: str) -> bool:
    """Whether the file holds no rows at all: `datasets` raises on such files instead of returning 0 rows."""
    if builder == "parquet":
        return path.stat().st_size == 0
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return True
    return sum(1 for row in csv.reader(io.StringIO(text)) if row) <= 1  # the header only


def load_file(path: str | Path) -> tuple[list[dict], list[str]]:
    """Rows of a data file as dicts (JSONL with the json module, other types through `datasets`) and each row's
    location."""
    path = Path(path)
    if not path.is_file():
        raise DataError("dataset file not found", file=path, hint="check data.*[].path in the config")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type '{path.suffix}'", file=path, hint=f"use one of {', '.join(BUILDERS)}")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    if builder == "json" and _scan_json(path) in (None, []):
        return [], []  # no rows (the empty-dataset check names the file); datasets would raise instead
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        if _no_rows(path, builder):
            return [], []
        cause = exc.__cause__ or exc
        first = (str(cause).splitlines() or [""])[0][:300]
        raise DataError(f"could not read the file: {type(cause).__name__}: {first}", file=path) from None
    rows = ds.to_list()
    return rows, _locations(path, len(rows))


def detect_format(columns: set[str], path) -> str:
    if "messages" in columns:
        return "chat"
    if {"instruction", "output"} <= columns:
        return "instruction"
    if "text" in columns:
        return "text"
    raise DataError(f"cannot tell the format from the columns {sorted(columns)}", file=path,
                    hint="expected 'messages' (chat), 'instruction'+'output' (instruction) or 'text'; "
                         "or set format and columns in the config")


def _need_str(row: dict, key: str, loc: str, errors: list, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None:
        if not optional:
            errors.append(DataError("missing field", file=loc, field=key))
        return None
    if not isinstance(value, str):
        errors.append(DataError(f"must be a string, got {type(value).__name__}", file=loc, field=key))
        return None
    return value


def to_example(row: dict, fmt: str, loc: str, errors: list) -> Example | None:
    """Validate one raw row against its format; problems go to `errors` with file:line and field."""
    n = len(errors)
    if fmt == "instruction":
        instr = _need_str(row, "instruction", loc, errors)
        inp = _need_str(row, "input", loc, errors, optional=True) or ""
        out = _need_str(row, "output", loc, errors)
        if len(errors) > n:
            return None
        prompt = f"{instr}\n\n{inp}" if inp.strip() else instr
        return Example(loc, messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": out}])
    if fmt == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            errors.append(DataError("must be a non-empty list of {role, content}", file=loc, field="messages"))
            return None
        clean = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                errors.append(DataError("must be an object with role and content", file=loc, field=where))
                continue
            if m.get("role") not in ROLES:
                errors.append(DataError(f"role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                                        file=loc, field=f"{where}.role"))
            content = _need_str(m, "content", loc, errors)
            if content is not None and not errors[n:]:
                clean.append({"role": m["role"], "content": content})
        if len(errors) == n and not any(m["role"] == "assistant" for m in clean):
            errors.append(DataError("no assistant message to learn from", file=loc, field="messages"))
        return Example(loc, messages=clean) if len(errors) == n else None
    text = _need_str(row, "text", loc, errors)
    return Example(loc, text=text) if len(errors) == n else None
