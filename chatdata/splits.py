"""The prepared splits a training run trained and evaluated on, saved in its artifact as `data/<split>.jsonl` (one
cleaned, deduplicated, length-filtered row per line: its source `file:line`, its chat `messages` or raw `text`, and
for an augmented row its `parent` and `operation`, for a reweighed one its `weight`), so
that a later stage (compression) reads exactly those rows instead of running the data pipeline again."""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import ArtifactError

from .files import Example
from .pipeline import Prepared, encode

FOLDER = "data"
SPLITS = ("train", "validation", "test")


def save(prepared: Prepared, folder: Path) -> None:
    """Write train / validation / test of `prepared` into `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = []
        for ex in getattr(prepared, split):
            row = {"source": ex.source}
            if ex.parent is not None:  # an augmented row: its lineage
                row.update(parent=ex.parent, operation=ex.operation)
            if ex.weight != 1.0:
                row["weight"] = ex.weight
            row.update({"messages": ex.messages} if ex.messages is not None else {"text": ex.text})
            lines.append(json.dumps(row, ensure_ascii=False))
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def saved(folder: Path) -> bool:
    return all((folder / f"{split}.jsonl").is_file() for split in SPLITS)


def load(folder: Path, tokenizer, report: dict | None = None) -> Prepared:
    """The splits saved by `save`, tokenized with `tokenizer` (input_ids and answer labels, as the pipeline does)."""
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ex = Example(source=row["source"], messages=row.get("messages"), text=row.get("text"),
                             parent=row.get("parent"), operation=row.get("operation"),
                             weight=float(row.get("weight", 1.0)))
                if ex.messages is None and ex.text is None:
                    raise KeyError("messages or text")
            except (ValueError, KeyError, TypeError) as exc:
                raise ArtifactError(f"not a saved data row ({type(exc).__name__}: {exc})", file=path, line=n,
                                    hint="rebuild the training artifact with `llmstack train`") from None
            encode(tokenizer, ex)
            rows.append(ex)
        splits[split] = rows
    return Prepared(splits["train"], splits["validation"], splits["test"], report or {})
