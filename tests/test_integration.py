"""The real thing, briefly: LoRA on the provisioned SmolLM2-135M-Instruct for a few steps on real ticket rows, then
the merged model answers a ticket. Slow (about two minutes on 2 CPU cores); `make test` runs it, `make test-fast` not."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import BASE_MODEL, ROOT, need_base_model, read_jsonl, ticket_rows, write_jsonl, write_yaml
from core.config import load
from training.config import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_lora_on_the_real_base_model(tmp_path):
    need_base_model()
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from modeling.model import load_tokenizer
    from training.sft import recipe as sft

    data = {"train": write_jsonl(tmp_path / "train.jsonl", ticket_rows(16, "train")),
            "validation": write_jsonl(tmp_path / "validation.jsonl", ticket_rows(2, "validation")),
            "test": write_jsonl(tmp_path / "test.jsonl", ticket_rows(4, "test"))}
    shipped = load(TrainConfig, ROOT / "configs" / "train.yaml")  # the demo's settings, shortened
    cfg = load(TrainConfig, write_yaml(tmp_path / "train.yaml", {
        "model": {"name_or_path": shipped.model.name_or_path, "models_dir": str(BASE_MODEL.parent)},
        "data": {"train": [{"path": str(data["train"])}], "validation": [{"path": str(data["validation"])}],
                 "test": [{"path": str(data["test"])}], "max_seq_len": shipped.data.max_seq_len},
        "method": shipped.method.model_dump(),
        "train": {"lr": shipped.train.lr, "batch_size": 2, "max_steps": 4, "warmup_ratio": 0.0, "logging_steps": 1,
                  "save_steps": 4, "threads": min(2, os.cpu_count() or 1), "seed": 42},
        "eval": {"before": True, "after": True, "max_samples": 4, "max_new_tokens": 16, "batch_size": 4,
                 "json_fields": shipped.eval.json_fields},
        "output": {"dir": str(tmp_path / "artifacts")},
    }))
    try:
        artifact = sft.run(cfg)
    finally:
        torch.set_num_threads(1)

    # ---- complete artifact
    for name in ("manifest.json", "config.yaml", "data_report.json", "data_report.md", "metrics.json", "README.md",
                 "loss_curve.png", "train_history.json", "token_lengths.png", "predictions_before.jsonl",
                 "predictions_after.jsonl",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/model.safetensors",
                 "merged/config.json", "merged/tokenizer.json", "merged/chat_template.jinja", "data_fields.png",
                 "data/train.jsonl", "data/validation.jsonl", "data/test.jsonl"):
        assert (artifact / name).is_file(), f"{name} missing from the artifact"
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["base_model"]["path"] == str(BASE_MODEL)
    assert m["base_model"]["source"].startswith("pypi:")
    t = m["training"]
    assert t["steps"] == 4 and math.isfinite(t["final_train_loss"]) and t["tokens_per_s"] > 0

    # ---- it learned: the adapter moved and the held-out answer loss went down
    adapter = load_file(artifact / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"
    before, after = m["metrics"]["before"], m["metrics"]["after"]
    assert math.isfinite(before["loss"]) and math.isfinite(after["loss"])
    assert after["loss"] < before["loss"], (before["loss"], after["loss"])
    assert before["n"] == after["n"] == 4

    # ---- the before/after table is in the manifest, the card and metrics.json
    table = m["metrics_table"]
    assert table.splitlines()[0] == "| metric | before | after | change |"
    for row in ["answer loss", "JSON valid", "exact match"] + [f"accuracy: {f}" for f in cfg.eval.json_fields]:
        assert f"| {row}" in table, row
    assert table in (artifact / "README.md").read_text()
    assert json.loads((artifact / "metrics.json").read_text())["before"] == before

    # ---- the merged model is a standalone chat model that answers a ticket
    tok = load_tokenizer(str(artifact / "merged"))
    model = AutoModelForCausalLM.from_pretrained(artifact / "merged").eval()
    row = read_jsonl(data["test"])[0]
    prompt = tok.apply_chat_template([{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text, "the merged model generated nothing"
    first_pred = next(p for p in read_jsonl(artifact / "predictions_after.jsonl") if p["source"].endswith(":1"))
    assert first_pred["prediction"].startswith(text[:8])  # the same model the evaluation used

    # ---- the drift reference: basis from the train prompts, rows from validation, answers from the evaluation
    from evaluation import quality as ev
    from monitoring import drift
    ref = drift.Reference.load(artifact)
    preds = read_jsonl(artifact / "predictions_after.jsonl")
    assert m["outputs"]["drift_reference"] and m["drift_reference"]["rows"]["prompt_tokens"] == 2
    assert ref.values["output_tokens"] == [p["n_tokens"] for p in preds]
    assert all(p["finish"] in ("stop", "length") and p["logprob_sum"] <= 0 for p in preds)
    # the statistics are the generated tokens' own log-probabilities (a teacher-forced forward agrees)
    msgs = [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}]
    stats: list = []
    ev.generate(model, tok, [msgs], 12, 1, share_prefix=False, stats=stats)
    with torch.no_grad():
        full = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        logp = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
    new = full[0, enc["input_ids"].shape[1]:]
    upto = stats[0]["n_tokens"] + (stats[0]["finish"] == "stop")
    want = sum(float(logp[enc["input_ids"].shape[1] - 1 + i, new[i]]) for i in range(upto))
    assert stats[0]["logprob_sum"] == pytest.approx(want, abs=1e-3)
