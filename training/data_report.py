"""`llmstack data`: the data pipeline of a training config on its own (curriculum stages included), its report
printed (sources, drops, token lengths, label fields per split, common n-grams, train/test leakage, personal data) and
optionally written as JSON with a PNG of the label fields beside it."""
from __future__ import annotations

import json
from pathlib import Path

from chatdata import eda
from chatdata import pipeline as data_mod
from core.config import load
from modeling.model import load_tokenizer, resolve
from training.config import TrainConfig
from training.sft import curriculum


def run(config: str, overrides: list[str], output: str | None) -> dict:
    cfg = load(TrainConfig, config, overrides)
    folder = resolve(cfg.model.name_or_path, cfg.model.models_dir)
    prepared, _ = curriculum.prepare_data(cfg, load_tokenizer(folder, cfg.model.trust_remote_code))
    print(data_mod.report_markdown(prepared.report))
    if output:
        Path(output).write_text(json.dumps(prepared.report, indent=2))
        if eda.plot(prepared.report["eda"], Path(output).with_suffix(".png")):
            print(f"label fields per split: {Path(output).with_suffix('.png')}")
    return prepared.report
