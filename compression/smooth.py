"""SmoothQuant (Xiao et al., 2023) for int8 with dynamic activation quantization.

Decoder activations have a few outlier channels, tens of times larger than the rest. With one int8 scale per
activation tensor, as ONNX Runtime's dynamic quantization uses, those channels eat the range and the others round to a
handful of levels. SmoothQuant moves part of each channel's range into the weights, which are quantized per output
channel and tolerate it: for a linear layer y = x W^T, pick s_j = max|x_j|^a / max|W_:,j|^(1-a), divide the input
channel j by s_j where it is produced (the RMSNorm weight before q/k/v and gate/up, the up projection's rows before
down, the value projection's rows before o) and multiply the weight's column j by s_j. The float model computes the
same function (up to rounding); only the quantized one changes.

Written here rather than taken from a library: neural-compressor and llm-compressor carry it, but pull heavyweight
dependency trees (and version pins on torch/transformers) into the compression environment for ~100 lines of math.
"""
from __future__ import annotations

import logging

import torch

from core.errors import CompressError

from .prune import _calibrate, _hidden_in, decoder_layers

log = logging.getLogger(__name__)

# Model families with the Llama block layout: pre-norm RMSNorm, q/k/v/o and gate/up/down projections.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def _channel_max(model, calib: list[list[int]], linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| entering each named linear over the real calibration tokens."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(m, args, kwargs, mask):
            x = _hidden_in(args, kwargs)[mask].detach().abs().float().amax(dim=0)
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return fn

    _calibrate(model, calib, [(lin, "pre", hook(name)) for name, lin in linears.items()])
    return stats


def _scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth(model, calib: list[list[int]], alpha: float = 0.5) -> dict:
    """Apply SmoothQuant in place to a Llama-style decoder; returns the manifest info (alpha, the largest scale)."""
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in SUPPORTED:
        raise CompressError(f"SmoothQuant supports the Llama block layout ({', '.join(SUPPORTED)}), not '{mtype}'",
                            field="quantize.smooth_alpha", hint="set quantize.smooth_alpha: null for this model")
    if not 0.0 < alpha < 1.0:
        raise CompressError(f"smooth_alpha must be between 0 and 1 (exclusive), got {alpha}",
                            field="quantize.smooth_alpha")
    layers = decoder_layers(model)
    linears = {}
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        linears.update({f"{i}.q": a.q_proj, f"{i}.o": a.o_proj, f"{i}.gate": m.gate_proj, f"{i}.down": m.down_proj})
    act = _channel_max(model, calib, linears)
    largest = 0.0
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        # input_layernorm -> q, k, v
        s = _scales(act[f"{i}.q"], [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], alpha)
        layer.input_layernorm.weight.div_(s)
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight.mul_(s)
        # post_attention_layernorm -> gate, up
        s2 = _scales(act[f"{i}.gate"], [m.gate_proj.weight, m.up_proj.weight], alpha)
        layer.post_attention_layernorm.weight.div_(s2)
        for lin in (m.gate_proj, m.up_proj):
            lin.weight.mul_(s2)
        # up rows -> down columns (the gate's activation multiplies elementwise, so the scale passes through)
        s3 = _scales(act[f"{i}.down"], [m.down_proj.weight], alpha)
        m.up_proj.weight.div_(s3[:, None])
        if m.up_proj.bias is not None:
            m.up_proj.bias.div_(s3)
        m.down_proj.weight.mul_(s3)
        # v rows -> o columns: one scale per value channel, shared by the query heads of its group
        group = heads // kv_heads
        per_head = _scales(act[f"{i}.o"], [a.o_proj.weight], alpha).view(kv_heads, group, head_dim)
        s4 = per_head.amax(dim=1).reshape(-1)  # (kv_heads * head_dim,)
        a.v_proj.weight.div_(s4[:, None])
        if a.v_proj.bias is not None:
            a.v_proj.bias.div_(s4)
        a.o_proj.weight.mul_(s4.view(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).reshape(-1))
        largest = max(largest, float(s.max()), float(s2.max()), float(s3.max()), float(s4.max()))
    log.info(f"SmoothQuant: alpha {alpha}, {len(layers)} layers, largest scale {largest:.1f}")
    return {"alpha": alpha, "layers": len(layers), "largest_scale": round(largest, 2)}
