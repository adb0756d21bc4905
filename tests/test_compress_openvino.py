"""An OpenVINO variant in `llmstack compress` on the tiny model: exported by optimum-intel in the OpenVINO environment,
measured through the OpenVINO GenAI worker like every other variant (speed, greedy task score, agreement with the
input model), gated, and resolved by `llmstack serve` to the openvino backend."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli, write_yaml
from test_compress_run import compress_config

OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
needs_openvino = pytest.mark.skipif(not OV_PYTHON.exists(), reason="no OpenVINO environment (.venv-openvino): "
                                    "`make openvino-env` installs it (make test does)")


@needs_openvino
def test_openvino_variant_is_built_measured_gated_and_served(tmp_path, tiny_model_dir, tiny_data):
    from serving.model_ref import resolve
    out = tmp_path / "compress"
    cfg = compress_config(tiny_model_dir, tiny_data, out, openvino={"python": str(OV_PYTHON), "inference_precision": "f32"},
                          variants=[{"name": "onnx-fp32"},
                                    {"name": "ov-fp32", "format": "openvino", "openvino_weights": "fp32"}],
                          frontier={"drop_layers": []}, gate={"max_task_drop": 1.0, "recommend": "smallest"})
    r = run_cli(["compress", "--config", write_yaml(tmp_path / "c.yaml", cfg)], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = (out / "latest").resolve()
    ov = json.loads((run / "ov-fp32" / "manifest.json").read_text())
    onnx = json.loads((run / "onnx-fp32" / "manifest.json").read_text())
    assert (run / "ov-fp32" / "openvino_model.xml").is_file() and ov["serve"]["backend"] == "openvino"
    assert ov["build"]["weights"] == "fp32" and ov["build"]["export_seconds"] > 0
    assert ov["summary"]["decode_tokens_per_s"] > 0 and ov["summary"]["perplexity"] is None  # no logits from GenAI
    assert ov["summary"]["batch_decode_tokens_per_s"] > 0 and onnx["summary"]["batch_decode_tokens_per_s"] > 0
    assert ov["summary"]["agreement"] == onnx["summary"]["agreement"] == 1.0  # fp32 greedy = the input model's
    assert ov["gate"]["fit"] is True
    assert ov["summary"]["load_peak_rss_mb"] > 0  # the worker's own memory, not the measuring process's
    ref = resolve(run / "ov-fp32")
    assert (ref.backend, ref.name, ref.lineage["variant"]) == ("openvino", "ov-fp32", "ov-fp32")
    report = (run / "report.md").read_text()
    assert "| ov-fp32 |" in report or "| **ov-fp32** |" in report


def test_openvino_variant_refuses_an_onnx_quantizer(tmp_path, tiny_model_dir, tiny_data):
    cfg = compress_config(tiny_model_dir, tiny_data, tmp_path / "out",
                          variants=[{"name": "ov", "format": "openvino", "quantize": "int8_block"}])
    r = run_cli(["compress", "--config", write_yaml(tmp_path / "c.yaml", cfg)], timeout=120)
    assert r.returncode == 2 and "openvino_weights" in r.stderr and "variants" in r.stderr
