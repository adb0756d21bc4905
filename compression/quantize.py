"""Quantization of an exported ONNX model for CPU (ONNX Runtime) and of a HF model for GPU serving.

CPU (input: a folder written by `compression.export.export_onnx`; output: a folder `load_ort` loads):
- `int8_dynamic`: int8 weights, activations quantized on the fly (optimum's ORTQuantizer, preset by instruction set);
- `int8_static`: int8 weights and activations, activation ranges calibrated on token sequences;
- `int4`: 4-bit block-quantized weights (ONNX Runtime's MatMulNBits; with `embeddings`, the token embedding becomes a
  GatherBlockQuantized and a tied LM head shares its 4-bit weights).
GPU (`gpu_quantize`: gptq / bitsandbytes int8 / nf4): a HF folder vLLM and transformers load; needs CUDA.
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import tempfile
from pathlib import Path

from llmstack.errors import CompressError, one_line

from .export import SIDE_FILES, copy_side_files, onnx_files
from .gpu_quant import Unavailable, gpu_quantize  # noqa: F401  (every quantizer is reachable from here)

PRESETS = ("avx512_vnni", "avx2", "arm64")


# ---------------------------------------------------------------- helpers
def cpu_preset() -> str:
    """ONNX Runtime int8 preset for this CPU: avx512_vnni, avx2 or arm64 (from /proc/cpuinfo flags, else the
    machine type); x86 CPUs without AVX2 get the avx2 preset (its kernels fall back at run time)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("armv8"):
        return "arm64"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if {"avx512_vnni", "avx512vnni"} & flags:
        return "avx512_vnni"
    return "avx2"


def _resolve_preset(preset: str) -> str:
    if preset == "auto":
        return cpu_preset()
    if preset not in PRESETS:
        raise CompressError(f"unknown int8 preset '{preset}' (auto, {', '.join(PRESETS)})", field="quantize.preset")
    return preset


def _source(onnx_dir) -> tuple[Path, Path]:
    """(folder, the .onnx graph) of an exported model folder."""
    files = onnx_files(onnx_dir)
    folder = Path(onnx_dir)
    graph = folder / "model.onnx" if (folder / "model.onnx").is_file() else files[0]
    if len(files) > 1 and graph.name != "model.onnx":
        raise CompressError(f"several .onnx files and no model.onnx ({', '.join(f.name for f in files)})",
                            file=folder)
    return folder, graph


def _prepare_out(out_dir, src: Path) -> Path:
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise CompressError("the output folder is the input folder", file=out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.onnx")):
        raise CompressError("the output folder already holds an .onnx model", file=out)
    return out


def _copy_side(src: Path, out: Path) -> None:
    """config, generation config and tokenizer next to the quantized graph (everything but the ONNX files)."""
    copy_side_files(src, out, SIDE_FILES)


def _save(model, path: Path) -> None:
    """Save an onnx ModelProto: one file below 2 GB, else with external data next to it."""
    import onnx

    if model.ByteSize() < (2 << 30) - (64 << 20):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)


@contextlib.contextmanager
def _quiet_root():
    """onnxruntime.quantization logs advice through the root logger; keep it to errors while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _failing_as(what: str, src: Path):
    """Any library exception inside becomes one CompressError line naming the step and the source folder."""
    try:
        yield
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"{what} failed ({one_line(exc)})", file=src) from None


def _load_graph(graph: Path, weights: bool = True):
    import onnx

    try:
        return onnx.load_model(str(graph), load_external_data=weights)
    except Exception as exc:
        raise CompressError(f"{graph.name} is not a readable ONNX model ({one_line(exc)})",
                            file=graph.parent) from None


# ---------------------------------------------------------------- int8
def int8_dynamic(onnx_dir, out_dir, preset: str = "auto", per_channel: bool = True) -> Path:
    """Dynamic int8 quantization (optimum's ORTQuantizer + AutoQuantizationConfig.<preset>); returns out_dir."""
    src, graph = _source(onnx_dir)
    preset = _resolve_preset(preset)
    out = _prepare_out(out_dir, src)
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    weight_nodes = _weight_nodes(_load_graph(graph, weights=False))
    qconfig = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=per_channel,
                                                      nodes_to_quantize=weight_nodes)
    with _failing_as("int8 dynamic quantization", src):
        quantizer = ORTQuantizer.from_pretrained(src, file_name=graph.name)
        with _quiet_root():
            quantizer.quantize(quantization_config=qconfig, save_dir=out, file_suffix="")
    _copy_side(src, out)
    _expect_graph(out)
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


def _expect_graph(out: Path) -> None:
    if not (out / "model.onnx").is_file():
        raise CompressError("quantization wrote no model.onnx", file=out)


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
    src, graph = _source(onnx_dir)
    if not calib_ids or not all(isinstance(s, (list, tuple)) and len(s) > 0 for s in calib_ids):
        raise CompressError("int8_static needs at least one non-empty calibration token sequence", file=src)
    preset = _resolve_preset(preset)
    out = _prepare_out(out_dir, src)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qc = getattr(AutoQuantizationConfig, preset)(is_static=True, per_channel=per_channel)
    model = _load_graph(graph)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    names = [i.name for i in model.graph.input]
    reader = PrefillReader(calib_ids, names, _kv_inputs(model, config))
    _untie_lm_head(model)  # a tied LM head gets its own (per-channel int8) weight instead of a runtime transpose
    with tempfile.TemporaryDirectory(prefix=".calib-", dir=out) as tmp:
        untied = Path(tmp) / "model.onnx"
        _save(model, untied)
        del model
        with _failing_as("int8 static quantization", src):
            # QOperator: QLinearMatMul and a Gather on the int8 table (a QDQ Gather would dequantize the whole
            # embedding at every step: ONNX Runtime does not constant-fold DequantizeLinear in QDQ models)
            with _quiet_root():
                quantize_static(
                    str(untied), str(out / "model.onnx"), reader, quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=["MatMul", "Gather"], per_channel=qc.per_channel,
                    reduce_range=qc.reduce_range,
                    activation_type=qc.activations_dtype, weight_type=qc.weights_dtype,
                    calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
                    extra_options={"ActivationSymmetric": qc.activations_symmetric,
                                   "WeightSymmetric": qc.weights_symmetric},
                    use_external_data_format=False)
    _copy_side(src, out)
    _expect_graph(out)
    return out


# ---------------------------------------------------------------- int4
def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def _untie_lm_head(model) -> list[tuple[str, str, list[str]]]:
    """Give every MatMul that multiplies by a transposed initializer (the LM head tied to the token embedding) a plain
    initializer holding the transposed weight, so the 4-bit quantizer can turn it into a MatMulNBits. Returns
    [(embedding initializer, new head initializer, [Gather nodes reading the embedding])] for the heads whose weight
    is also a Gather's table (a tied embedding)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = _producers(graph)
    gathers: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type == "Gather" and n.input[0] in inits:
            gathers.setdefault(n.input[0], []).append(n.name)
    tied, dead = [], set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        weight = inits[tr.input[0]]
        if len(weight.dims) != 2:
            continue
        perm = [list(a.ints) for a in tr.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            continue
        name = f"{tr.input[0]}.T"
        if name not in inits:
            t = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name)
            graph.initializer.append(t)
            inits[name] = t
        node.input[1] = name
        dead.add(tr.output[0])
        if tr.input[0] in gathers and all(gathers[tr.input[0]]):
            tied.append((tr.input[0], name, gathers[tr.input[0]]))
    still_used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in dead]:
        if node.output[0] not in still_used:
            graph.node.remove(node)
    return tied


def _share_tied(model, tied: list[tuple[str, str, list[str]]], block_size: int) -> int:
    """After quantization: replace the (left unquantized) Gather of each tied embedding by a GatherBlockQuantized that
    reads the LM head's MatMulNBits weights: the same [vocab, hidden] matrix with blocks along hidden, the same scales
    and zero points (a uint8 table with two 4-bit values per byte; without zero points both ops use 8). The table is
    the head's weight through a constant Reshape ([vocab, blocks, block/2] -> [vocab, hidden/2]), so it is stored
    once. Returns how many embeddings are shared."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shared = 0
    for emb, head, gather_names in tied:
        mm = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{head}_Q4"), None)
        gathers = [n for n in graph.node if n.op_type == "Gather" and n.name in gather_names and n.input[0] == emb]
        if mm is None or not gathers or mm.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
        vocab, hidden = attrs["N"], attrs["K"]
        if attrs.get("bits", 4) != 4 or hidden % block_size:
            continue
        if any({a.name: helper.get_attribute_value(a) for a in g.attribute}.get("axis", 0) != 0 for g in gathers):
            continue
        table, shape = f"{head}_Q4_table", f"{head}_Q4_table_shape"
        graph.initializer.append(numpy_helper.from_array(np.asarray([vocab, hidden // 2], dtype=np.int64), shape))
        for g in gathers:
            inputs = [table, g.input[1], mm.input[2]] + ([mm.input[3]] if len(mm.input) > 3 and mm.input[3] else [])
            new = helper.make_node("GatherBlockQuantized", inputs, list(g.output), name=f"{g.name}_Q4",
                                   domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block_size,
                                   bits=4)
            at = list(graph.node).index(g)
            graph.node.remove(g)
            graph.node.insert(at, new)
        graph.node.insert(0, helper.make_node("Reshape", [mm.input[1], shape], [table], name=f"{table}_Reshape"))
        shared += 1
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return shared


def int4(onnx_dir, out_dir, block_size: int = 32, symmetric: bool = True, embeddings: bool = True,
         accuracy_level: int | None = None) -> Path:
    """4-bit weight-only block quantization with ONNX Runtime's MatMulNBits; returns out_dir.

    embeddings: also quantize the token embedding (Gather -> GatherBlockQuantized) and the LM head; a head tied to
    the embedding (a MatMul on the transposed embedding) is first given its own weight so that it becomes a
    MatMulNBits, then the embedding lookup reads the head's 4-bit weights (one copy on disk).
    accuracy_level: MatMulNBits compute precision (None: the kernel default; 4: int8 activations, faster)."""
    src, graph = _source(onnx_dir)
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise CompressError(f"int4 block size {block_size} is not a power of two >= 16",
                            field="quantize.int4_block_size")
    out = _prepare_out(out_dir, src)
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = _load_graph(graph)
    tied = _untie_lm_head(model) if embeddings else []
    # a tied embedding is shared with the head's MatMulNBits afterwards (hidden size a multiple of the block size);
    # any other embedding table becomes a GatherBlockQuantized of its own
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    tied = [t for t in tied if dims[t[0]][1] % block_size == 0]
    shared_gathers = {g for _, _, names in tied for g in names}
    import onnx

    float2d = {n for n, d in dims.items() if len(d) == 2} & {
        t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    other_gathers = [n for n in model.graph.node
                     if n.op_type == "Gather" and n.input[0] in float2d and n.name not in shared_gathers]
    ops = ("MatMul", "Gather") if embeddings and other_gathers else ("MatMul",)
    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                        quant_format=QuantFormat.QOperator, op_types_to_quantize=ops,
                                        quant_axes=(("MatMul", 0), ("Gather", 1)))
    with _failing_as("int4 quantization", src):
        quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level, algo_config=algo,
                                         nodes_to_exclude=sorted(shared_gathers))
        quantizer.process()
        qmodel = quantizer.model.model
        if tied:
            _share_tied(qmodel, tied, block_size)
        _save(qmodel, out / "model.onnx")
    _copy_side(src, out)
    return out
