"""Block quantization with MatMulNBits on tiny models: int8 blocks, 4-bit with mixed precision, the 4-bit base grid
with its low-rank correction, and the sensitivity ranking that picks the layers kept at 8 bits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from compress_fixtures import make_model, rows  # noqa: F401  (fixtures)
from compression.export import export_onnx
from compression.quantize import int4, int8_block
from compression.quantize.base_grid import int4_base_grid, q4_grid, q8_grid
from compression.sensitivity import fake_quant, layer_matmul_names, rank_layers
from core.errors import CompressError
from runtimes.onnx import load_ort

CHATS = [[{"role": "user", "content": t}] for t in (
    "Where is my parcel? It was due last Tuesday and the tracking page has not changed since.",
    "Cancel my subscription and confirm by email.")]


def _graph(folder):
    import onnx
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def _bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".onnx_data"))


def _ids(tokenizer, chat):
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _logits(model, tokenizer, chat) -> np.ndarray:
    ids = _ids(tokenizer, chat)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy()


def _greedy(model, tokenizer, chats, n=6) -> list[list[int]]:
    """Greedy tokens for several chats in one left-padded batch."""
    ids = [_ids(tokenizer, c)[0].tolist() for c in chats]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=pad)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def fp32_dir(tiny_onnx_dir):
    return tiny_onnx_dir


def test_int8_block_is_near_lossless_and_shares_the_tied_embedding(fp32_dir, tmp_path, tokenizer):
    out = int8_block(fp32_dir, tmp_path / "int8")
    ops = [n.op_type for n in _graph(out).node]
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops and "MatMul" in ops  # attention stays float
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in _graph(out).node if n.op_type == "MatMulNBits"}
    assert bits == {8}
    assert _bytes(fp32_dir) / _bytes(out) > 3.3  # 8 bits + a float scale per 32 weights, the embedding stored once
    ref, got = (_logits(load_ort(d, threads=1), tokenizer, CHATS[0]) for d in (fp32_dir, out))
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_int4_keeps_the_named_matmuls_at_8_bits(fp32_dir, tmp_path):
    eight = layer_matmul_names([1])
    out = int4(fp32_dir, tmp_path / "mixed", int8_nodes=eight)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in _graph(out).node
            if n.op_type == "MatMulNBits"}
    assert {bits[f"{name}_Q8"] for name in eight} == {8}
    assert {b for name, b in bits.items() if not any(name.startswith(e) for e in eight)} == {4}
    plain = int4(fp32_dir, tmp_path / "plain")
    assert _bytes(plain) < _bytes(out) < _bytes(fp32_dir)
    with pytest.raises(CompressError, match="does not have"):
        int4(fp32_dir, tmp_path / "bad", int8_nodes=["/model/layers.9/mlp/up_proj/MatMul"])


def test_int4_generates_the_same_tokens_batched_and_one_by_one(fp32_dir, tmp_path, tokenizer):
    model = load_ort(int4(fp32_dir, tmp_path / "int4", algorithm="k_quant"), threads=1)
    together = _greedy(model, tokenizer, CHATS)
    assert together == [_greedy(model, tokenizer, [c])[0] for c in CHATS]


def test_grids_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    _, _, _, deq = q4_grid(w, 32)
    _, _, deq2 = q4_grid(deq, 32)[1:]
    assert np.abs(deq2 - deq).max() < 1e-5  # a matrix on the grid is reproduced exactly
    assert np.abs(deq - w).max() <= (w.max() - w.min()) / 15  # within a step of the block's range
    _, _, d8 = q8_grid(w[:40], 32)  # padded to whole blocks, cut back
    assert d8.shape == (40, 8) and np.abs(d8 - w[:40]).max() < np.abs(w).max() / 100


@pytest.fixture(scope="module")
def finetune(tiny_model_dir, tmp_path_factory, tokenizer):
    """A base model whose linear weights lie on the 4-bit grid (and embedding on the 8-bit one), and its 'fine-tune':
    layer 1's q_proj and down_proj changed by a rank-2 product; both saved, the fine-tune exported to ONNX."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("basegrid")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.from_numpy(q4_grid(p.T.numpy(), 32)[3].T.copy()))
            elif "embed" in name:
                p.copy_(torch.from_numpy(q8_grid(p.T.numpy(), 32)[2].T.copy()))
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
            out, k = lin.weight.shape
            lin.weight += 0.05 * torch.randn(out, 2, generator=gen) @ torch.randn(2, k, generator=gen)
    model.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    return root / "base", export_onnx(root / "tuned", root / "onnx")


def test_base_grid_is_exact_for_a_low_rank_change_of_a_grid_base(finetune, tmp_path, tokenizer):
    base, onnx_dir = finetune
    out, info = int4_base_grid(onnx_dir, tmp_path / "q", base, rank=4, accuracy_level=0, branch_bits=32)
    assert info["exact_base"] == info["matmuls"] == 14 and info["corrected"] == 2 and info["max_residual"] < 1e-5
    ref, got = (_logits(load_ort(d, threads=1), tokenizer, CHATS[0]) for d in (onnx_dir, out))
    assert np.abs(ref - got).max() < 1e-3
    # stored small: 4-bit codes, the 8-bit head/embedding once (most of this model), 8-bit branches by default
    small, _ = int4_base_grid(onnx_dir, tmp_path / "small", base, rank=4)
    assert _bytes(onnx_dir) / _bytes(small) > 3.3
    assert np.corrcoef(_logits(load_ort(small, threads=1), tokenizer, CHATS[0]).ravel(), ref.ravel())[0, 1] > 0.999


def test_base_grid_without_the_change_loses_it(finetune, tmp_path, tokenizer):
    """Rank 0 (no correction): the 4-bit model is the base model, not the fine-tune."""
    base, onnx_dir = finetune
    out, info = int4_base_grid(onnx_dir, tmp_path / "q", base, rank=0, accuracy_level=0, branch_bits=32)
    assert info["corrected"] == 0
    ref, got = (_logits(load_ort(d, threads=1), tokenizer, CHATS[0]) for d in (onnx_dir, out))
    assert np.abs(ref - got).max() > 1e-2


def test_base_grid_refuses_a_base_of_another_shape(finetune, tmp_path, tiny_model_dir):
    base, onnx_dir = finetune
    other = tmp_path / "other"
    shutil.copytree(base, other)
    from safetensors.torch import load_file, save_file
    w = load_file(str(other / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:8]
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match="up_proj.weight: the base model's shape") as e:
        int4_base_grid(onnx_dir, tmp_path / "q", other)
    assert e.value.field == "quantize.int4_base_grid"
    assert not (tmp_path / "q" / "model.onnx").exists()


def test_fake_quant_matches_the_block_grid():
    w = torch.randn(8, 64)
    q = fake_quant(w, 4, 32, symmetric=False)
    assert (q - w).abs().max() <= (w.max() - w.min()) / 15
    assert torch.equal(fake_quant(q, 4, 32, symmetric=False), q) or (fake_quant(q, 4, 32, False) - q).abs().max() < 1e-6
    assert len(torch.unique(fake_quant(w, 4, 32, True)[0, :32])) <= 16


def test_sensitivity_ranks_a_damaged_layer_first(make_model, rows):  # noqa: F811
    model = make_model(layers=4)
    with torch.no_grad():  # layer 2: one huge weight per block of 32 makes 4-bit rounding wipe out the rest
        for lin in (model.model.layers[2].mlp.down_proj, model.model.layers[2].self_attn.o_proj):
            lin.weight[:, ::32] = 40.0
    ranking = rank_layers(model, rows[:4], block=32, symmetric=False, pad_id=0)
    assert [r["layer"] for r in ranking][0] == 2
    assert ranking[0]["kl"] > 2 * ranking[1]["kl"]
    assert sorted(r["layer"] for r in ranking) == [0, 1, 2, 3]
    # the weights are back as they were
    assert float(model.model.layers[2].mlp.down_proj.weight[0, 0]) == 40.0


def test_int8_block_report_entry(tmp_path):
    """The variant name 'int8_block' is a valid quantize method; int8 methods need format onnx."""
    from compression.config import VariantCfg
    assert VariantCfg(name="x", quantize="int8_block").format == "onnx"
    with pytest.raises(Exception, match="set format: onnx"):
        VariantCfg(name="x", quantize="int8_block", format="pytorch")
    json.dumps(VariantCfg(name="x", quantize="int8_block").model_dump())


def test_answer_loss_with_a_shared_prefix_equals_row_by_row(tiny_model_dir, fp32_dir, rows):  # noqa: F811
    """measure.answer_nll runs the shared prompt prefix once (PyTorch and ONNX Runtime): the same loss as a plain
    forward of each row on its own."""
    import torch.nn.functional as F

    from evaluation.measure import answer_nll
    from modeling.model import load_model

    data = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in rows[:5]]
    pt = load_model(str(tiny_model_dir)).eval()
    expected = 0.0
    with torch.no_grad():
        for r in data:
            logits = pt(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            target = torch.tensor(r["labels"][1:])
            expected += float(F.cross_entropy(logits[target != -100], target[target != -100], reduction="sum"))
    n = sum(sum(t != -100 for t in r["labels"][1:]) for r in data)
    for model in (pt, load_ort(fp32_dir, threads=1)):
        total, count = answer_nll(model, data, 0, batch_size=3)
        assert count == n and total == pytest.approx(expected, rel=1e-4)
