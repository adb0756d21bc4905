"""ONNX Runtime backend: an optimum-exported decoder with KV cache (inputs input_ids, attention_mask, position_ids,
past_key_values.N.key/value; outputs logits, present.N.key/value), run by a plain InferenceSession so the engine
controls the cache (optimum's ORTModelForCausalLM owns it per `generate` call, which rules out continuous batching)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import ArtifactError, one_line


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, folder: str | Path, file_name: str = "model.onnx", threads: int = 0):
        import onnxruntime as ort

        path = Path(folder) / file_name
        if not path.is_file():
            raise ArtifactError(f"no ONNX model {file_name} in {folder}", file=folder,
                                hint="point serve.model at a compress variant folder (or run make compress)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ArtifactError(f"ONNX Runtime cannot load {file_name}: {one_line(exc)}",
                                file=folder) from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        if "input_ids" not in inputs or not self.past_names:
            raise ArtifactError(f"{file_name} is not a decoder exported with KV cache (inputs: "
                                f"{', '.join(list(inputs)[:6])}); export with task text-generation-with-past",
                                file=folder)
        self.has_positions = "position_ids" in inputs
        first = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(first[1]), int(first[3])
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32

    def forward(self, input_ids, attention_mask, position_ids, past):
        b = input_ids.shape[0]
        if past is None:
            empty = np.zeros((b, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            past = [empty] * len(self.past_names)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_positions:
            feed["position_ids"] = position_ids
        feed.update(zip(self.past_names, past))
        out = self.session.run(["logits"] + self.present_names, feed)
        return out[0][:, -1, :].astype(np.float32, copy=False), out[1:]


def _layer_order(name: str) -> tuple[int, int]:
    _, layer, kind = name.split(".")
    return int(layer), 0 if kind == "key" else 1
