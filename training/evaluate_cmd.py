"""`llmstack eval` and `llmstack data`: the evaluation and the data pipeline on their own."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from chatdata import pipeline as data_mod
from core import artifacts
from core.config import load
from core.errors import ArtifactError
from evaluation import quality as ev
from modeling.model import load_model, load_tokenizer, resolve

from . import curriculum
from .config import TrainConfig


def model_folder(ref: str, models_dir: str = "models") -> str:
    """A training artifact means its merged model; anything else resolves like model.name_or_path."""
    path = Path(ref)
    if (path / artifacts.MANIFEST).is_file():
        merged = path / "merged"
        if not (merged / "config.json").is_file():
            raise ArtifactError("this training artifact has no merged model (prompt-learning methods cannot merge)",
                                file=path)
        return str(merged)
    return resolve(ref, models_dir)


def run(model_ref: str, config: str, overrides: list[str], output: str | None) -> dict:
    cfg = load(TrainConfig, config, overrides)
    torch.set_num_threads(cfg.train.threads or os.cpu_count())
    folder = model_folder(model_ref, cfg.model.models_dir)
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    prepared = data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)
    model = load_model(folder, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    metrics, preds = ev.evaluate(model, tokenizer, prepared.test, cfg.eval, max_len=cfg.data.max_seq_len, fast=True)
    print(ev.table(None, metrics))
    if output:
        artifacts.write_json(output, {"model": folder, "metrics": metrics, "predictions": preds})
    return metrics


def data_report(config: str, overrides: list[str], output: str | None) -> dict:
    cfg = load(TrainConfig, config, overrides)
    folder = resolve(cfg.model.name_or_path, cfg.model.models_dir)
    prepared, _ = curriculum.prepare_data(cfg, load_tokenizer(folder, cfg.model.trust_remote_code))
    print(data_mod.report_markdown(prepared.report))
    if output:
        Path(output).write_text(json.dumps(prepared.report, indent=2))
    return prepared.report
