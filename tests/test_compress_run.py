"""`llmstack compress` end to end on the tiny model, plus the config, input and gate rules."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, write_yaml


def compress_config(tiny_model_dir: Path, tiny_data: dict, out: Path, **extra) -> dict:
    cfg = {
        "input": str(tiny_model_dir),
        "data": {"train": [{"path": str(tiny_data["train"])}], "validation": [{"path": str(tiny_data["validation"])}],
                 "test": [{"path": str(tiny_data["test"])}], "max_seq_len": 384},
        "eval": {"max_new_tokens": 6, "batch_size": 4, "json_fields": ["category", "product", "urgency"]},
        "variants": [{"name": "onnx-fp32"}, {"name": "onnx-int8", "quantize": "int8_block"},
                     {"name": "onnx-int4", "quantize": "int4"},
                     {"name": "pt-depth", "prune": "depth", "distill": True, "format": "pytorch"},
                     {"name": "gpu-nf4", "format": "pytorch", "quantize": "bnb_nf4"}],
        "frontier": {"drop_layers": [1], "mlp_keep": [1.0], "distill_steps": 2, "min_distill_steps": 1},
        "prune": {"drop_layers": 1, "calibration_samples": 4},
        "distill": {"steps": 2, "batch_size": 2},
        "measure": {"threads": 1, "decode_tokens": 8, "runs": 1, "eval_samples": 2},
        "output": {"dir": str(out)},
    }
    cfg.update(extra)
    return cfg


def test_compress_end_to_end(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "compress"
    cfg = write_yaml(tmp_path / "c.yaml", compress_config(tiny_model_dir, tiny_data, out))
    r = run_cli(["compress", "--config", cfg], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = (out / "latest").resolve()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stage"] == "compress"
    assert (ROOT / manifest["parent"]["model_dir"]).resolve() == tiny_model_dir.resolve()  # relative to the cwd
    for f in run.rglob("*.json"):  # no absolute path of this machine in manifests and reports (but for the
        text = json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "config"})  # user's config)
        assert str(ROOT) not in text and str(tmp_path) not in text, f
    # every built variant: model files, its own manifest with measurements and a gate verdict
    int8 = json.loads((run / "onnx-int8" / "manifest.json").read_text())
    fp32 = json.loads((run / "onnx-fp32" / "manifest.json").read_text())
    assert int8["serve"]["backend"] == "onnxruntime" and (run / "onnx-int8" / int8["serve"]["file_name"]).is_file()
    assert int8["summary"]["size_mb"] < fp32["summary"]["size_mb"]
    assert fp32["build"]["parity"]["greedy_identical"] == 1.0
    for m in (int8, fp32):
        assert m["summary"]["decode_tokens_per_s"] > 0 and m["summary"]["perplexity"] > 1
        assert m["summary"]["batch_decode_tokens_per_s"] > 0  # measure.batch (8) requests at once
        assert set(m["gate"]) >= {"fit", "drop", "score", "reference"}
    depth = json.loads((run / "pt-depth" / "manifest.json").read_text())
    assert json.loads((run / "pt-depth" / "config.json").read_text())["num_hidden_layers"] == 1
    assert depth["summary"]["params_m"] < json.loads((run / "report.json").read_text())["rows"][0]["params_m"]
    assert depth["build"]["distill"]["steps"] >= 1
    # the frontier point: pruned by its own setting, distilled, quantized, in the report and the frontier plot
    point = json.loads((run / "pruned-d1-w1-int8-block" / "manifest.json").read_text())
    assert point["build"]["prune_depth"]["layers_after"] == 1 and point["build"]["quantize"]["method"] == "int8_block"
    assert (run / "frontier.png").stat().st_size > 10_000
    int4 = json.loads((run / "onnx-int4" / "manifest.json").read_text())
    assert int4["build"]["quantize"]["scheme"] == "base_grid" and int4["summary"]["size_mb"] < fp32["summary"]["size_mb"]
    # per-phase timings, summed over the run
    assert {"export", "parity", "quantize", "prune", "distill", "measure speed", "measure generation"} <= set(
        manifest["timings"]), manifest["timings"]
    assert "time: " in r.stdout
    # no GPU here: the GPU variant is skipped with its reason, not built and not silently dropped
    assert "skipped" in manifest["variants"]["gpu-nf4"] and not (run / "gpu-nf4").exists()
    md = (run / "report.md").read_text()
    for name in ("reference", "onnx-fp32", "onnx-int8", "onnx-int4", "pt-depth", "gpu-nf4", "pruned-d1-w1-int8-block"):
        assert name in md
    assert (run / "report.png").stat().st_size > 10_000
    assert not (run / "_work").exists()
    rec = manifest["recommended"]
    assert rec is None or manifest["variants"][rec]["fit"]
    assert "report.md" in r.stdout or "| variant |" in r.stdout


def test_missing_input_is_one_clear_error(tmp_path, tiny_model_dir, tiny_data):
    cfg = write_yaml(tmp_path / "c.yaml", compress_config(tiny_model_dir, tiny_data, tmp_path / "o",
                                                          input=str(tmp_path / "nope")))
    r = run_cli(["compress", "--config", cfg])
    assert r.returncode == 2
    assert "nope" in r.stderr and "input not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_plain_folder_without_data_section_is_refused(tmp_path, tiny_model_dir, tiny_data):
    d = compress_config(tiny_model_dir, tiny_data, tmp_path / "o")
    d.pop("data")
    r = run_cli(["compress", "--config", write_yaml(tmp_path / "c.yaml", d)])
    assert r.returncode == 2 and "field 'data'" in r.stderr, r.stderr


@pytest.mark.parametrize("variant, message", [
    ({"name": "x", "quantize": "int8_dynamic", "format": "pytorch"}, "set format: onnx"),
    ({"name": "x", "quantize": "gptq"}, "set format: pytorch"),
    ({"name": "bad name!"}, "not a usable folder name"),
    ({"name": "x", "prune": "sideways"}, "variants.0.prune"),
])
def test_bad_variant_names_the_field(tmp_path, tiny_model_dir, tiny_data, variant, message):
    cfg = write_yaml(tmp_path / "c.yaml", compress_config(tiny_model_dir, tiny_data, tmp_path / "o",
                                                          variants=[variant]))
    r = run_cli(["compress", "--config", cfg])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "c.yaml" in r.stderr


def test_duplicate_variant_names_refused():
    from compression.config import CompressConfig
    from core.config import validate
    from core.errors import StackError

    with pytest.raises(StackError, match="onnx-int8 repeated"):
        validate(CompressConfig, {"variants": [{"name": "onnx-int8"}, {"name": "onnx-int8"}]})


def test_gate_and_recommendation_rules():
    from compression.config import CompressConfig
    from compression.run import gate, recommend

    cfg = CompressConfig()
    ref = {"task": {"exact_match": 0.9}}
    fields = ["category"]
    assert gate(ref, {"task": {"exact_match": 0.88}}, cfg, fields)["fit"]        # 2 points: allowed
    assert not gate(ref, {"task": {"exact_match": 0.87}}, cfg, fields)["fit"]    # 3 points: unfit
    rows = [{"name": "reference", "fit": True, "size_mb": 500, "decode_tokens_per_s": 20},
            {"name": "a", "fit": True, "size_mb": 130, "decode_tokens_per_s": 40},
            {"name": "b", "fit": True, "size_mb": 90, "decode_tokens_per_s": 35},
            {"name": "c", "fit": False, "size_mb": 50, "decode_tokens_per_s": 90},
            {"name": "d", "skipped": "needs a GPU"}]
    assert recommend(rows, "fastest") == "a"
    assert recommend(rows, "smallest") == "b"
    assert recommend([rows[0], rows[3]], "fastest") is None
    # timed at the serving batch too: ranked there (b decodes more at batch 8 though less at batch 1)
    batched = [dict(r, batch_decode_tokens_per_s=t) for r, t in zip(rows, [60, 100, 150, 300, None])]
    assert recommend(batched, "fastest") == "b"


def test_compress_help_lists_every_option():
    r = run_cli(["compress", "--help"])
    assert r.returncode == 0
    for key in ("prune.drop_layers", "distill.temperature", "quantize.int4_block_size", "measure.decode_tokens",
                "gate.max_task_drop", "variants"):
        assert key in r.stdout, key


def test_reference_quality_is_reused_from_training_only_for_the_same_rows(tmp_path):
    from compression.run import training_quality

    rows = [{"source": f"test.jsonl:{i}"} for i in (1, 2, 3)]
    after = {"loss": 0.1, "perplexity": 1.105, "answer_tokens": 30, "n": 3, "json_valid": 1.0,
             "field_accuracy": {"a": 1.0}, "exact_match": 0.67}
    manifest = {"stage": "train", "metrics": {"after": after}}
    preds = [{"source": r["source"], "prediction": f"p{i}"} for i, r in enumerate(rows)]
    (tmp_path / "predictions_after.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    got = training_quality(tmp_path, manifest, rows, same_eval=True)
    assert got["task"] == {"json_valid": 1.0, "field_accuracy": {"a": 1.0}, "exact_match": 0.67}
    assert got["perplexity"] == 1.105 and got["predictions"] == ["p0", "p1", "p2"]
    assert training_quality(tmp_path, manifest, rows, same_eval=False) is None  # compress overrides eval settings
    assert training_quality(tmp_path, manifest, rows[:2], same_eval=True) is None  # other row count
    assert training_quality(tmp_path, manifest, [{"source": "x"}] * 3, same_eval=True) is None  # other rows
    assert training_quality(tmp_path, {"stage": "compress"}, rows, same_eval=True) is None
    (tmp_path / "predictions_after.jsonl").unlink()
    assert training_quality(tmp_path, manifest, rows, same_eval=True) is None


def test_fast_path_builds_only_what_it_serves(tmp_path, tiny_model_dir, tiny_data):
    """`compress --fast` (make serve without a compress run): the first fast variant that passes the gate, a normal
    compress artifact that serving resolves to it."""
    from serving.model_ref import resolve

    out = tmp_path / "compress"
    cfg = write_yaml(tmp_path / "c.yaml", compress_config(
        tiny_model_dir, tiny_data, out, variants=[{"name": "onnx-fp32"}, {"name": "onnx-int8", "quantize": "int8_block"},
                                                  {"name": "onnx-int4", "quantize": "int4"}]))
    r = run_cli(["compress", "--fast", "--config", cfg], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = (out / "latest").resolve()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["fast"] is True and list(manifest["variants"]) == ["onnx-int8"]
    assert manifest["recommended"] == "onnx-int8" and manifest["variants"]["onnx-int8"]["gate"]["fit"]
    assert not (run / "onnx-fp32").exists() and not (run / "onnx-int4").exists()
    variant = json.loads((run / "onnx-int8" / "manifest.json").read_text())
    assert variant["parent"]["model_dir"] and variant["build"]["quantize"]["method"] == "int8_block"
    ref = resolve(run)
    assert ref.folder == (run / "onnx-int8") and ref.backend == "onnxruntime" and ref.lineage["variant"] == "onnx-int8"


def test_fast_path_names_an_unknown_variant(tmp_path, tiny_model_dir, tiny_data):
    cfg = write_yaml(tmp_path / "c.yaml", compress_config(tiny_model_dir, tiny_data, tmp_path / "o",
                                                          fast={"variants": ["onnx-int3"]}))
    r = run_cli(["compress", "--fast", "--config", cfg])
    assert r.returncode == 2 and "fast.variants" in r.stderr and "onnx-int3" in r.stderr, r.stderr


def test_frontier_points_and_their_budgets(tiny_model_dir, tiny_data, tmp_path):
    """The frontier grid becomes variants; the deepest cut gets the whole distillation budget, smaller cuts a share."""
    from compression.config import CompressConfig
    from compression.run import variants
    from core.config import validate

    cfg = validate(CompressConfig, {**compress_config(tiny_model_dir, tiny_data, tmp_path / "o"),
                                    "frontier": {"drop_layers": [0, 1], "mlp_keep": [1.0, 0.5], "distill_steps": 40,
                                                 "min_distill_steps": 5}})
    points = {v.name: v for v in variants(cfg) if v.name.startswith("pruned-")}
    assert set(points) == {"pruned-d0-w0.5-int8-block", "pruned-d1-w1-int8-block", "pruned-d1-w0.5-int8-block"}
    deepest = points["pruned-d1-w0.5-int8-block"]
    assert deepest.prune == "depth+width" and deepest.distill_steps == 40
    assert points["pruned-d1-w1-int8-block"].prune == "depth" and 5 <= points["pruned-d1-w1-int8-block"].distill_steps < 40
    assert points["pruned-d0-w0.5-int8-block"].prune == "width" and points["pruned-d0-w0.5-int8-block"].mlp_keep == 0.5


def _training_artifact(folder: Path, tiny_model_dir: Path, tiny_data: dict, config: dict | None = None) -> Path:
    """A training artifact as compression reads it: a manifest whose config records the data and eval settings, the
    merged model, and data/<split>.jsonl (the rows the training run kept)."""
    from chatdata import pipeline, splits
    from chatdata.config import DataCfg
    from core.config import validate
    from modeling.model import load_tokenizer

    data = compress_config(tiny_model_dir, tiny_data, folder)["data"]
    config = config or {"data": data, "eval": {"max_new_tokens": 4, "json_fields": ["category"]},
                        "train": {"seed": 3}}
    shutil.copytree(tiny_model_dir, folder / "merged")
    prepared = pipeline.prepare(validate(DataCfg, data), load_tokenizer(str(tiny_model_dir)), 3)
    prepared.test = prepared.test[1:]  # the training run's own rows, which a rerun of the pipeline would not give
    splits.save(prepared, folder / "data")
    (folder / "manifest.json").write_text(json.dumps({"stage": "train", "run_id": "r1", "config": config}))
    return folder


def _prepare(folder: Path, compress_data=None):
    from compression.config import CompressConfig
    from compression.run import _settings, prepare_data, resolve_input
    from core.config import validate
    from modeling.model import load_tokenizer

    cfg = validate(CompressConfig, {"input": str(folder), "data": compress_data})
    model_dir, manifest = resolve_input(cfg.input)
    data_cfg, eval_cfg, seed = _settings(cfg, manifest)
    return prepare_data(cfg, data_cfg, seed, load_tokenizer(str(model_dir))), eval_cfg, seed


def test_a_training_artifact_gives_its_own_splits_and_eval_settings(tmp_path, tiny_model_dir, tiny_data):
    art = _training_artifact(tmp_path / "train-run", tiny_model_dir, tiny_data)
    prepared, eval_cfg, seed = _prepare(art)
    saved = [json.loads(line)["source"] for line in (art / "data" / "test.jsonl").read_text().splitlines()]
    assert [e.source for e in prepared.test] == saved and len(saved) == 3
    assert all(e.input_ids and any(t != -100 for t in e.labels) for e in prepared.train)
    assert eval_cfg.max_new_tokens == 4 and eval_cfg.json_fields == ["category"] and seed == 3
    # without data/ (an artifact of an older version): the pipeline runs again on the manifest's data settings
    shutil.rmtree(art / "data")
    rerun, _, _ = _prepare(art)
    assert len(rerun.test) == 4 and [e.source for e in rerun.test][1:] == saved


def test_a_damaged_training_artifact_is_named(tmp_path, tiny_model_dir, tiny_data):
    from core.errors import ArtifactError, ConfigError

    art = _training_artifact(tmp_path / "train-run", tiny_model_dir, tiny_data)
    test_file = art / "data" / "test.jsonl"
    test_file.write_text(test_file.read_text() + "{not json\n")
    with pytest.raises(ArtifactError) as exc:
        _prepare(art)
    assert exc.value.file == test_file and exc.value.line == 4 and "llmstack train" in exc.value.hint
    art2 = _training_artifact(tmp_path / "train-run-2", tiny_model_dir, tiny_data,
                              config={"data": {"max_seq_len": "long"}, "eval": {}})
    with pytest.raises(ConfigError) as exc:
        _prepare(art2)
    assert exc.value.field == "config.data" and "max_seq_len" in str(exc.value) and "llmstack train" in exc.value.hint
