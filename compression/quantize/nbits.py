"""Weight-only block quantization with ONNX Runtime's MatMulNBits (and GatherBlockQuantized for the embedding).

Every weight MatMul becomes a MatMulNBits: `bits`-bit codes in blocks of `block_size` weights along the input
dimension, one float scale per block (and a zero point when asymmetric). With `accuracy_level` 4 the kernel quantizes
the activations to int8 per block too and multiplies in int8 (AVX2, AVX-512 VNNI, AMX and ARM kernels in MLAS); with
0 it computes in float, which is exact but dequantizes 8-bit weights at every call (10x slower decode here).

- `int8_block`: 8-bit codes, symmetric blocks of 32 (llama.cpp's Q8_0 layout) with int8 activations per block. The
  same scheme on every CPU: no instruction-set preset, no activation outliers eating a per-tensor range.
- `int4`: 4-bit codes (RTN symmetric or asymmetric, k-quant or HQQ from ONNX Runtime's quantizer), optionally with
  the MatMuls named in `int8_nodes` kept at 8 bits (mixed precision chosen by measured sensitivity).

A LM head tied to the token embedding (a MatMul on the transposed embedding) is first given its own weight
(`untie_lm_head`) so it becomes a MatMulNBits; afterwards the embedding lookup reads the head's quantized table
through a GatherBlockQuantized (`share_tied`), so the table is stored once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.errors import CompressError

from .common import copy_side, expect_graph, failing_as, load_graph, prepare_out, save, source

ALGORITHMS = ("rtn", "k_quant", "hqq")


@dataclass
class Tied:
    """A token embedding shared with the LM head: the embedding initializer, the head's MatMul output and the Gathers
    that read the embedding."""
    embedding: str
    head_output: str
    gathers: list[str]


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def untie_lm_head(model) -> list[Tied]:
    """Give every MatMul that multiplies by a transposed initializer (the LM head tied to the token embedding) a plain
    initializer holding the transposed weight, so the block quantizer can turn it into a MatMulNBits. Returns the
    heads whose weight is also a Gather's table (a tied embedding)."""
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
            tied.append(Tied(tr.input[0], node.output[0], gathers[tr.input[0]]))
    still_used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in dead]:
        if node.output[0] not in still_used:
            graph.node.remove(node)
    return tied


def share_tied(model, tied: list[Tied]) -> int:
    """After quantization: replace the (left unquantized) Gather of each tied embedding by a GatherBlockQuantized that
    reads the LM head's MatMulNBits weights: the same [vocab, hidden] matrix with blocks along hidden, the same scales
    and zero points (4 bits: two values per byte; without zero points both ops use the midpoint). The table is the
    head's weight through a constant Reshape ([vocab, blocks, block bytes] -> [vocab, hidden bytes]), so it is stored
    once. Returns how many embeddings are shared."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name for t in graph.initializer}
    shared = 0
    for t in tied:
        mm = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == t.head_output), None)
        gathers = [n for n in graph.node if n.op_type == "Gather" and n.name in t.gathers and n.input[0] == t.embedding]
        if mm is None or not gathers or mm.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
        vocab, hidden, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
        if hidden % block or any({a.name: helper.get_attribute_value(a) for a in g.attribute}.get("axis", 0) != 0
                                 for g in gathers):
            continue
        table, shape = f"{mm.input[1]}_table", f"{mm.input[1]}_table_shape"
        graph.initializer.append(numpy_helper.from_array(np.asarray([vocab, hidden * bits // 8], dtype=np.int64),
                                                         shape))
        for g in gathers:
            inputs = [table, g.input[1], mm.input[2]] + ([mm.input[3]] if len(mm.input) > 3 and mm.input[3] else [])
            new = helper.make_node("GatherBlockQuantized", inputs, list(g.output), name=f"{g.name}_Q{bits}",
                                   domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
            at = list(graph.node).index(g)
            graph.node.remove(g)
            graph.node.insert(at, new)
        graph.node.insert(0, helper.make_node("Reshape", [mm.input[1], shape], [table], name=f"{table}_Reshape"))
        shared += 1
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    return shared


def weight_matmuls(model) -> list[str]:
    """Names of the MatMuls whose second input is an initializer (after `untie_lm_head`: the LM head too)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.name]


def _check_block(block_size, field: str) -> None:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise CompressError(f"block size {block_size} is not a power of two >= 16", field=field)


def quantize_matmuls(model, nodes: list[str], bits: int, block_size: int, symmetric: bool,
                     accuracy_level: int | None, algorithm: str = "rtn"):
    """Turn the named MatMuls of `model` into MatMulNBits (in place where the library allows; returns the model)."""
    if not nodes:
        return model
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                                 KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    others = [n for n in weight_matmuls(model) if n not in set(nodes)]
    if algorithm == "rtn" or bits == 8:
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                            accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                            op_types_to_quantize=("MatMul",))
    elif algorithm == "hqq":  # asymmetric by construction
        algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
    elif algorithm == "k_quant":  # asymmetric by construction
        algo = KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    else:
        raise CompressError(f"unknown 4-bit algorithm '{algorithm}' ({', '.join(ALGORITHMS)})",
                            field="quantize.int4_algorithm")
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, algo_config=algo, nodes_to_exclude=others)
    quantizer.process()
    qmodel = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    if accuracy_level:  # HQQ and k-quant leave the attribute out
        from onnx import helper
        for n in qmodel.graph.node:
            if n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in n.attribute):
                n.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    return qmodel


def int8_block(onnx_dir, out_dir, block_size: int = 32, accuracy_level: int | None = 4) -> Path:
    """8-bit symmetric block quantization of every weight MatMul and of a tied embedding; returns out_dir."""
    src, graph = source(onnx_dir)
    _check_block(block_size, "quantize.int8_block_size")
    out = prepare_out(out_dir, src)
    model = load_graph(graph)
    tied = untie_lm_head(model)
    with failing_as("int8 block quantization", src):
        model = quantize_matmuls(model, weight_matmuls(model), 8, block_size, True, accuracy_level)
        share_tied(model, tied)
        save(model, out / "model.onnx")
    copy_side(src, out)
    expect_graph(out)
    return out


def int4(onnx_dir, out_dir, block_size: int = 32, symmetric: bool = False, embeddings: bool = True,
         accuracy_level: int | None = 4, algorithm: str = "rtn", int8_nodes: list[str] | None = None,
         int8_block_size: int = 32) -> Path:
    """4-bit block quantization with ONNX Runtime's MatMulNBits; returns out_dir.

    embeddings: also quantize the token embedding and the LM head (a tied head shares its table with the embedding;
    an untied embedding becomes a GatherBlockQuantized of its own). int8_nodes: MatMul names (as in the exported
    graph, e.g. '/model/layers.3/mlp/down_proj/MatMul') kept at 8 bits. algorithm: rtn (round to nearest, symmetric or
    not), k_quant (llama.cpp's search for each block's scale and minimum) or hqq (half-quadratic optimisation of
    scales and zero points); the last two are asymmetric."""
    src, graph = source(onnx_dir)
    _check_block(block_size, "quantize.int4_block_size")
    if algorithm not in ALGORITHMS:
        raise CompressError(f"unknown 4-bit algorithm '{algorithm}' ({', '.join(ALGORITHMS)})",
                            field="quantize.int4_algorithm")
    out = prepare_out(out_dir, src)
    model = load_graph(graph)
    tied = untie_lm_head(model) if embeddings else []  # tied and not untied: the head reads a Transpose, stays float
    matmuls = weight_matmuls(model)
    unknown = sorted(set(int8_nodes or []) - set(matmuls))
    if unknown:
        raise CompressError(f"int8_nodes names MatMuls the graph does not have: {', '.join(unknown[:3])}", file=src)
    eight = [n for n in matmuls if n in set(int8_nodes or [])]
    four = [n for n in matmuls if n not in set(eight)]
    with failing_as("int4 quantization", src):
        model = quantize_matmuls(model, eight, 8, int8_block_size, True, accuracy_level)
        model = quantize_matmuls(model, four, 4, block_size, symmetric, accuracy_level, algorithm)
        shared = share_tied(model, tied)
        if embeddings and not shared:  # an embedding table of its own: GatherBlockQuantized
            model = _quantize_gathers(model, block_size, symmetric)
        save(model, out / "model.onnx")
    copy_side(src, out)
    expect_graph(out)
    return out


def _quantize_gathers(model, block_size: int, symmetric: bool):
    """Float 2-D Gather tables -> GatherBlockQuantized (4 bits, blocks along the hidden axis)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    floats = {t.name for t in model.graph.initializer if len(t.dims) == 2
              and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    if not any(n.op_type == "Gather" and n.input[0] in floats for n in model.graph.node):
        return model
    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                        quant_format=QuantFormat.QOperator, op_types_to_quantize=("Gather",),
                                        quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric, algo_config=algo)
    quantizer.process()
    return quantizer.model.model
