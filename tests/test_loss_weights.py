"""Per-example loss weights (Kamiran & Calders reweighing): the collator gives every token its example's weight on
every layout (padded, packed, shared prefix), and the answer loss of a weighted batch, and its gradient, are the
weighted sums of the examples' own losses and gradients computed one by one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ticket_rows, write_jsonl

from chatdata import pipeline as data_mod
from core.config import validate
from modeling.collate import Collator, answer_loss
from training.config import DataCfg

WEIGHTS = (0.5, 1.0, 2.5)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model, float32, eval mode (no dropout), every parameter trainable."""
    from modeling.model import load_model

    return load_model(str(tiny_model_dir), "float32", "sdpa").eval()


@pytest.fixture(scope="module")
def features(tmp_path_factory, tokenizer) -> list[dict]:
    """Three encoded ticket examples of different lengths; they share the system prompt and instruction."""
    path = write_jsonl(tmp_path_factory.mktemp("weights") / "rows.jsonl", ticket_rows(3))
    cfg = validate(DataCfg, {"train": [{"path": str(path)}], "validation": [], "test": [], "val_ratio": 0})
    rows = data_mod.prepare(cfg, tokenizer, 0).train
    assert len(rows) == 3 and len({len(e.input_ids) for e in rows}) > 1
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]


def _params(model) -> list[torch.nn.Parameter]:
    """A top-layer matrix and the (tied) embedding / LM head: both see every answer token's loss."""
    return [model.model.layers[-1].mlp.down_proj.weight, model.get_output_embeddings().weight]


def _loss_and_grads(model, batch, fast=True):
    model.zero_grad()
    with torch.enable_grad():
        loss, n = answer_loss(model, batch, fast=fast)
        loss.backward()
    grads = [p.grad.detach().clone() for p in _params(model)]
    model.zero_grad()
    return loss.detach(), n, grads


def _assert_grads_close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


LAYOUTS = {  # name: (pack, share_prefix, max_len)
    "padded": (False, False, 4096),
    "packed": (True, False, 4096),  # all three in one row
    "prefix-packed": (True, True, 4096),
    "prefix-unpacked": (False, True, 4096),
}


@pytest.mark.parametrize("layout, fast", [(name, True) for name in LAYOUTS] + [("padded", False), ("packed", False)],
                         ids=[*LAYOUTS, "padded-model-forward", "packed-model-forward"])
def test_weighted_loss_and_gradient_are_the_weighted_sums_of_the_examples_alone(model, features, tokenizer, layout,
                                                                                 fast):
    pack, share, max_len = LAYOUTS[layout]
    pad = tokenizer.pad_token_id
    alone = [_loss_and_grads(model, Collator(pad, 10_000, pack=False)([f]), fast) for f in features]
    want_loss = sum(w * loss for w, (loss, _, _) in zip(WEIGHTS, alone))
    want_grads = [sum(w * grads[k] for w, (_, _, grads) in zip(WEIGHTS, alone)) for k in range(len(_params(model)))]

    batch = Collator(pad, max_len, pack=pack, share_prefix=share)([f | {"weight": w}
                                                                    for f, w in zip(features, WEIGHTS)])
    assert batch["loss_weights"].shape == batch["labels"].shape and batch["loss_weights"].dtype == torch.float32
    assert ("prefix_ids" in batch) == share
    if share:
        assert batch["prefix_ids"].shape[1] >= 8
    if pack:
        assert batch["input_ids"].shape[0] == 1, "the examples share a row"
    loss, n, grads = _loss_and_grads(model, batch, fast)

    assert n == sum(n_i for _, n_i, _ in alone), "the answer-token count stays unweighted"
    assert torch.allclose(loss, want_loss, rtol=1e-4)
    _assert_grads_close(grads, want_grads)
    # reweighting really changed something: the unweighted sums differ from the weighted ones
    assert not torch.allclose(loss, sum(loss_i for loss_i, _, _ in alone), rtol=1e-2)
    plain = [sum(g[k] for _, _, g in alone) for k in range(len(grads))]
    assert float((grads[1] - plain[1]).norm() / plain[1].norm()) > 1e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_weights_of_one_give_the_unweighted_batch_and_no_weight_gives_no_key(model, features, tokenizer, layout):
    pack, share, max_len = LAYOUTS[layout]
    collate = Collator(tokenizer.pad_token_id, max_len, pack=pack, share_prefix=share)
    plain = collate(features)
    ones = collate([f | {"weight": 1.0} for f in features])
    assert "loss_weights" not in plain
    assert set(ones) == set(plain) | {"loss_weights"}
    for k in plain:
        assert torch.equal(ones[k], plain[k]), k  # the weights leave the layout alone
    answer = ones["labels"] != -100
    assert answer.any() and (ones["loss_weights"][answer] == 1.0).all()
    with torch.no_grad():
        (l_plain, n_plain), (l_ones, n_ones) = answer_loss(model, plain), answer_loss(model, ones)
    assert n_ones == n_plain
    assert torch.allclose(l_ones, l_plain, rtol=1e-6)


def test_weights_follow_their_examples_through_packing():
    """Each example's tokens carry its own weight, wherever first-fit decreasing puts it (example i is token 100+i)."""
    lengths, weights = [5, 9, 3, 7], [0.25, 2.0, 3.0, 0.5]
    feats = [{"input_ids": [100 + i] * L, "labels": [100 + i] * L, "weight": w}
             for i, (L, w) in enumerate(zip(lengths, weights))]
    for pack in (True, False):
        batch = Collator(0, 12, pack=pack)(feats)
        assert batch["input_ids"].shape[0] == (2 if pack else 4)
        for i, w in enumerate(weights):
            assert (batch["loss_weights"][batch["input_ids"] == 100 + i] == w).all()


def test_features_carry_weights_only_when_some_differ_from_one():
    from training.sft.trainer import _features

    row = lambda **w: SimpleNamespace(input_ids=[1, 2, 3], labels=[-100, 2, 3], **w)  # noqa: E731
    assert _features([row(), row()]) == [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 2  # no weight field
    assert all("weight" not in f for f in _features([row(weight=1.0), row(weight=1.0)]))
    got = _features([row(weight=1.0), row(weight=2.5), row()])
    assert [f["weight"] for f in got] == [1.0, 2.5, 1.0]


def test_trainer_loss_is_weighted_on_the_wrapped_model_path(model, features, tokenizer, tmp_path):
    """AnswerLossTrainer.compute_loss keeps `loss_weights` in the batch, also when the model is wrapped (here in
    DataParallel, which unwrap_model unwraps, so the fast path runs as the wrapper's replaced forward)."""
    from transformers import TrainingArguments

    from training.sft.trainer import AnswerLossTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = AnswerLossTrainer(model=model, args=args)
    collate = Collator(tokenizer.pad_token_id, 4096, pack=True, share_prefix=True)
    weighted = collate([f | {"weight": w} for f, w in zip(features, WEIGHTS)])
    with torch.no_grad():
        want, n = answer_loss(model, weighted)
        plain = trainer.compute_loss(model, collate(features))
        for wrapped in (model, torch.nn.DataParallel(model)):
            got = trainer.compute_loss(wrapped, dict(weighted))
            assert torch.allclose(got, want / n, rtol=1e-5)
            assert not torch.allclose(got, plain, rtol=1e-2)
