"""Packing and the answer-only loss: a packed micro-batch gives exactly the loss of its examples run one by one, the
LM-head shortcut equals the model's own forward, rows respect max_len and every example appears exactly once."""
from __future__ import annotations

import random

import pytest
import torch

from chatdata import pipeline as data_mod
from conftest import ticket_rows, write_jsonl
from core.config import validate
from modeling.collate import Collator, _pack, answer_loss
from training.config import DataCfg


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The tiny model, float32, eval mode, with its matrices re-drawn at std 0.2.

    At the default init (std 0.02) attention is almost uniform, so letting examples see each other changes the loss
    by only ~2e-4 relative, too close to the tolerance to catch a broken mask; at std 0.2 it changes it by ~1e-2 while
    the exact computations still agree to ~1e-7.
    """
    from modeling.model import load_model

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


# ---------------------------------------------------------------- shared prefix, sdpa_gqa, top-layer LoRA
def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_model, features, tokenizer):
    """Computing the batch's common prompt prefix once is exact: same loss, same gradients as the plain batch."""
    plain = Collator(tokenizer.pad_token_id, max_len=1024, pack=True)(features)
    shared = Collator(tokenizer.pad_token_id, max_len=1024, pack=True, share_prefix=True)(features)
    assert shared["prefix_ids"].shape[1] >= 8, "ticket rows share the system prompt and instruction"
    assert shared["input_ids"].numel() < plain["input_ids"].numel()
    results = []
    for batch in (plain, shared):
        tiny_model.zero_grad()
        with torch.enable_grad():
            loss, n = answer_loss(tiny_model, batch)
            loss.backward()
        results.append((loss.detach(), n, _grads(tiny_model)))
    tiny_model.zero_grad()
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    assert float((g2 - g1).norm() / g1.norm()) < 1e-5  # float32 summation order differs; a wrong mask gives ~1e-1


def test_shared_prefix_stops_before_every_answer():
    from modeling.collate import shared_prefix

    ids = [list(range(20)) + [50, 51], list(range(20)) + [60]]
    labels = [[-100] * 12 + list(range(12, 20)) + [50, 51], [-100] * 20 + [60]]
    assert shared_prefix(ids, labels, min_len=4) == 11  # the first answer token (12) must still be predicted
    assert shared_prefix(ids, labels, min_len=12) == 0  # shorter than min_len: not worth it
    assert shared_prefix(ids[:1], labels[:1], min_len=4) == 0  # a single example: nothing to share


def test_generation_with_a_shared_prefix_equals_plain_generation(tiny_model, tokenizer):
    from evaluation import quality as ev

    prompts = [[{"role": "user", "content": f"Triage the ticket. Reply with only JSON. {text}"}]
               for text in ("router broken", "I was charged twice for my camera last month", "hi", "refund?")]
    plain = ev.generate(tiny_model, tokenizer, prompts, max_new_tokens=12, batch_size=4, share_prefix=False)
    shared = ev.generate(tiny_model, tokenizer, prompts, max_new_tokens=12, batch_size=4, share_prefix=True)
    assert shared == plain
    assert len(set(plain)) > 1, "the model must produce prompt-dependent text for this to mean anything"


def test_sdpa_gqa_attention_equals_transformers_sdpa(tiny_model_dir, tokenizer):
    """Our attention (torch groups the query heads) gives transformers' sdpa result on a padded batch, with a cache."""
    from modeling.model import load_model

    models = [load_model(str(tiny_model_dir), "float32", attn).eval() for attn in ("sdpa", "sdpa_gqa")]
    assert models[0].config.num_key_value_heads < models[0].config.num_attention_heads  # GQA is exercised
    enc = tokenizer(["a short one", "a much longer prompt with many more tokens in it"], return_tensors="pt",
                    padding=True, padding_side="left")
    with torch.no_grad():
        logits = [m(**enc).logits for m in models]
        gens = [m.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                for m in models]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(gens[0], gens[1])


def test_lora_layers_puts_adapters_on_the_top_layers_only(tiny_model_dir):
    from core.errors import ConfigError
    from modeling.model import load_model
    from training import methods
    from training.config import MethodCfg

    model = methods.apply(load_model(str(tiny_model_dir)), MethodCfg(name="lora", lora_layers=1), 10)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"1"}  # 2 layers: only the top one
    assert {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n} >= {"q_proj", "down_proj"}
    with pytest.raises(ConfigError, match="2 decoder layers, fewer than 3"):
        methods.apply(load_model(str(tiny_model_dir)), MethodCfg(name="lora", lora_layers=3), 10)


def test_lora_layers_is_refused_for_methods_without_layers():
    from pydantic import ValidationError

    from training.config import TrainConfig

    with pytest.raises(ValidationError, match="lora_layers applies to lora, dora and ia3, not prefix"):
        TrainConfig.model_validate({"method": {"name": "prefix", "lora_layers": 2}})
