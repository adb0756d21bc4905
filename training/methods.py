"""Which parameters train: full, freeze (top layers / named modules), or a peft method.

`fast_loss(name)` says whether the answer-only LM-head path applies: methods that inject adapters into existing
modules keep the model's forward; prompt-learning methods prepend virtual tokens and AdaLoRA adds a regulariser in
its forward, so those go through the model's own forward.
"""
from __future__ import annotations

import fnmatch

from core.errors import ConfigError
from training.config import PROMPT_LEARNING, MethodCfg


def fast_loss(name: str) -> bool:
    return name in ("full", "freeze", "lora", "dora", "ia3")


def supports_packing(name: str) -> bool:
    return name not in PROMPT_LEARNING


def mergeable(name: str) -> bool:
    return name not in PROMPT_LEARNING


def _freeze(model, m: MethodCfg) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.get_decoder().layers
    n = min(m.freeze_trainable_layers, len(layers))
    top = {f"model.layers.{i}." for i in range(len(layers) - n, len(layers))}
    matched = set()
    for name, p in model.named_parameters():
        hit = [g for g in m.freeze_trainable_modules if fnmatch.fnmatch(name, g)]
        matched.update(hit)
        if hit or any(name.startswith(t) for t in top):
            p.requires_grad_(True)
    unmatched = set(m.freeze_trainable_modules) - matched
    if unmatched:
        raise ConfigError(f"no parameter matches {sorted(unmatched)}", field="method.freeze_trainable_modules",
                          hint="patterns are globs over parameter names like 'model.layers.29.mlp.*'")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing left to train", field="method.freeze_trainable_layers")


def _linear_names(model) -> list[str]:
    """What peft's `all-linear` means, spelled out: the decoder layers' nn.Linear module names."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.get_decoder().layers.named_modules()
                   if isinstance(mod, torch.nn.Linear)})


def _top_layers(model, m: MethodCfg) -> dict:
    """peft arguments that restrict the adapters to the top `m.lora_layers` decoder layers."""
    if not m.lora_layers:
        return {}
    n = len(model.get_decoder().layers)
    if m.lora_layers > n:
        raise ConfigError(f"the model has {n} decoder layers, fewer than {m.lora_layers}", field="method.lora_layers")
    targets = _linear_names(model) if m.target_modules == "all-linear" else m.target_modules
    return {"layers_to_transform": list(range(n - m.lora_layers, n)), "layers_pattern": "layers",
            "target_modules": targets}


def peft_config(m: MethodCfg, total_steps: int, model=None):
    import peft

    common = {"task_type": peft.TaskType.CAUSAL_LM}
    top = _top_layers(model, m) if model is not None else {}
    if m.name in ("lora", "dora"):
        return peft.LoraConfig(**{"target_modules": m.target_modules, **top}, r=m.lora_r, lora_alpha=m.lora_alpha,
                               lora_dropout=m.lora_dropout, use_dora=m.name == "dora", **common)
    if m.name == "adalora":
        return peft.AdaLoraConfig(init_r=m.adalora_init_r, target_r=m.lora_r, lora_alpha=m.lora_alpha,
                                  lora_dropout=m.lora_dropout, target_modules=m.target_modules,
                                  total_step=max(total_steps, 2), tinit=0, tfinal=0, **common)
    if m.name == "ia3":
        # IA3 scales keys, values and the MLP input of down_proj; it has no rank or dropout.
        targets = ["k_proj", "v_proj", "down_proj"] if m.target_modules == "all-linear" else m.target_modules
        ff = [t for t in targets if t in ("down_proj", "up_proj", "gate_proj", "fc1", "fc2")]
        top = {k: v for k, v in top.items() if k != "target_modules"}
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, **top, **common)
    if m.name == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=m.num_virtual_tokens, **common)
    if m.name == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=m.num_virtual_tokens, **common)
    if m.name == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=m.num_virtual_tokens, encoder_hidden_size=128, **common)
    raise ConfigError(f"unknown method {m.name!r}", field="method.name")


def apply(model, m: MethodCfg, total_steps: int):
    """Return the model ready to train with method `m` (peft methods wrap it in a PeftModel)."""
    if m.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if m.name == "freeze":
        _freeze(model, m)
        return model
    import peft

    try:
        return peft.get_peft_model(model, peft_config(m, total_steps, model))
    except ValueError as exc:
        raise ConfigError(f"peft rejected the method settings: {exc}", field="method") from None


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_pct": round(100 * trainable / max(total, 1), 4)}


def merged(model, name: str):
    """The full model with the adapter folded into the weights (what compression and serving load)."""
    if name in ("full", "freeze"):
        return model
    if not mergeable(name):
        return None
    return model.merge_and_unload()
