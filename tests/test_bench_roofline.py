"""benchmarks/roofline.py on the tiny model: the decoder's weight MatMuls derived from config.json are the ones the
real ONNX export holds, the weight form is read from the graph, and the roofline follows its own definition."""
from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import roofline  # noqa: E402


def _weight_matmuls(onnx_path) -> list[tuple[int, int]]:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    return sorted(tuple(inits[n.input[1]]) for n in model.graph.node
                  if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2)


def test_shapes_from_config_match_the_exported_graph(tiny_onnx_dir):
    config = json.loads((tiny_onnx_dir / "config.json").read_text())
    derived = sorted((k, n) for k, n, count in roofline.shapes(config) for _ in range(count))
    exported = _weight_matmuls(tiny_onnx_dir / "model.onnx")
    lm_head = (config["hidden_size"], config["vocab_size"])
    if lm_head not in exported:  # a tied head is exported as a MatMul on the transposed embedding, not an initializer
        derived.remove(lm_head)
    assert derived == exported


def test_ceiling_on_the_tiny_model_follows_the_definition(tiny_onnx_dir):
    out = roofline.ceiling(tiny_onnx_dir, [1, 4], threads=1)
    assert out["weights"] == {"kind": "MatMul", "bits": 32}  # the plain export keeps float32 weights
    assert out["bandwidth_gbps"] > 0
    for c, level in out["levels"].items():
        step_ms = max(level["matrix_ms"], level["weights_at_bandwidth_ms"], 0.01)
        rounding = 0.006 / step_ms  # the milliseconds are rounded to 0.01
        assert abs(level["tokens_per_s"] - c / step_ms * 1000) <= rounding * level["tokens_per_s"] + 0.1
        if level["weights_at_bandwidth_ms"] != level["matrix_ms"]:  # equal after rounding: either may be the bound
            assert level["bound"] == ("memory" if level["weights_at_bandwidth_ms"] > level["matrix_ms"] else "matrix")
