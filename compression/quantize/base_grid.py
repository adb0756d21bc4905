"""4-bit on the base model's own grid, with the fine-tune's change carried as a low-rank correction.

A LoRA fine-tune changes each weight by a low-rank product: W = W_base + B A. Rounding the merged W to 4 bits loses
most of that change, because it is small next to a 4-bit step (the demo: exact match 0.89 -> 0.63 with plain 4-bit,
while the 4-bit base alone scores like the base). So each weight MatMul of the exported graph becomes

    y = MatMulNBits(x; 4-bit codes q and scales d of W_base)     codes in blocks of 32 along the input, implied zero 8
      + blocksum(x) @ (m + 8 d)                                    each block's minimum m (asymmetric, float: exact)
      + (x @ U) @ V                                                rank-r SVD of W - deq(W_base): the fine-tune's change

The grid is asymmetric round-to-nearest with a float minimum per block (llama.cpp's Q4_1); MatMulNBits only takes
integer zero points, so the minimum is added back through the per-block sums of x, one small MatMul. Base weights
that already lie on that grid (the demo's SmolLM2 ships as a Q4_1 GGUF) are reproduced exactly and the correction is
exactly the LoRA product; any other base keeps round-to-nearest error on the base part while the fine-tune's change
stays whole. Layers the fine-tune did not change get no correction branch. The branch matrices are stored as float16
and cast to float32 once at load (`branch_bits` 16), or as 8-bit MatMulNBits blocks (8), or float32 (32). The LM head (tied to the embedding) becomes 8-bit symmetric blocks
(llama.cpp's Q8_0) shared with the embedding lookup.

This is the QLoRA serving recipe (a quantized base plus a float adapter) expressed in one ONNX graph; with no base
model (a plain folder) the merged weights are their own base and the correction is the SVD of their rounding error
(LQER-style).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from core.errors import CompressError

from .common import copy_side, expect_graph, failing_as, load_graph, prepare_out, save, source
from .nbits import share_tied, untie_lm_head

MODULE = re.compile(r"^/(?P<path>.+)/MatMul$")  # optimum names a Linear's MatMul '/model/layers.3/mlp/up_proj/MatMul'


def q4_grid(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit round-to-nearest of w [K, N] in blocks of `block` along K: (packed codes [N, K/block,
    block/2] uint8, scales d [N, K/block], block minima m [N, K/block], dequantized [K, N])."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block).astype(np.float32)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = (hi - lo) / 15.0
    d[d == 0] = 1e-12
    q = np.clip(np.round((blocks - lo[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    deq = (d[..., None] * q + lo[..., None]).reshape(n, k).T
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, d.astype(np.float32), lo.astype(np.float32), deq


def q8_grid(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric 8-bit round-to-nearest of w [K, N] in blocks along K (K padded with zeros to a whole block): (codes
    [N, blocks, block] uint8 with zero 128, scales [N, blocks], dequantized [K, N])."""
    k0, n = w.shape
    if k0 % block:
        w = np.concatenate([w, np.zeros(((-k0) % block, n), w.dtype)])
    k = w.shape[0]
    blocks = w.T.reshape(n, k // block, block).astype(np.float32)
    s = np.abs(blocks).max(-1) / 127.0
    s[s == 0] = 1e-12
    q = (np.clip(np.round(blocks / s[..., None]), -127, 127) + 128).astype(np.uint8)
    deq = (s[..., None] * (q.astype(np.float32) - 128)).reshape(n, k).T[:k0]
    return q, s.astype(np.float32), deq


class _Graph:
    """Appends initializers and MatMulNBits nodes to an ONNX graph."""

    def __init__(self, model, accuracy_level: int | None):
        self.g, self.acc = model.graph, accuracy_level
        self.names = {t.name for t in self.g.initializer}

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper
        if name not in self.names:
            self.g.initializer.append(numpy_helper.from_array(array, name))
            self.names.add(name)
        return name

    def nbits(self, name: str, x: str, out: str, codes, scales, k: int, n: int, bits: int, block: int):
        from onnx import helper
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.acc:
            attrs["accuracy_level"] = self.acc
        return helper.make_node("MatMulNBits", [x, self.const(name + "_q", codes), self.const(name + "_s", scales)],
                                [out], name=name, domain="com.microsoft", **attrs)

    def matmul(self, name: str, x: str, w: np.ndarray, out: str, bits: int) -> list:
        """x @ w as a float MatMul (bits 32; 16: the weight stored as float16 and cast once, which ONNX Runtime's
        constant folding does at load) or an 8-bit MatMulNBits (block 16 or 32 along K)."""
        from onnx import TensorProto, helper
        if bits == 32:
            return [helper.make_node("MatMul", [x, self.const(name + "_w", w.astype(np.float32))], [out], name=name)]
        if bits == 16:
            half = self.const(name + "_w16", w.astype(np.float16))
            return [helper.make_node("Cast", [half], [name + "_w"], name=name + "_cast", to=TensorProto.FLOAT),
                    helper.make_node("MatMul", [x, name + "_w"], [out], name=name)]
        block = 32 if w.shape[0] >= 32 else 16
        codes, scales, _ = q8_grid(w, block)
        return [self.nbits(name, x, out, codes, scales, w.shape[0], w.shape[1], 8, block)]


def _base_weights(base_dir: Path | None) -> dict:
    if base_dir is None:
        return {}
    from safetensors.torch import load_file  # bf16 checkpoints too (numpy has no bfloat16)
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise CompressError("the base model folder has no safetensors weights", file=base_dir,
                            field="quantize.int4_base_grid", hint="set quantize.int4_base_grid: false")
    out = {}
    for f in files:
        out.update({k: v.float().numpy() for k, v in load_file(str(f)).items() if v.dim() == 2})
    return out


def _check_settings(rank: int, block_size: int, branch_bits: int) -> None:
    if block_size not in (16, 32, 64, 128):
        raise CompressError(f"block size {block_size} is not 16, 32, 64 or 128", field="quantize.int4_block_size")
    if rank < 0:
        raise CompressError(f"correction rank {rank} is negative", field="quantize.int4_correction_rank")
    if branch_bits not in (8, 16, 32):
        raise CompressError(f"branch bits {branch_bits} is not 8, 16 or 32", field="quantize.int4_branch_bits")


def int4_base_grid(onnx_dir, out_dir, base_dir: Path | None, rank: int = 16, block_size: int = 32,
                   accuracy_level: int | None = 4, branch_bits: int = 16, tolerance: float = 1e-5) -> tuple[Path, dict]:
    """Quantize the exported fine-tune in onnx_dir as described in the module docstring; returns (out_dir, info).
    base_dir: the HF folder of the base model it was fine-tuned from (None: the merged weights are the base)."""
    from onnx import helper, numpy_helper

    src, graph = source(onnx_dir)
    _check_settings(rank, block_size, branch_bits)
    out = prepare_out(out_dir, src)
    base = _base_weights(base_dir)
    model = load_graph(graph)
    tied = untie_lm_head(model)
    heads = {t.head_output for t in tied}
    g = _Graph(model, accuracy_level)
    inits = {t.name: t for t in model.graph.initializer}
    info = {"rank": rank, "block_size": block_size, "branch_bits": branch_bits, "base": bool(base), "matmuls": 0,
            "corrected": 0, "exact_base": 0, "max_residual": 0.0}
    block_sums: dict[str, str] = {}
    with failing_as("4-bit base-grid quantization", src):
        for node in [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [K, N]
            if node.output[0] in heads or w.shape[0] % block_size:  # the LM head (and odd shapes): 8-bit blocks
                q8_block = 32 if w.shape[0] % 32 == 0 else 16
                codes, scales, _ = q8_grid(w, q8_block)
                new = [g.nbits(node.name + "_Q8", node.input[0], node.output[0], codes, scales, *w.shape, 8,
                               q8_block)]
            else:
                new = _on_base_grid(g, node, w, _base_for(node.name, base, w), block_sums, info, rank, block_size,
                                    branch_bits, tolerance)
            at = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            for j, nn in enumerate(new):
                model.graph.node.insert(at + j, nn)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        share_tied(model, tied)
        save(model, out / "model.onnx")
    copy_side(src, out)
    expect_graph(out)
    info["max_residual"] = round(info["max_residual"], 6)
    return out, info


def _on_base_grid(g: "_Graph", node, w: np.ndarray, w_base: np.ndarray, block_sums: dict, info: dict, rank: int,
                  block_size: int, branch_bits: int, tolerance: float) -> list:
    """The nodes that replace one MatMul x @ w: 4-bit codes of w_base on its Q4_1 grid, the blocksum branch for the
    grid's minimum, and the rank-`rank` correction of (w - the base's grid), summed into the MatMul's output.
    block_sums caches the blocksum of each input (shared by the MatMuls reading it); info counts what was done."""
    from onnx import helper

    k, n = w.shape
    y, x = node.output[0], node.input[0]
    packed, d, lo, deq = q4_grid(w_base, block_size)
    info["matmuls"] += 1
    info["exact_base"] += int(np.abs(deq - w_base).max() <= tolerance * max(np.abs(w_base).max(), 1e-12))
    new = [g.nbits(node.name + "_Q4", x, y + "_q4", packed, d, k, n, 4, block_size)]
    if x not in block_sums:
        block_sums[x] = x + "_block_sums"
        shape = g.const(f"block_sum_shape_{k // block_size}x{block_size}",
                        np.asarray([0, 0, k // block_size, block_size], dtype=np.int64))
        new += [helper.make_node("Reshape", [x, shape], [x + "_blocks"], name=x + "_blocks"),
                helper.make_node("ReduceSum", [x + "_blocks", g.const("axis_last", np.asarray([-1]))],
                                 [block_sums[x]], name=block_sums[x], keepdims=0)]
    new += g.matmul(node.name + "_min", block_sums[x], (lo + 8 * d).T.copy(), y + "_min", branch_bits)
    change = w - deq
    terms = [y + "_q4", y + "_min"]
    if rank and np.abs(change).max() > tolerance * np.abs(w).max():
        u, s, vt = np.linalg.svd(change, full_matrices=False)
        r = min(rank, len(s))
        info["max_residual"] = max(info["max_residual"], float(s[r] / s[0]) if len(s) > r else 0.0)
        root = np.sqrt(s[:r])
        new += g.matmul(node.name + "_lora_a", x, u[:, :r] * root, y + "_la", branch_bits)
        new += g.matmul(node.name + "_lora_b", y + "_la", root[:, None] * vt[:r], y + "_lb", branch_bits)
        terms.append(y + "_lb")
        info["corrected"] += 1
    partial = terms[0]
    for i, t in enumerate(terms[1:]):
        target = y if i == len(terms) - 2 else f"{y}_sum{i}"
        new.append(helper.make_node("Add", [partial, t], [target], name=f"{node.name}_add{i}"))
        partial = target
    return new


def _base_for(node_name: str, base: dict, merged: np.ndarray) -> np.ndarray:
    """The base model's weight for an exported MatMul, transposed to [K, N] (the merged weight when there is no
    base); CompressError when the base lacks it or its shape differs (not this fine-tune's base)."""
    if not base:
        return merged
    m = MODULE.match(node_name)
    key = (m.group("path").replace("/", ".") + ".weight") if m else None
    if key not in base:
        raise CompressError(f"the base model has no weight for the exported MatMul {node_name} ({key})",
                            field="quantize.int4_base_grid",
                            hint="the base grid needs the model this one was fine-tuned from; set it to false")
    w = base[key].T.astype(np.float32)
    if w.shape != merged.shape:
        raise CompressError(f"{key}: the base model's shape {list(w.shape)} differs from the exported "
                            f"{list(merged.shape)} (pruned, or not this model's base)",
                            field="quantize.int4_base_grid",
                            hint="use the base grid on unpruned fine-tunes only, or set it to false")
    return w
