"""Pruning of Llama-style decoders (Llama, Mistral, Qwen2/Qwen3 and others built the same way), in place.

- depth (`prune_depth`): remove the layers whose output is closest to their input, by block influence
  (ShortGPT: BI = 1 - mean cosine similarity between a layer's input and output hidden states);
- width (`prune_width`): keep the most active MLP channels (mean |act(gate(x)) * up(x)|) and, within every key/value
  group, the query heads that contribute most to the attention output (mean norm of the head's output through o_proj);
- unstructured sparsity (`sparsify`): zero a fraction of every decoder linear weight, per output row, by |w|
  (magnitude) or |w| x input-activation norm (Wanda). Zeros only: dense kernels run at the same speed and size.

Every function works on a loaded HF causal LM, changes it in place, keeps its config consistent (the model saves with
`save_pretrained` and reloads with `from_pretrained`) and returns an info dict for the manifest. Calibration input is
token id sequences (`calibration_ids`), run through the decoder (no LM head) in small right-padded batches; padding
never enters a statistic, and the prefix all rows share (a system prompt) runs and counts once.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import CompressError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3 and other decoders built the same way: model.model.layers[i] with "
             "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj")
SPARSITY_NOTE = ("unstructured zeros: dense kernels (PyTorch, ONNX Runtime) compute them at full cost and the saved "
                 "files are as large; a speed or size gain needs sparse kernels or 2:4 sparse hardware")
CALIB_BATCH = 8
MIN_PREFIX = 8  # shorter common prefixes are not worth a separate pass


# ---------------------------------------------------------------- helpers
def _arch(model) -> str:
    names = getattr(getattr(model, "config", None), "architectures", None) or []
    return names[0] if names else type(model).__name__


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Llama-style causal LM; CompressError naming the architecture for anything else."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        isinstance(getattr(getattr(layer, "self_attn", None), n, None), nn.Linear) for layer in layers for n in ATTN
    ) and all(isinstance(getattr(getattr(layer, "mlp", None), n, None), nn.Linear) for layer in layers for n in MLP)
    if not ok:
        mtype = getattr(getattr(model, "config", None), "model_type", "?")
        raise CompressError(f"cannot prune {_arch(model)} (model_type '{mtype}'): supported are {SUPPORTED}")
    return layers


def count_params(model) -> int:
    """Parameters of the model, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def _check_calib(model, calib) -> None:
    if not calib:
        raise CompressError("no calibration rows: pruning needs token sequences to score layers, channels and heads",
                            hint="set prune.calibration_samples >= 1 and make sure the training data is not empty")
    vocab = model.get_input_embeddings().weight.shape[0]
    for i, seq in enumerate(calib):
        if len(seq) == 0:
            raise CompressError(f"calibration row {i} is empty")
        if min(seq) < 0 or max(seq) >= vocab:
            raise CompressError(f"calibration row {i} has token ids outside the model's vocabulary (0..{vocab - 1})",
                                hint="tokenize calibration text with the model's own tokenizer")


def _batches(calib: list[list[int]], pad_id: int, batch_size: int = CALIB_BATCH):
    """Right-padded batches (similar lengths together) with their attention masks."""
    order = sorted(range(len(calib)), key=lambda i: len(calib[i]))
    for s in range(0, len(order), batch_size):
        seqs = [calib[i] for i in order[s:s + batch_size]]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([list(x) + [pad_id] * (width - len(x)) for x in seqs])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs])
        yield ids, mask


def _calibrate(model, calib: list[list[int]], hooks: list) -> None:
    """Run the calibration rows through the decoder (not the LM head) with the given hooks installed.

    The token prefix common to all rows (the system prompt of chat data: about half of each demo row) runs once and
    is handed to the rows as a KV cache, so it costs one pass and counts once in every statistic instead of once per
    row; the rest of each row runs in right-padded batches.

    hooks: (module, kind, fn) with kind "pre" (fn(module, args, kwargs, mask)) or "post" (fn(module, args, kwargs,
    output, mask)); `mask` is the bool (batch, seq) mask of real tokens of the current batch."""
    from transformers import DynamicCache

    from modeling.collate import common_prefix

    _check_calib(model, calib)
    p = common_prefix(calib, [len(x) - 1 for x in calib], MIN_PREFIX)  # every row keeps >= 1 token of its own
    state: dict = {}
    handles = []
    for module, kind, fn in hooks:
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, fn=fn: fn(m, a, k, state["mask"]), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, fn=fn: fn(m, a, k, o, state["mask"]), with_kwargs=True))
    pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            kv = []
            if p:
                state["mask"] = torch.ones(1, p, dtype=torch.bool, device=device)
                cache = model.model(input_ids=torch.tensor([calib[0][:p]], device=device), use_cache=True,
                                    past_key_values=DynamicCache()).past_key_values  # full layers: no window cut
                kv = [(layer.keys, layer.values) for layer in cache.layers]
            for ids, mask in _batches([x[p:] for x in calib], pad_id):
                ids, mask = ids.to(device), mask.to(device)
                state["mask"] = mask.bool()
                kwargs = {}
                if kv:
                    n = ids.shape[0]
                    cache = DynamicCache()
                    for i, (k, v) in enumerate(kv):
                        cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
                    kwargs["past_key_values"] = cache
                    mask = torch.cat([torch.ones(n, p, dtype=mask.dtype, device=device), mask], dim=1)
                model.model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a linear layer's weights (and bias) in place with a slice of them."""
    lin.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = lin.weight.shape


def _head_index(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def calibration_ids(rows, n: int) -> list[list[int]]:
    """The input_ids of the first n examples (tokenized training rows) as calibration sequences."""
    if n < 1:
        raise CompressError(f"calibration needs at least one row, got n={n}", field="prune.calibration_samples")
    out = [list(e.input_ids) for e in rows[:n] if len(e.input_ids)]
    if not out:
        raise CompressError("no tokenized rows to calibrate on (the training data is empty or not tokenized)")
    return out


# ---------------------------------------------------------------- depth
def block_influence(model, calib: list[list[int]]) -> list[float]:
    """Per decoder layer: 1 - mean cosine similarity between its input and output hidden states over the real
    (non-pad) tokens of the calibration rows, their shared prefix counted once (ShortGPT's block influence; 0 = the
    layer changes nothing)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def fn(m, args, kwargs, mask):
            inputs[i] = _hidden_in(args, kwargs)[mask].float()
        return fn

    def post(i):
        def fn(m, args, kwargs, output, mask):
            cos = F.cosine_similarity(inputs.pop(i), _hidden_out(output)[mask].float(), dim=-1)
            sums[i] += cos.double().sum()
            counts[i] += cos.numel()
        return fn

    hooks = [(layer, "pre", pre(i)) for i, layer in enumerate(layers)]
    hooks += [(layer, "post", post(i)) for i, layer in enumerate(layers)]
    _calibrate(model, calib, hooks)
    return [float(1.0 - s / c) for s, c in zip(sums, counts)]


def prune_depth(model, n_drop: int, calib: list[list[int]]) -> dict:
    """Remove the `n_drop` decoder layers with the lowest block influence; config, layer indices (KV cache slots)
    and per-layer attention types follow. Returns the manifest info."""
    layers = decoder_layers(model)
    n = len(layers)
    if n_drop < 0 or n_drop >= n:
        raise CompressError(f"cannot drop {n_drop} of {n} decoder layers (at least one must stay)",
                            field="prune.drop_layers", hint=f"use 0..{n - 1}")
    params_before = count_params(model)
    scores = block_influence(model, calib)
    drop = sorted(sorted(range(n), key=lambda i: scores[i])[:n_drop])
    keep = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
        if hasattr(model.model, "has_sliding_layers"):  # Qwen2/3: build the sliding-window mask only when used
            model.model.has_sliding_layers = "sliding_attention" in cfg.layer_types
    return {"method": "depth", "layers_before": n, "layers_after": len(keep), "dropped": drop, "kept": keep,
            "block_influence": [round(s, 6) for s in scores], "calibration_rows": len(calib),
            "params_before": params_before, "params_after": count_params(model)}


# ---------------------------------------------------------------- width
def _mlp_keep_count(inter: int, keep: float) -> int:
    k = max(1, round(keep * inter))
    if inter >= 64 and k % 8:  # multiples of 8 suit GEMM kernels
        k = min(inter, max(8, round(k / 8) * 8))
    return k


def prune_width(model, calib: list[list[int]], mlp_keep: float = 0.75, heads_keep: float = 1.0) -> dict:
    """Width pruning: keep round(mlp_keep x intermediate) MLP channels (multiple of 8 for wide MLPs) with the
    highest mean |act(gate(x)) * up(x)|, and round(heads_keep x heads per group) query heads in every key/value group,
    those whose output through o_proj has the largest mean norm (with one query head per key/value head, whole heads
    go together with their keys and values). Every layer keeps the same counts (one config for all layers);
    head_dim stays as it was and is written to the config explicitly."""
    if not 0 < mlp_keep <= 1 or not 0 < heads_keep <= 1:
        raise CompressError(f"mlp_keep and heads_keep must lie in (0, 1], got {mlp_keep} and {heads_keep}",
                            field="prune.mlp_keep" if not 0 < mlp_keep <= 1 else "prune.heads_keep")
    layers = decoder_layers(model)
    cfg = model.config
    params_before = count_params(model)
    inter = layers[0].mlp.down_proj.in_features
    attn0 = layers[0].self_attn
    head_dim = (getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None)
                or cfg.hidden_size // cfg.num_attention_heads)
    n_heads = attn0.q_proj.out_features // head_dim
    n_kv = attn0.k_proj.out_features // head_dim
    if n_heads % n_kv:
        raise CompressError(f"{n_heads} query heads do not split into {n_kv} key/value groups")
    n_rep = n_heads // n_kv
    k_mlp = _mlp_keep_count(inter, mlp_keep)
    if n_rep > 1:
        per_group = max(1, round(heads_keep * n_rep))
        k_heads = per_group * n_kv
    else:
        per_group = 1
        k_heads = max(1, round(heads_keep * n_heads))
    do_mlp, do_heads = k_mlp < inter, k_heads < n_heads

    mlp_imp, head_imp, calibrated = _width_importance(model, calib, inter if do_mlp else 0,
                                                      n_heads if do_heads else 0, head_dim)
    kept_heads: list[list[int]] = []
    for i, layer in enumerate(layers):
        if do_mlp:
            _cut_mlp(layer.mlp, mlp_imp[i], k_mlp)
        if do_heads:
            kept_heads.append(_cut_heads(layer.self_attn, head_imp[i], n_kv, per_group, k_heads, head_dim))
    if do_mlp:
        cfg.intermediate_size = k_mlp
    cfg.head_dim = head_dim  # hidden_size / num_attention_heads no longer gives it
    if do_heads:
        cfg.num_attention_heads = k_heads
        if n_rep == 1:
            cfg.num_key_value_heads = k_heads
    info = {"method": "width", "mlp_keep": mlp_keep, "heads_keep": heads_keep,
            "intermediate_before": inter, "intermediate_after": k_mlp,
            "heads_before": n_heads, "heads_after": k_heads, "kv_heads_before": n_kv,
            "kv_heads_after": k_heads if (do_heads and n_rep == 1) else n_kv, "head_dim": head_dim,
            "kept_heads": kept_heads, "calibration_rows": len(calib) if calibrated else 0,
            "params_before": params_before, "params_after": count_params(model)}
    if heads_keep < 1 and not do_heads:
        info["note"] = (f"attention unchanged: heads_keep={heads_keep} of {n_rep} query heads per key/value group "
                        f"rounds to all of them")
    return info


def _width_importance(model, calib: list[list[int]], inter: int, n_heads: int, head_dim: int):
    """Per layer, the mean |act(gate(x)) * up(x)| of each of the `inter` MLP channels and the mean norm of each of
    the `n_heads` query heads' output through o_proj, over the calibration rows (0: not measured); (mlp, heads,
    whether the rows ran)."""
    layers = decoder_layers(model)
    mlp_imp = torch.zeros(len(layers), inter, dtype=torch.float64)
    head_imp = torch.zeros(len(layers), n_heads, dtype=torch.float64)

    def mlp_hook(i):
        def fn(m, args, kwargs, mask):
            mlp_imp[i] += _hidden_in(args, kwargs)[mask].float().abs().sum(0).double()
        return fn

    def head_hook(i):
        def fn(m, args, kwargs, mask):
            x = _hidden_in(args, kwargs)[mask].float()                      # (N, heads * head_dim)
            w = m.weight.float().view(m.out_features, n_heads, head_dim)   # (hidden, heads, head_dim)
            for s in range(0, x.shape[0], 256):
                part = torch.einsum("nhd,ohd->nho", x[s:s + 256].view(-1, n_heads, head_dim), w)
                head_imp[i] += part.norm(dim=-1).sum(0).double()
        return fn

    hooks = [(layer.mlp.down_proj, "pre", mlp_hook(i)) for i, layer in enumerate(layers)] if inter else []
    hooks += [(layer.self_attn.o_proj, "pre", head_hook(i)) for i, layer in enumerate(layers)] if n_heads else []
    if hooks:
        _calibrate(model, calib, hooks)
    return mlp_imp, head_imp, bool(hooks)


def _cut_mlp(mlp, importance: torch.Tensor, k_mlp: int) -> None:
    """Keep the k_mlp most important intermediate channels of one MLP (gate / up rows, down columns)."""
    idx = torch.sort(torch.topk(importance, k_mlp).indices).values
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        _set_linear(lin, lin.weight.data[idx], lin.bias.data[idx] if lin.bias is not None else None)
    down = mlp.down_proj
    _set_linear(down, down.weight.data[:, idx], down.bias.data if down.bias is not None else None)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = k_mlp


def _cut_heads(attn, importance: torch.Tensor, n_kv: int, per_group: int, k_heads: int, head_dim: int) -> list[int]:
    """Keep the most important query heads of one attention block: per_group in each key/value group, or (one query
    head per key/value head) the k_heads best whole heads with their keys and values. Returns the kept heads."""
    n_rep = importance.numel() // n_kv
    if n_rep > 1:
        heads = []
        for g in range(n_kv):
            top = torch.topk(importance[g * n_rep:(g + 1) * n_rep], per_group).indices
            heads += sorted(g * n_rep + int(j) for j in top)
    else:
        heads = sorted(int(j) for j in torch.topk(importance, k_heads).indices)
    rows = _head_index(heads, head_dim)
    for name in (("q_proj", "k_proj", "v_proj") if n_rep == 1 else ("q_proj",)):
        lin = getattr(attn, name)
        _set_linear(lin, lin.weight.data[rows], lin.bias.data[rows] if lin.bias is not None else None)
    o = attn.o_proj
    _set_linear(o, o.weight.data[:, rows], o.bias.data if o.bias is not None else None)
    attn.num_key_value_groups = per_group
    for attr, value in (("num_heads", k_heads), ("num_attention_heads", k_heads),
                        ("num_key_value_heads", k_heads if n_rep == 1 else n_kv)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    attn.head_dim = head_dim
    return heads


# ---------------------------------------------------------------- unstructured sparsity
def sparsify(model, calib: list[list[int]] | None, sparsity: float, method: str = "wanda") -> dict:
    """Zero `sparsity` of every decoder linear weight, the same number in every output row: the smallest |w|
    (magnitude) or the smallest |w| x ||x_j||_2, x_j being input channel j's activations over the calibration tokens
    (Wanda). Embeddings, norms and the LM head stay dense."""
    if method not in ("wanda", "magnitude"):
        raise CompressError(f"unknown sparsity method '{method}' (wanda or magnitude)", field="prune.sparsity_method")
    if not 0 <= sparsity < 1:
        raise CompressError(f"sparsity must lie in [0, 1), got {sparsity}", field="prune.sparsity")
    layers = decoder_layers(model)
    linears = [(f"model.layers.{i}.{part}.{n}", getattr(getattr(layer, part), n))
               for i, layer in enumerate(layers) for part, names in (("self_attn", ATTN), ("mlp", MLP))
               for n in names]
    norms: dict[str, torch.Tensor] = {}
    if method == "wanda":
        sq = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears}

        def hook(name):
            def fn(m, args, kwargs, mask):
                sq[name] += _hidden_in(args, kwargs)[mask].float().pow(2).sum(0).double()
            return fn

        _calibrate(model, calib, [(lin, "pre", hook(name)) for name, lin in linears])
        norms = {name: v.sqrt().float() for name, v in sq.items()}
    zeros = total = 0
    with torch.no_grad():
        for name, lin in linears:
            w = lin.weight.data
            k = round(sparsity * w.shape[1])
            if k:
                score = w.abs().float()
                if method == "wanda":
                    score = score * norms[name].to(score.device)[None, :]
                idx = torch.topk(score, k, dim=1, largest=False).indices
                w.scatter_(1, idx, 0)
            zeros += int((w == 0).sum())
            total += w.numel()
    n_params = count_params(model)
    return {"method": "sparsity", "sparsity_method": method, "requested": sparsity,
            "achieved": round(zeros / max(total, 1), 6), "zeros": zeros, "linear_params": total,
            "model_sparsity": round(zeros / n_params, 6), "params": n_params,
            "calibration_rows": len(calib) if method == "wanda" else 0, "note": SPARSITY_NOTE}
