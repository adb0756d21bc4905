"""Distillation on tiny random-weight decoders: it lowers the teacher-student KL, matches the KD formula, stops on its
time budget, keeps sparsity when asked and rejects bad input."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from compress_fixtures import calib, make_model, rows  # noqa: F401  (fixtures)
from compression.config import DistillCfg
from compression.distill import distill, kd_loss
from compression.prune import prune_depth, prune_width, sparsify
from core.errors import CompressError


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


def test_training_only_the_top_layers_leaves_the_rest_untouched(pair, rows, tokenizer):
    teacher, student = pair
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillCfg(steps=3, batch_size=2, lr=5e-3, max_minutes=5, train_layers=1, seed=0)
    distill(student, teacher, rows, tokenizer.pad_token_id, cfg, 384, progress=False)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed), changed
    assert any(k.startswith("model.layers.1.mlp") for k in changed)
    assert all(p.requires_grad for p in student.parameters())  # unfrozen again afterwards


def test_alpha_zero_is_cross_entropy_without_the_teacher(pair, rows, tokenizer):
    teacher, student = pair
    teacher = copy.deepcopy(teacher)

    def refuse(*_):
        raise AssertionError("the teacher ran")

    teacher.model.register_forward_pre_hook(refuse)
    cfg = DistillCfg(steps=2, batch_size=2, lr=5e-3, max_minutes=5, alpha=0.0, seed=0)
    res = distill(copy.deepcopy(student), teacher, rows, tokenizer.pad_token_id, cfg, 384, progress=False)
    assert res["history"] == pytest.approx(res["history_ce"], rel=1e-6) and set(res["history_kl"]) == {0.0}


def test_lora_recovery_merges_into_plain_weights(pair, rows, tokenizer, tmp_path):
    teacher, student = pair
    student = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kl_before = kl_on(student, teacher, rows)
    cfg = DistillCfg(steps=6, batch_size=2, lr=2e-2, max_minutes=5, lora_rank=4, train_layers=1, alpha=1.0, seed=0)
    distill(student, teacher, rows, tokenizer.pad_token_id, cfg, 384, progress=False)
    assert set(student.state_dict()) == set(before)  # no lora_A / lora_B left: merged into the Linear weights
    assert all(type(m).__name__ != "LoraLayer" and "lora" not in type(m).__name__.lower() for m in student.modules())
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed
    assert kl_on(student, teacher, rows) < kl_before
    from compress_fixtures import reload
    assert_close = torch.testing.assert_close
    loaded = reload(student, tmp_path / "s")
    ids = torch.tensor([rows[0].input_ids])
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=1e-5)
