"""Which decoder layers suffer most from 4-bit rounding: measured, not guessed.

For each layer in turn, its seven linear weights are rounded to 4 bits (round to nearest in blocks along the input,
as ONNX Runtime's MatMulNBits stores them) while every other layer stays in float; the score is the mean KL
divergence of the next-token distribution from the float model's, over the answer tokens of a few validation rows.
Layers with the highest scores are the ones mixed precision keeps at 8 bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .prune import ATTN, MLP, decoder_layers

# optimum names the MatMul of a Linear after its module path: '/model/layers.3/self_attn/q_proj/MatMul'
MATMUL = "/model/layers.{i}/{part}/{name}/MatMul"


def fake_quant(w: torch.Tensor, bits: int, block: int, symmetric: bool) -> torch.Tensor:
    """w [out, in] rounded to `bits` in blocks of `block` along the input dimension, returned dequantized."""
    out, k = w.shape
    pad = (-k) % block
    x = F.pad(w.float(), (0, pad)).view(out, -1, block)
    levels = 2 ** bits - 1
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True) / (levels // 2)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(x / scale), -(levels // 2) - 1, levels // 2) * scale
    else:
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / levels
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale
    return q.view(out, -1)[:, :k].to(w.dtype)


def _answer_logprobs(model, rows, pad_id: int) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for e in rows:
            ids = torch.tensor([list(e.input_ids)])
            labels = torch.tensor(list(e.labels))[1:]
            logits = model(input_ids=ids).logits[0, :-1][labels != -100]
            out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def rank_layers(model, rows, block: int = 32, symmetric: bool = False, pad_id: int = 0, bits: int = 4) -> list[dict]:
    """[{layer, kl}] for every decoder layer, the most sensitive first (see the module docstring). rows: tokenized
    examples with answer labels (chatdata.pipeline.Example)."""
    model.eval()
    reference = _answer_logprobs(model, rows, pad_id)
    scores = []
    for i, layer in enumerate(decoder_layers(model)):
        linears = [getattr(layer.self_attn, n) for n in ATTN] + [getattr(layer.mlp, n) for n in MLP]
        saved = [lin.weight.data.clone() for lin in linears]
        with torch.no_grad():
            for lin in linears:
                lin.weight.data = fake_quant(lin.weight.data, bits, block, symmetric)
        got = _answer_logprobs(model, rows, pad_id)
        for lin, w in zip(linears, saved):
            lin.weight.data = w
        kl = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(reference, got))
        scores.append({"layer": i, "kl": kl / max(sum(r.shape[0] for r in reference), 1)})
    return sorted(scores, key=lambda s: -s["kl"])


def layer_matmul_names(layers: list[int]) -> list[str]:
    """The exported MatMul node names of the given decoder layers' linear weights."""
    return [MATMUL.format(i=i, part=part, name=n) for i in layers
            for part, names in (("self_attn", ATTN), ("mlp", MLP)) for n in names]
