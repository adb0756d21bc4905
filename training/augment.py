"""`llmstack augment`: one dataset file augmented on its own with the `data.augment` section of a training config
(the same operations and filter `llmstack train` applies to its training split), written as chat JSONL: the
original rows, then the new rows with their `parent` and `operation`; the augmentation report beside it."""
from __future__ import annotations

import json
from pathlib import Path

from chatdata import pipeline
from chatdata.augment import augment, report, rows
from chatdata.config import DatasetSpec
from core import artifacts
from core.config import load
from core.errors import ConfigError
from modeling.model import resolve
from training.config import TrainConfig


def _row(ex) -> dict:
    out = {"messages": ex.messages} if ex.messages is not None else {"text": ex.text}
    out["source"] = ex.source
    if ex.parent is not None:
        out.update(parent=ex.parent, operation=ex.operation)
    return out


def run(input_path: str, output: str, config: str, overrides: list[str], only_new: bool = False) -> dict:
    cfg = load(TrainConfig, config, overrides)
    if not cfg.data.augment.operations:
        raise ConfigError("no augmentation operations configured", field="data.augment.operations",
                          hint="add them to the config or override, e.g. "
                          "'data.augment.operations=[{op: char_noise, rate: 1}]'")
    originals = pipeline.read_rows(DatasetSpec(path=input_path), cfg.data)
    base = resolve(cfg.model.name_or_path, cfg.model.models_dir) if _needs_base(cfg) else ""
    made = augment(originals, cfg.data.augment, near_threshold=cfg.data.near_dup_threshold, base_model=str(base))
    summary = report.summary(made.report, made.rows, originals, rows.template(originals))
    out = Path(output)
    written = made.rows if only_new else originals + made.rows
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(out, "".join(json.dumps(_row(ex), ensure_ascii=False) + "\n" for ex in written))
    artifacts.write_json(out.with_suffix(".report.json"), summary)
    md = "\n".join(["# Augmentation report", "", f"Input: {input_path}", *report.markdown(summary)]) + "\n"
    artifacts.write_text(out.with_suffix(".report.md"), md)
    print(md)
    print(f"{len(written)} rows -> {out} (report: {out.with_suffix('.report.md')})")
    return summary


def _needs_base(cfg: TrainConfig) -> bool:
    gens = [op.generator for op in cfg.data.augment.operations if op.op == "paraphrase"]
    gens += [cfg.data.augment.filter.label_check] if cfg.data.augment.filter.label_check else []
    return any(g.model == "base" and not g.endpoint for g in gens)
