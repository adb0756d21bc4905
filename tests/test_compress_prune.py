"""Pruning on tiny random-weight decoders (the real tokenizer's vocabulary).

Depth: block influence finds a layer that is an exact identity and drops it first, and dropping it leaves the logits
unchanged. Width: MLP channels and query heads made dead on purpose are exactly the ones removed, so the pruned model
computes what the original computed. Every pruned model saves, reloads with identical logits and a consistent config,
generates (with and without the KV cache alike) and has fewer parameters. Sparsity: the requested zeros per row,
and Wanda weighs input activations where magnitude does not.
"""
from __future__ import annotations

import pytest
import torch

from compress_fixtures import (LINEARS, assert_same_logits, calib, check_roundtrip, greedy, logits,  # noqa: F401
                               make_model, reload, rows)
from compression.prune import block_influence, calibration_ids, count_params, prune_depth, prune_width, sparsify
from core.errors import CompressError
from modeling.collate import common_prefix


# ---------------------------------------------------------------- calibration input
def test_calibration_ids_are_the_first_rows(rows):
    assert calibration_ids(rows, 3) == [r.input_ids for r in rows[:3]]
    assert len(calibration_ids(rows, 100)) == len(rows)
    with pytest.raises(CompressError, match="no tokenized rows"):
        calibration_ids([], 4)
    with pytest.raises(CompressError, match="at least one row"):
        calibration_ids(rows, 0)


def test_bad_calibration_input(make_model):
    model = make_model(layers=2)
    with pytest.raises(CompressError, match="no calibration rows"):
        block_influence(model, [])
    with pytest.raises(CompressError, match="outside the model's vocabulary"):
        prune_width(model, [[1, 2, model.config.vocab_size]], mlp_keep=0.5)
    with pytest.raises(CompressError, match="empty"):
        prune_depth(model, 1, [[1, 2], []])


@pytest.mark.parametrize("fn", ["block_influence", "prune_depth", "prune_width", "sparsify"])
def test_unsupported_architecture_is_named(fn):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64))
    call = {"block_influence": lambda: block_influence(model, [[1, 2, 3]]),
            "prune_depth": lambda: prune_depth(model, 1, [[1, 2, 3]]),
            "prune_width": lambda: prune_width(model, [[1, 2, 3]], 0.5),
            "sparsify": lambda: sparsify(model, [[1, 2, 3]], 0.5, "magnitude")}[fn]
    with pytest.raises(CompressError, match="GPT2LMHeadModel") as exc:
        call()
    assert "Llama" in str(exc.value) and "gate" in str(exc.value)


# ---------------------------------------------------------------- depth
def test_block_influence_drops_an_identity_layer_first(make_model, calib, tmp_path):
    model = make_model(layers=4)
    with torch.no_grad():  # layer 2 becomes an exact identity: both residual branches add zero
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    before = logits(model, calib[:3])
    prompt = calib[0][:40]
    gen_before = greedy(model, prompt)
    scores = block_influence(model, calib)
    assert len(scores) == 4
    assert abs(scores[2]) < 1e-6
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    layer_params = sum(p.numel() for p in model.model.layers[2].parameters())
    info = prune_depth(model, 1, calib)
    assert info["dropped"] == [2] and info["kept"] == [0, 1, 3]
    assert info["layers_before"] == 4 and info["layers_after"] == 3
    assert info["params_before"] == info["params_after"] + layer_params == count_params(model) + layer_params
    assert_same_logits(logits(model, calib[:3]), before, atol=1e-5)  # the identity layer did nothing
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert greedy(model, prompt) == gen_before
    check_roundtrip(model, tmp_path / "m", calib[:3], prompt)


def test_block_influence_ignores_padding(make_model, calib):
    """Rows batched with padding give the token-weighted mean of the rows scored one by one."""
    model = make_model(layers=3)
    seqs = [s[5 * i:] for i, s in enumerate(calib)]  # no common prefix: plain padded batches
    assert common_prefix(seqs, [len(s) for s in seqs], 1) == 0
    assert len({len(s) for s in seqs}) > 1  # the batch needs padding
    together = torch.tensor(block_influence(model, seqs))
    alone = torch.tensor([block_influence(model, [s]) for s in seqs])
    weights = torch.tensor([len(s) for s in seqs], dtype=torch.float32)
    expected = (alone * weights[:, None]).sum(0) / weights.sum()
    torch.testing.assert_close(together, expected, rtol=1e-4, atol=1e-6)


def test_calibration_runs_the_shared_prefix_once(make_model, calib):
    """The rows' common prefix (the system prompt) runs once as a KV cache and counts once: the result equals a plain
    computation over every full row, one at a time, that counts the prefix tokens of the first row only."""
    model = make_model(layers=3)
    p = common_prefix(calib, [len(s) - 1 for s in calib], 8)
    assert p > 20
    got = block_influence(model, calib)
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for r, s in enumerate(calib):
            seen = {}
            handles = [layer.register_forward_hook(
                lambda m, a, k, o, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"], o)), with_kwargs=True)
                for i, layer in enumerate(model.model.layers)]
            model.model(input_ids=torch.tensor([s]))
            for h in handles:
                h.remove()
            start = 0 if r == 0 else p
            for i, (x, o) in seen.items():
                o = o[0] if isinstance(o, tuple) else o
                sums[i] += torch.nn.functional.cosine_similarity(x[0], o[0], dim=-1)[start:].double().sum()
            count += len(s) - start
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), 1 - sums / count, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_depth_pruned_model_saves_reloads_and_generates(make_model, calib, tmp_path, arch):
    model = make_model(layers=4, arch=arch)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    n_before = count_params(model)
    info = prune_depth(model, 2, calib)
    scores = info["block_influence"]
    assert sorted(info["dropped"]) == sorted(sorted(range(4), key=lambda i: scores[i])[:2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert info["params_before"] == n_before > info["params_after"] == count_params(model)
    if arch == "qwen2":
        assert types_before == ["full_attention"] * 2 + ["sliding_attention"] * 2
        assert model.config.layer_types == [types_before[i] for i in info["kept"]]
    loaded = check_roundtrip(model, tmp_path / "m", calib[:3], calib[1][:30])
    assert loaded.config.num_hidden_layers == 2


def test_depth_bad_counts(make_model, calib):
    model = make_model(layers=2)
    for n in (2, 5, -1):
        with pytest.raises(CompressError, match="at least one must stay"):
            prune_depth(model, n, calib)
    assert len(model.model.layers) == 2
    info = prune_depth(model, 0, calib)
    assert info["dropped"] == [] and len(model.model.layers) == 2


# ---------------------------------------------------------------- width
@pytest.mark.parametrize("arch,kv", [("llama", 2), ("llama", 4), ("qwen2", 2)], ids=["llama-gqa", "llama-mha",
                                                                                       "qwen2-gqa"])
def test_width_pruning_removes_dead_channels_and_heads_exactly(make_model, calib, tmp_path, arch, kv):
    """Half the MLP channels and half the query heads of every group (every head, without GQA) are made dead; pruning
    must remove exactly those, so the pruned model computes what the original computed."""
    model = make_model(layers=3, kv=kv, arch=arch)
    gen = torch.Generator().manual_seed(1)
    n_heads, head_dim, n_rep = 4, 16, 4 // kv
    dead_heads, expected_heads = [], []
    with torch.no_grad():
        for layer in model.model.layers:
            dead = torch.randperm(128, generator=gen)[:64]
            layer.mlp.gate_proj.weight[dead] = 0  # silu(0) * up = 0: the channel never fires
            if n_rep > 1:  # one of the two query heads of each kv group
                heads = [g * n_rep + int(torch.randint(n_rep, (1,), generator=gen)) for g in range(kv)]
            else:
                heads = sorted(torch.randperm(n_heads, generator=gen)[:2].tolist())
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            dead_heads.append(heads)
            expected_heads.append([h for h in range(n_heads) if h not in heads])
    before = logits(model, calib[:3])
    old_q = [layer.self_attn.q_proj.weight.clone() for layer in model.model.layers]
    info = prune_width(model, calib, mlp_keep=0.5, heads_keep=0.5)
    assert info["kept_heads"] == expected_heads
    assert info["intermediate_after"] == model.config.intermediate_size == 64
    assert info["heads_after"] == model.config.num_attention_heads == 2
    assert model.config.num_key_value_heads == (kv if n_rep > 1 else 2)
    assert model.config.head_dim == head_dim != model.config.hidden_size // model.config.num_attention_heads
    assert info["params_after"] < info["params_before"]
    for layer, q, keep in zip(model.model.layers, old_q, expected_heads):
        torch.testing.assert_close(layer.self_attn.q_proj.weight, q.view(n_heads, head_dim, -1)[keep].reshape(-1, 64))
        assert (layer.mlp.gate_proj.weight.abs().sum(1) > 0).all()  # no dead channel survived
    assert_same_logits(logits(model, calib[:3]), before, atol=1e-5)
    loaded = check_roundtrip(model, tmp_path / "m", calib[:3], calib[2][:30])
    assert loaded.config.head_dim == head_dim and loaded.config.num_attention_heads == 2


def test_width_pruning_of_a_trained_like_model_keeps_the_most_active(make_model, calib, tmp_path):
    """No dead units: the kept MLP channels are those with the largest mean |act(gate(x)) * up(x)| (over every row,
    run alone; the shared prefix counted once)."""
    model = make_model(layers=2)
    p = common_prefix(calib, [len(s) - 1 for s in calib], 8)
    acts = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0][0].abs()))
    with torch.no_grad():
        for s in calib:
            model.model(input_ids=torch.tensor([s]))
    hook.remove()
    mean = torch.cat([a if r == 0 else a[p:] for r, a in enumerate(acts)]).mean(0)
    want = torch.sort(torch.topk(mean, 96).indices).values
    old_up = model.model.layers[1].mlp.up_proj.weight.clone()
    info = prune_width(model, calib, mlp_keep=0.75)
    assert info["heads_after"] == info["heads_before"] == 4  # heads_keep=1: attention untouched
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, old_up[want])
    check_roundtrip(model, tmp_path / "m", calib[:2], calib[0][:30])


def test_width_noop_and_bad_fractions(make_model, calib):
    model = make_model(layers=2)
    before = logits(model, calib[:2])
    n = count_params(model)
    info = prune_width(model, calib, mlp_keep=1.0, heads_keep=0.8)  # 0.8 x 2 heads per group rounds to 2
    assert info["params_after"] == n
    assert "unchanged" in info["note"]
    assert_same_logits(logits(model, calib[:2]), before, atol=0)
    for kw in ({"mlp_keep": 0.0}, {"mlp_keep": 1.5}, {"heads_keep": 0.0}):
        with pytest.raises(CompressError, match="must lie in"):
            prune_width(model, calib, **{"mlp_keep": 0.5, **kw})


# ---------------------------------------------------------------- unstructured sparsity
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsify_zeroes_the_requested_fraction_of_every_row(make_model, calib, tmp_path, method):
    model = make_model(layers=2)
    emb = model.get_input_embeddings().weight.clone()
    info = sparsify(model, calib, 0.5, method)
    for layer in model.model.layers:
        for name in LINEARS:
            w = layer.get_submodule(name).weight
            zeros_per_row = (w == 0).sum(1)
            assert (zeros_per_row == round(0.5 * w.shape[1])).all(), name
    assert info["achieved"] == pytest.approx(0.5, abs=1e-6)
    assert info["sparsity_method"] == method and "dense" in info["note"]
    torch.testing.assert_close(model.get_input_embeddings().weight, emb)  # embeddings / LM head stay dense
    loaded = reload(model, tmp_path / "m")
    assert_same_logits(logits(model, calib[:2]), logits(loaded, calib[:2]), atol=1e-6)


def test_wanda_weighs_input_activations(make_model, calib):
    """Input channel 0 of layer 0's attention gets 50x larger activations: Wanda keeps every weight reading it,
    magnitude (which ignores activations) drops about half of them; elsewhere the two choose differently too."""
    models = {}
    for method in ("magnitude", "wanda"):
        model = make_model(layers=2)
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[0] = 50.0
        sparsify(model, calib, 0.5, method)
        models[method] = model
    q_w = models["wanda"].model.layers[0].self_attn.q_proj.weight
    q_m = models["magnitude"].model.layers[0].self_attn.q_proj.weight
    assert (q_w[:, 0] != 0).all()
    assert (q_m[:, 0] == 0).sum() > 10
    for name in LINEARS:
        a = models["wanda"].model.layers[1].get_submodule(name).weight == 0
        b = models["magnitude"].model.layers[1].get_submodule(name).weight == 0
        assert (a != b).float().mean() > 0.01, name


def test_sparsify_bad_input(make_model, calib):
    model = make_model(layers=2)
    with pytest.raises(CompressError, match=r"\[0, 1\)"):
        sparsify(model, calib, 1.0)
    with pytest.raises(CompressError, match="unknown sparsity method"):
        sparsify(model, calib, 0.5, "random")
    with pytest.raises(CompressError, match="no calibration rows"):
        sparsify(model, None, 0.5, "wanda")
    assert sparsify(model, None, 0.25, "magnitude")["achieved"] == pytest.approx(0.25, abs=1e-6)
