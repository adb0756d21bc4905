"""int8 with activation quantization through ONNX Runtime's QDQ/QOperator quantizers (MatMulInteger et al.):

- `int8_dynamic`: int8 weights per output channel, activations quantized on the fly with one scale per tensor
  (optimum's ORTQuantizer, preset by instruction set);
- `int8_static`: int8 weights and activations, activation ranges calibrated on token sequences.

One scale per activation tensor is what makes these fragile on small decoders (outlier channels eat the range): see
`int8_block` in `nbits.py` for the per-block scheme the demo uses.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from core.errors import CompressError

from .common import (copy_side, expect_graph, failing_as, load_graph, prepare_out, quiet_root, resolve_preset, save,
                     source)
from .nbits import untie_lm_head


def int8_dynamic(onnx_dir, out_dir, preset: str = "auto", per_channel: bool = True) -> Path:
    """Dynamic int8 quantization (optimum's ORTQuantizer + AutoQuantizationConfig.<preset>); returns out_dir."""
    src, graph = source(onnx_dir)
    preset = resolve_preset(preset)
    out = prepare_out(out_dir, src)
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    weight_nodes = _weight_nodes(load_graph(graph, weights=False))
    qconfig = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=per_channel,
                                                      nodes_to_quantize=weight_nodes)
    with failing_as("int8 dynamic quantization", src):
        quantizer = ORTQuantizer.from_pretrained(src, file_name=graph.name)
        with quiet_root():
            quantizer.quantize(quantization_config=qconfig, save_dir=out, file_suffix="")
    copy_side(src, out)
    expect_graph(out)
    return out


def _weight_nodes(model) -> list[str]:
    """Nodes that read a weight: MatMuls whose second input is an initializer (or a Transpose of one: a tied LM
    head), those Transposes, and Gathers on an initializer table. Attention's activation x activation MatMuls are
    left out: quantizing queries, keys and values on the fly at every step costs time and accuracy, saves no bytes."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    transposed = {n.output[0]: n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    names = []
    for n in graph.node:
        if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in transposed):
            names.append(n.name)
            if n.input[1] in transposed:
                names.append(transposed[n.input[1]])
        elif n.op_type == "Gather" and n.input[0] in inits:
            names.append(n.name)
    return [n for n in dict.fromkeys(names) if n]


def _kv_inputs(model, config: dict) -> dict:
    """name -> (kv_heads, head_dim) for past_key_values.* inputs (static dims from the graph, else the config)."""
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // config["num_attention_heads"])
    out = {}
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
            out[inp.name] = (dims[1] or heads, dims[3] or head_dim) if len(dims) == 4 else (heads, head_dim)
    return out


class PrefillReader:
    """Calibration inputs for a decoder exported with past key values: each token sequence as a prefill step (batch 1,
    attention mask of ones, positions 0..n-1, empty past key values [1, kv_heads, 0, head_dim])."""

    def __init__(self, sequences: list[list[int]], input_names: list[str], kv: dict, kv_dtype="float32"):
        import numpy as np

        self._items = []
        for seq in sequences:
            ids = np.asarray([seq], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "position_ids" in input_names:
                feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
            if "use_cache_branch" in input_names:
                feed["use_cache_branch"] = np.asarray([False])
            for name, (heads, dim) in kv.items():
                feed[name] = np.zeros((1, heads, 0, dim), dtype=kv_dtype)
            self._items.append({k: v for k, v in feed.items() if k in input_names})
        self._it = iter(self._items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._items)


def int8_static(onnx_dir, out_dir, calib_ids: list[list[int]], preset: str = "auto",
                per_channel: bool = True) -> Path:
    """Static int8 quantization (weights and activations), activation ranges calibrated (min/max) on prefill steps
    of the given token id sequences (empty past key values); returns out_dir.

    ONNX Runtime's quantize_static with the preset's data types, QOperator format: QLinearMatMul for every MatMul and
    a Gather on the int8 embedding table; a tied LM head gets its own per-channel int8 weight. (optimum's
    ORTQuantizer.fit takes a `datasets.Dataset` of model inputs, which cannot hold the empty [batch, kv_heads, 0,
    head_dim] past key values a decoder with KV cache needs; the calibration reader here feeds them.)"""
    src, graph = source(onnx_dir)
    if not calib_ids or not all(isinstance(s, (list, tuple)) and len(s) > 0 for s in calib_ids):
        raise CompressError("int8_static needs at least one non-empty calibration token sequence", file=src)
    preset = resolve_preset(preset)
    out = prepare_out(out_dir, src)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qc = getattr(AutoQuantizationConfig, preset)(is_static=True, per_channel=per_channel)
    model = load_graph(graph)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    names = [i.name for i in model.graph.input]
    reader = PrefillReader(calib_ids, names, _kv_inputs(model, config))
    untie_lm_head(model)  # a tied LM head gets its own (per-channel int8) weight instead of a runtime transpose
    with tempfile.TemporaryDirectory(prefix=".calib-", dir=out) as tmp:
        untied = Path(tmp) / "model.onnx"
        save(model, untied)
        del model
        with failing_as("int8 static quantization", src):
            # QOperator: QLinearMatMul and a Gather on the int8 table (a QDQ Gather would dequantize the whole
            # embedding at every step: ONNX Runtime does not constant-fold DequantizeLinear in QDQ models)
            with quiet_root():
                quantize_static(
                    str(untied), str(out / "model.onnx"), reader, quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=["MatMul", "Gather"], per_channel=qc.per_channel,
                    reduce_range=qc.reduce_range,
                    activation_type=qc.activations_dtype, weight_type=qc.weights_dtype,
                    calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
                    extra_options={"ActivationSymmetric": qc.activations_symmetric,
                                   "WeightSymmetric": qc.weights_symmetric},
                    use_external_data_format=False)
    copy_side(src, out)
    expect_graph(out)
    return out
