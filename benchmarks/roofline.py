"""The machine's ceiling for serving one model: how many output tokens/s a decode step could give at best.

Method (measured here, with the same runtime as the served variant, ONNX Runtime on the CPU):
- Memory bandwidth: the median of repeated copies of a 256 MiB buffer (numpy), bytes read + written per second.
- Weight matrix throughput: ONE ONNX Runtime session holding every weight MatMul of the model's decoder (q, k, v, o,
  gate, up, down per layer, and the LM head; shapes from its config.json) in the served variant's form (MatMulNBits
  with its bits / block size / accuracy level, or float32 MatMul), run on M = c rows at once: the time of a decode
  step's matrix work at concurrency c (weights read once per step, compute per token). The median of several runs.
- Roofline at concurrency c: c / max(weight bytes / bandwidth, matrix time at M = c). Attention, norms, sampling and
  the engine's bookkeeping come on top, so a real engine reaches a fraction of it; "ours / roofline" says which.

    python benchmarks/roofline.py artifacts/compress/latest/onnx-int8 [--concurrency 1,8,16,32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def bandwidth_gbps(mib: int = 256, runs: int = 7) -> float:
    """Copy bandwidth (bytes read + written per second, GB/s) of a buffer far larger than the caches."""
    a = np.ones(mib << 18, dtype=np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return round(2 * a.nbytes / statistics.median(times) / 1e9, 2)


def shapes(config: dict) -> list[tuple[int, int, int]]:
    """(K, N, count) of every weight MatMul of a Llama-family decoder step."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    per_layer = [(h, heads * head_dim), (h, kv * head_dim), (h, kv * head_dim), (heads * head_dim, h),
                 (h, inter), (h, inter), (inter, h)]
    return [(k, n, layers) for k, n in per_layer] + [(h, config["vocab_size"], 1)]


def weight_form(onnx_path: Path) -> dict:
    """How the served graph stores its weights: the first MatMulNBits' bits / block / accuracy level, else fp32."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            return {"kind": "MatMulNBits", "bits": attrs["bits"], "block_size": attrs["block_size"],
                    "accuracy_level": attrs.get("accuracy_level", 0)}
    return {"kind": "MatMul", "bits": 32}


def _graph(mats: list[tuple[int, int, int]], form: dict):
    """An ONNX model with one weight MatMul per (K, N) x count, all fed by inputs x<K> of shape [M, K]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    inputs = {k: helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["M", k]) for k, _, _ in mats}
    for i, (k, n, count) in enumerate(mats):
        for j in range(count):
            name, out = f"w{i}_{j}", f"y{i}_{j}"
            if form["kind"] == "MatMulNBits":
                bits, block = form["bits"], form["block_size"]
                blocks = -(-k // block)
                codes = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
                scales = (rng.random(n * blocks, dtype=np.float32) + 0.5) * 1e-2
                inits += [numpy_helper.from_array(codes, name), numpy_helper.from_array(scales, name + "_s")]
                nodes.append(helper.make_node("MatMulNBits", [f"x{k}", name, name + "_s"], [out], domain="com.microsoft",
                                              K=k, N=n, bits=bits, block_size=block,
                                              accuracy_level=form["accuracy_level"]))
            else:
                inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, name))
                nodes.append(helper.make_node("MatMul", [f"x{k}", name], [out]))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(nodes, "decode_step_weights", list(inputs.values()), outputs, inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def matrix_seconds(mats, form: dict, ms: list[int], threads: int, runs: int = 9) -> dict[int, float]:
    """Median seconds of one run of every weight MatMul on M rows, for each M."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(_graph(mats, form).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = {}
    for m in ms:
        feed = {f"x{k}": np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
                for k in {k for k, _, _ in mats}}
        sess.run(None, feed)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        out[m] = statistics.median(times)
    return out


def ceiling(variant: str | Path, concurrency: list[int], threads: int = 0) -> dict:
    """The roofline of the ONNX variant in `variant` at each concurrency (see the module docstring)."""
    folder = Path(variant)
    config = json.loads((folder / "config.json").read_text())
    onnx_file = next(iter(sorted(folder.glob("*.onnx"))))
    form = weight_form(onnx_file)
    mats = shapes(config)
    params = sum(k * n * count for k, n, count in mats)
    weight_bytes = params * form["bits"] / 8  # scales add ~1/16 at 8-bit blocks of 32; left out: a ceiling
    bw = bandwidth_gbps()
    mat = matrix_seconds(mats, form, concurrency, threads)
    levels = {}
    for c in concurrency:
        memory_s = weight_bytes / (bw * 1e9)
        step = max(memory_s, mat[c])
        levels[c] = {"tokens_per_s": round(c / step, 1), "bound": "memory" if memory_s >= mat[c] else "matrix",
                     "matrix_ms": round(1000 * mat[c], 2), "weights_at_bandwidth_ms": round(1000 * memory_s, 2)}
    return {"method": "c / max(weight bytes / copy bandwidth, measured time of every weight MatMul at M = c)",
            "weights": form, "matmul_params_m": round(params / 1e6, 1), "weight_mb": round(weight_bytes / 1e6, 1),
            "bandwidth_gbps": bw, "levels": levels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", help="an ONNX variant folder (config.json + *.onnx), e.g. artifacts/compress/latest/onnx-int8")
    p.add_argument("--concurrency", default="1,8,16,32", help="comma-separated concurrencies (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    args = p.parse_args()
    print(json.dumps(ceiling(args.variant, [int(c) for c in args.concurrency.split(",")], args.threads), indent=1))


if __name__ == "__main__":
    main()
