"""Pruning and distillation on tiny random-weight decoders (the real tokenizer's vocabulary).

Depth: block influence finds a layer that is an exact identity and drops it first, and dropping it leaves the logits
unchanged. Width: MLP channels and query heads made dead on purpose are exactly the ones removed, so the pruned model
computes what the original computed. Every pruned model saves, reloads with identical logits and a consistent config,
generates (with and without the KV cache alike) and has fewer parameters. Sparsity: the requested zeros per row,
and Wanda weighs input activations where magnitude does not. Distillation lowers the teacher-student KL, stops on
its time budget and rejects bad input.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import ticket_rows, write_jsonl
from compression.config import DistillCfg
from compression.distill import distill, kd_loss
from compression.prune import (block_influence, calibration_ids, count_params, decoder_layers, prune_depth,
                               prune_width, sparsify)
from llmstack.config import validate
from llmstack.errors import CompressError
from training.collate import common_prefix
from training import data as data_mod
from training.config import DataCfg

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def rows(tmp_path_factory, tokenizer):
    """Real ticket examples, tokenized with the chat template (answer-only labels)."""
    path = write_jsonl(tmp_path_factory.mktemp("prune") / "rows.jsonl", ticket_rows(8))
    cfg = validate(DataCfg, {"train": [{"path": str(path)}], "validation": [], "test": [], "val_ratio": 0})
    out = data_mod.prepare(cfg, tokenizer, 0).train
    assert len(out) == 8
    return out


@pytest.fixture(scope="module")
def calib(rows):
    return calibration_ids(rows, 6)


@pytest.fixture(scope="module")
def make_model(tiny_model_dir):
    """Factory: a tiny decoder like the session's tiny model (its vocabulary and sizes) but deeper, Llama or Qwen2
    (biases on q/k/v, per-layer attention types), with weights re-drawn at `std` so that layers do real work."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    base = AutoConfig.from_pretrained(tiny_model_dir)

    def make(layers: int = 4, kv: int = 2, arch: str = "llama", std: float = 0.1, seed: int = 0):
        common = dict(vocab_size=base.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=True,
                      max_position_embeddings=1024, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                      pad_token_id=base.pad_token_id)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**common))
        else:  # the top half of the layers with sliding-window attention (a window longer than any test sequence)
            model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=2048,
                                                 max_window_layers=layers // 2))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if "norm" in name else noise * (std if p.dim() == 2 else 0.1))
        return model.eval()

    return make


def logits(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The model's own full forward, one sequence at a time (no padding, no shortcuts)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]


def assert_same_logits(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def reload(model, folder):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def greedy(model, prompt: list[int], n: int = 6, use_cache: bool = True) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache)
    return out[0, len(prompt):].tolist()


def assert_consistent(model):
    """The config describes the modules: layer count and indices, MLP width, heads, head_dim, layer types."""
    cfg = model.config
    layers = decoder_layers(model)
    assert cfg.num_hidden_layers == len(layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.layer_idx == i
        assert attn.head_dim == head_dim
        assert attn.q_proj.weight.shape == (cfg.num_attention_heads * head_dim, cfg.hidden_size)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (cfg.num_key_value_heads * head_dim,
                                                                        cfg.hidden_size)
        assert attn.o_proj.weight.shape == (cfg.hidden_size, cfg.num_attention_heads * head_dim)
        assert attn.num_key_value_groups == cfg.num_attention_heads // cfg.num_key_value_heads
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
        assert mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
        if getattr(cfg, "layer_types", None) is not None:
            assert len(cfg.layer_types) == len(layers)
            assert layer.attention_type == cfg.layer_types[i]


def check_roundtrip(model, folder, seqs, prompt):
    """Save + reload gives the same logits and generations, and a consistent config; cached generation equals
    uncached generation (KV cache slots follow the layer indices)."""
    assert_consistent(model)
    loaded = reload(model, folder)
    assert_consistent(loaded)
    assert type(loaded) is type(model)
    assert_same_logits(logits(model, seqs), logits(loaded, seqs), atol=1e-6)
    cached = greedy(loaded, prompt)
    assert len(cached) == 6
    assert cached == greedy(loaded, prompt, use_cache=False) == greedy(model, prompt)
    return loaded


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


# ---------------------------------------------------------------- distillation
def kl_on(student, teacher, rows) -> float:
    """Mean KL(teacher || student) at T=1 over the answer positions, through each model's own full forward."""
    total, n = 0.0, 0
    with torch.no_grad():
        for e in rows:
            ids = torch.tensor([e.input_ids])
            keep = torch.tensor(e.labels[1:]) != -100
            s = torch.log_softmax(student(input_ids=ids).logits[0, :-1][keep], -1)
            t = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1][keep], -1)
            total += float((t.exp() * (t - s)).sum())
            n += int(keep.sum())
    return total / n


@pytest.fixture(scope="module")
def pair(make_model, calib):
    """A 4-layer teacher and its student: half the layers, 3/4 of the MLP, half the query heads."""
    teacher = make_model(layers=4, std=0.1, seed=3)
    student = copy.deepcopy(teacher)
    prune_depth(student, 2, calib)
    prune_width(student, calib, mlp_keep=0.75, heads_keep=0.5)
    return teacher, student


def test_distillation_lowers_the_kl(pair, rows, tokenizer):
    teacher, student = pair
    student = copy.deepcopy(student)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    kl_before = kl_on(student, teacher, rows)
    cfg = DistillCfg(steps=6, batch_size=2, lr=5e-3, max_minutes=5, temperature=2.0, alpha=1.0, seed=0)
    res = distill(student, teacher, rows, tokenizer.pad_token_id, cfg, 384, progress=False)
    kl_after = kl_on(student, teacher, rows)
    assert res["steps"] == 6 and not res["stopped_early"] and len(res["history"]) == 6
    assert res["history"] == pytest.approx([4 * k for k in res["history_kl"]], rel=1e-4)  # alpha=1: T^2 * KL
    assert res["loss_last"] < res["loss_first"]
    assert kl_after < 0.6 * kl_before, (kl_before, kl_after)
    assert not student.training and not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), f"the teacher changed: {k}"
    assert res["answer_tokens"] > 0 and res["seconds"] >= 0


def test_kd_loss_formula():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=gen) * 3, torch.randn(5, 11, generator=gen) * 3
    target = torch.randint(11, (5,), generator=gen)
    loss, kl, ce = kd_loss(s, t, target, alpha=0.3, temperature=2.0)
    p_t = torch.softmax(t / 2, -1)
    want_kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    want_ce = -torch.log_softmax(s, -1)[torch.arange(5), target].mean()
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(loss, 0.3 * 4 * want_kl + 0.7 * want_ce)
    assert float(kd_loss(t, t, target, 1.0, 2.0)[0]) == pytest.approx(0, abs=1e-6)


def test_distillation_stops_on_its_time_budget(pair, rows, tokenizer):
    teacher, student = pair
    student = copy.deepcopy(student)
    cfg = DistillCfg(steps=50, batch_size=2, max_minutes=1e-6)
    res = distill(student, teacher, rows, tokenizer.pad_token_id, cfg, 384, progress=False)
    assert res["steps"] == 1 and res["stopped_early"]
    assert "max_minutes" in res["stop_reason"]
    assert res["loss_first"] == res["loss_last"] == res["history"][0]
    assert not student.training


def test_distillation_keeps_sparsity_when_asked(make_model, calib, rows, tokenizer):
    teacher = make_model(layers=2, seed=5)
    cfg = DistillCfg(steps=2, batch_size=2, lr=1e-3)
    zeros = {}
    for keep in (True, False):
        student = copy.deepcopy(teacher)
        sparsify(student, None, 0.5, "magnitude")
        mask = student.model.layers[0].mlp.up_proj.weight == 0
        distill(student, teacher, rows, tokenizer.pad_token_id, cfg, 384, progress=False, keep_sparsity=keep)
        zeros[keep] = (student.model.layers[0].mlp.up_proj.weight[mask] == 0).float().mean()
    assert zeros[True] == 1.0
    assert zeros[False] < 0.5


def test_distillation_bad_input(make_model, pair, rows, tokenizer):
    teacher, student = pair
    cfg = DistillCfg(steps=1, batch_size=2)
    pad = tokenizer.pad_token_id
    with pytest.raises(CompressError, match="no training rows"):
        distill(student, teacher, [], pad, cfg, 384, progress=False)
    no_answer = dataclasses.replace(rows[0], labels=[-100] * len(rows[0].input_ids))
    with pytest.raises(CompressError, match="1 of 3 distillation rows have no answer tokens") as exc:
        distill(student, teacher, [rows[1], no_answer, rows[2]], pad, cfg, 384, progress=False)
    assert rows[0].source in str(exc.value)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(CompressError, match=r"vocabulary \(1000 tokens\) differs"):
        distill(other, teacher, rows, pad, cfg, 384, progress=False)
    with pytest.raises(CompressError, match="same model object"):
        distill(teacher, teacher, rows, pad, cfg, 384, progress=False)
