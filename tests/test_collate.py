"""Packing and the answer-only loss: a packed micro-batch gives exactly the loss of its examples run one by one, the
LM-head shortcut equals the model's own forward, rows respect max_len and every example appears exactly once."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import ticket_rows, write_jsonl
from llmstack.config import validate
from training import data as data_mod
from training.collate import Collator, _pack, answer_loss
from training.config import DataCfg


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The tiny model, float32, eval mode, with its matrices re-drawn at std 0.2.

    At the default init (std 0.02) attention is almost uniform, so letting examples see each other changes the loss
    by only ~2e-4 relative, too close to the tolerance to catch a broken mask; at std 0.2 it changes it by ~1e-2 while
    the exact computations still agree to ~1e-7.
    """
    from training.model import load_model

    model = load_model(str(tiny_model_dir), "float32", "sdpa")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    return model


@pytest.fixture(scope="module")
def features(tmp_path_factory, tokenizer) -> list[dict]:
    """Real encoded ticket examples (chat template, answer-only labels) of different lengths."""
    path = write_jsonl(tmp_path_factory.mktemp("collate") / "rows.jsonl", ticket_rows(7))
    cfg = validate(DataCfg, {"train": [{"path": str(path)}], "validation": [], "test": [], "val_ratio": 0})
    rows = data_mod.prepare(cfg, tokenizer, 0).train
    assert len({len(e.input_ids) for e in rows}) > 1
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]


def one_by_one(model, feats, pad_id, fast=True):
    """Reference: every example alone, unpacked, no padding."""
    total, count = torch.tensor(0.0), 0
    single = Collator(pad_id, max_len=10_000, pack=False)
    with torch.no_grad():
        for f in feats:
            loss, n = answer_loss(model, single([f]), fast=fast)
            total, count = total + loss, count + n
    return total, count


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "model-forward"])
def test_packed_loss_equals_examples_run_one_by_one(tiny_model, features, tokenizer, fast):
    longest = max(len(f["input_ids"]) for f in features)
    max_len = int(longest * 2.5)  # several examples per row, and more than one row
    batch = Collator(tokenizer.pad_token_id, max_len, pack=True)(features)
    assert 1 < batch["input_ids"].shape[0] < len(features)
    with torch.no_grad():
        packed, n_packed = answer_loss(tiny_model, batch, fast=fast)
    ref, n_ref = one_by_one(tiny_model, features, tokenizer.pad_token_id, fast=fast)
    assert n_packed == n_ref == sum(sum(1 for t in f["labels"][1:] if t != -100) for f in features)
    assert torch.isfinite(packed)
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-6)


def test_padded_unpacked_batch_equals_one_by_one(tiny_model, features, tokenizer):
    batch = Collator(tokenizer.pad_token_id, 4096, pack=False)(features)
    assert batch["input_ids"].shape[0] == len(features)
    with torch.no_grad():
        padded, n = answer_loss(tiny_model, batch, fast=True)
    ref, n_ref = one_by_one(tiny_model, features, tokenizer.pad_token_id)
    assert n == n_ref
    torch.testing.assert_close(padded, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pack", [True, False])
def test_fast_head_equals_model_forward(tiny_model, features, tokenizer, pack):
    batch = Collator(tokenizer.pad_token_id, 1024, pack=pack)(features)
    with torch.no_grad():
        fast, n_fast = answer_loss(tiny_model, batch, fast=True)
        slow, n_slow = answer_loss(tiny_model, batch, fast=False)
    assert n_fast == n_slow > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)


def test_packing_isolates_examples(tiny_model, features, tokenizer):
    """Changing one example's tokens must not change the loss of the examples packed next to it."""
    collate = Collator(tokenizer.pad_token_id, 10_000, pack=True)  # everything in one row
    a, b = features[0], features[1]
    changed = dict(b, input_ids=[(t + 7) % 1000 + 20 if lbl == -100 else t for t, lbl in zip(b["input_ids"],
                                                                                              b["labels"])])
    with torch.no_grad():
        la_alone, _ = answer_loss(tiny_model, collate([a]))
        lb1, _ = answer_loss(tiny_model, collate([b]))
        lb2, _ = answer_loss(tiny_model, collate([changed]))
        both1, _ = answer_loss(tiny_model, collate([a, b]))
        both2, _ = answer_loss(tiny_model, collate([a, changed]))
    assert not torch.allclose(lb1, lb2)  # the change matters to b itself ...
    torch.testing.assert_close(both1 - lb1, la_alone, rtol=1e-4, atol=1e-6)  # ... but not to a
    torch.testing.assert_close(both2 - lb2, la_alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_packed_rows_fit_and_hold_every_example_once(seed):
    rng = random.Random(seed)
    max_len = rng.randint(40, 120)
    n = rng.randint(3, 25)
    lengths = [rng.randint(2, max_len) for _ in range(n)]
    # example i is made of token 1000 + i only, so it can be recognised in the packed rows
    feats = [{"input_ids": [1000 + i] * L, "labels": [-100] * (L // 2) + [1000 + i] * (L - L // 2)}
             for i, L in enumerate(lengths)]
    pad = 2
    batch = Collator(pad, max_len, pack=True)(feats)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert batch["n_tokens"].item() == sum(lengths)
    assert ids.shape[1] <= max_len
    rows_used = []
    for r in range(ids.shape[0]):
        row = ids[r].tolist()
        real = [t for t in row if t != pad]
        assert len(real) <= max_len
        rows_used.append(len(real))
        found = {}
        for t in real:
            found[t] = found.get(t, 0) + 1
        for t, cnt in found.items():
            assert cnt == lengths[t - 1000], "an example was split across rows or repeated"
    seen = sorted(t for r in range(ids.shape[0]) for t in set(ids[r].tolist()) if t != pad)
    assert seen == [1000 + i for i in range(n)], "every example appears exactly once"
    # positions restart at 0 for each example and count up inside it
    for r in range(ids.shape[0]):
        row, p = ids[r].tolist(), pos[r].tolist()
        for i in range(len(row)):
            if row[i] == pad:
                continue
            if i == 0 or row[i - 1] != row[i]:
                assert p[i] == 0
            else:
                assert p[i] == p[i - 1] + 1
    # a sequence's first token is never a target; other labels are kept
    for f, i in zip(feats, range(n)):
        mask = ids == 1000 + i
        got = labels[mask].tolist()
        assert got[0] == -100 and got[1:] == f["labels"][1:]
    assert (labels[ids == pad] == -100).all()
    # as few rows as possible in the first-fit sense: no two rows could have been merged
    for a in range(len(rows_used)):
        for b in range(a + 1, len(rows_used)):
            assert rows_used[a] + rows_used[b] > max_len


def test_block_diagonal_mask_has_no_cross_example_attention():
    feats = [{"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}, {"input_ids": [20, 21], "labels": [-100, 21]}]
    batch = Collator(0, 8, pack=True)(feats)
    mask = batch["attention_mask"][0, 0]
    ids = batch["input_ids"][0].tolist()
    allowed = mask == 0
    for q in range(len(ids)):
        for k in range(len(ids)):
            same = (ids[q] // 10 == ids[k] // 10) and ids[q] != 0
            if allowed[q, k] and q != k:
                assert same and k < q, (q, k)
            if same and k <= q:
                assert allowed[q, k]


def test_pack_puts_each_index_once():
    lengths = [5, 9, 3, 7, 2, 8]
    rows = _pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
