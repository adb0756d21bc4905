"""`llmstack eval`: one model (a training artifact's merged model, a model folder or a built-in name) evaluated on the
test split of a training config, with its eval settings."""
from __future__ import annotations

import os

import torch

from chatdata import pipeline as data_mod
from core import artifacts
from core.config import load
from modeling.model import load_model, load_tokenizer, model_folder

from . import quality as ev
from .config import TrainingSections


def run(model_ref: str, config: str, overrides: list[str], output: str | None) -> dict:
    cfg = load(TrainingSections, config, overrides)
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
