"""ONNX export, parity, ONNX Runtime generation and CPU quantization on the tiny random Llama (real vocabulary).

The tiny model's weights are mostly its 49152 x 64 token embedding (tied to the LM head), so the sizes below show
whether the embedding and the head were quantized at all.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from compression.export import check_parity, export_onnx
from compression.quantize import Unavailable, cpu_preset, gpu_quantize, int4, int8_dynamic, int8_static
from core.errors import ArtifactError, CompressError
from runtimes.onnx import load_ort

PROMPTS = ["My invoice was charged twice this month, please refund one of the payments.",
           "The mobile app crashes when I open settings."]
CHATS = [[{"role": "user", "content": t}] for t in (
    "Hi", "Where is my parcel? It was due last Tuesday and the tracking page has not changed since.",
    "Reset my password please", "Cancel my subscription and confirm by email.")]


def _model_bytes(folder) -> int:
    """Bytes of the ONNX graph and its weights (the tokenizer files, the same in every variant, left out)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".onnx_data"))


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def _float_weight_ops(folder) -> list[str]:
    """MatMul / Gather nodes that still read a float weight matrix (a 2-D float initializer, directly or through a
    Transpose)."""
    import onnx

    graph = _graph(folder)
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    floats |= {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in floats}
    return [n.name for n in graph.node if (n.op_type == "MatMul" and n.input[1] in floats)
            or (n.op_type == "Gather" and n.input[0] in floats)]


def _op_types(folder) -> set[str]:
    return {n.op_type for n in _graph(folder).node}


def _greedy_ids(model, tokenizer, chat, n=8) -> list[int]:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def _logits(model, tokenizer, chat) -> np.ndarray:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy()


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory):
    return export_onnx(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="module")
def int8_dir(onnx_dir, tmp_path_factory):
    return int8_dynamic(onnx_dir, tmp_path_factory.mktemp("onnx") / "int8")


@pytest.fixture(scope="module")
def int4_dir(onnx_dir, tmp_path_factory):
    return int4(onnx_dir, tmp_path_factory.mktemp("onnx") / "int4", block_size=32, embeddings=True)


@pytest.fixture(scope="module")
def fp32_logits(onnx_dir, tokenizer):
    return _logits(load_ort(onnx_dir, threads=1), tokenizer, CHATS[1])


def test_export_writes_a_loadable_folder_with_kv_cache_and_passes_parity(tiny_model_dir, onnx_dir):
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (onnx_dir / name).is_file(), name
    # the tokenizer is the model folder's, byte for byte (chat template included)
    assert (onnx_dir / "tokenizer_config.json").read_bytes() == (tiny_model_dir / "tokenizer_config.json").read_bytes()
    graph = _graph(onnx_dir)
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= inputs
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    result = check_parity(tiny_model_dir, onnx_dir, PROMPTS, atol=1e-4, new_tokens=8, threads=1)
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["greedy_identical"] == 1.0


def test_parity_check_fails_against_a_different_model(tiny_model_dir, onnx_dir, tmp_path):
    """The check must catch an ONNX model that does not match: the same architecture with one weight changed."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 3.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match=r"prompt 0 .*max \|logit diff\|"):
        check_parity(other, onnx_dir, PROMPTS[:1], atol=1e-3, new_tokens=4, threads=1)


@pytest.mark.parametrize("damage, message", [
    ("config", "config.json is not valid JSON"),
    ("no-weights", "no weights"),
    ("truncated-weights", "not a readable safetensors file"),
    ("architecture", "architecture 'not-a-real-arch' is not supported"),
    ("missing", "model folder does not exist"),
])
def test_export_rejects_a_broken_model_folder_with_one_line(tiny_model_dir, tmp_path, damage, message):
    bad = tmp_path / "bad-model"
    if damage != "missing":
        shutil.copytree(tiny_model_dir, bad)
    if damage == "config":
        (bad / "config.json").write_text("{ this is not json", encoding="utf-8")
    elif damage == "no-weights":
        (bad / "model.safetensors").unlink()
    elif damage == "truncated-weights":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[:200])
    elif damage == "architecture":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["model_type"] = "not-a-real-arch"
        (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(CompressError) as info:
        export_onnx(bad, out)
    text = str(info.value)
    assert str(bad) in text and message in text
    assert "\n" not in text and "Traceback" not in text
    assert not (out / "model.onnx").exists()


def test_ort_batched_left_padded_generation_equals_one_by_one(onnx_dir, tokenizer):
    from evaluation.quality import generate

    model = load_ort(onnx_dir, threads=1)
    lengths = {len(tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True)) for c in CHATS}
    assert len(lengths) == len(CHATS)  # every row of the batch is padded differently
    one_by_one = [_greedy_ids(model, tokenizer, c) for c in CHATS]
    # token level: generate() of the ORT model on a left-padded batch
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for i, expected in enumerate(one_by_one):
        got = out[i, width:].tolist()[:len(expected)]
        assert got == expected, f"row {i}"
    # text level: the evaluation's own batched generation runs on the ORT model unchanged
    batched = generate(model, tokenizer, CHATS, max_new_tokens=8, batch_size=4, share_prefix=False)
    assert batched == [tokenizer.decode(ids_, skip_special_tokens=True).strip() for ids_ in one_by_one]


def test_cpu_preset_matches_this_cpu():
    preset = cpu_preset()
    assert preset in ("avx512_vnni", "avx2", "arm64")
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "avx512_vnni" not in flags and " avx2" in flags:
        assert preset == "avx2"


def test_int8_dynamic_is_smaller_loads_and_generates(onnx_dir, int8_dir, tokenizer, fp32_logits):
    assert _model_bytes(int8_dir) < 0.4 * _model_bytes(onnx_dir)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _op_types(int8_dir)
    assert _float_weight_ops(int8_dir) == []
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (int8_dir / name).is_file(), name
    model = load_ort(int8_dir, threads=1)
    assert len(_greedy_ids(model, tokenizer, CHATS[0], n=4)) == 4
    logits = _logits(model, tokenizer, CHATS[1])
    assert np.corrcoef(logits.ravel(), fp32_logits.ravel())[0, 1] > 0.95


def test_int8_static_calibrates_and_loads(onnx_dir, tokenizer, tmp_path, fp32_logits):
    calib = [tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True) for c in CHATS[:2]]
    out = int8_static(onnx_dir, tmp_path / "int8s", calib)
    ops = _op_types(out)
    assert "QLinearMatMul" in ops and _float_weight_ops(out) == []  # int8 weights and activations everywhere
    assert _model_bytes(out) < 0.6 * _model_bytes(onnx_dir)
    model = load_ort(out, threads=1)
    assert len(_greedy_ids(model, tokenizer, CHATS[0], n=4)) == 4
    logits = _logits(model, tokenizer, CHATS[1])
    assert np.corrcoef(logits.ravel(), fp32_logits.ravel())[0, 1] > 0.9
    with pytest.raises(CompressError, match="calibration"):
        int8_static(onnx_dir, tmp_path / "int8s-empty", [])


def test_int4_quantizes_embedding_and_head(onnx_dir, int8_dir, int4_dir, tmp_path, tokenizer, fp32_logits):
    no_emb = int4(onnx_dir, tmp_path / "int4-noemb", block_size=32, embeddings=False)
    fp32, i8, i4, i4_noemb = (_model_bytes(p) for p in (onnx_dir, int8_dir, int4_dir, no_emb))
    assert i4 < i8
    assert i4 < 0.5 * i4_noemb  # the embedding (most of this model) is 4-bit only with embeddings=True
    assert fp32 / i4 >= 5.5  # the tied head shares the embedding's 4-bit weights: ~6x smaller than fp32
    ops = _op_types(int4_dir)
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert _float_weight_ops(int4_dir) == []
    assert "/lm_head/MatMul" in _float_weight_ops(no_emb) and "/model/embed_tokens/Gather" in _float_weight_ops(no_emb)
    model = load_ort(int4_dir, threads=1)
    assert len(_greedy_ids(model, tokenizer, CHATS[0], n=4)) == 4
    logits = _logits(model, tokenizer, CHATS[1])
    assert np.corrcoef(logits.ravel(), fp32_logits.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 48}, "not a power of two"),
    ({"block_size": 8}, "not a power of two"),
])
def test_int4_rejects_bad_block_size(onnx_dir, tmp_path, kwargs, message):
    with pytest.raises(CompressError, match=message):
        int4(onnx_dir, tmp_path / "x", **kwargs)


def test_quantizers_reject_a_folder_without_onnx(tmp_path, tiny_model_dir):
    with pytest.raises(ArtifactError, match="no .onnx file") as info:
        int8_dynamic(tiny_model_dir, tmp_path / "a")
    assert str(tiny_model_dir) in str(info.value)
    with pytest.raises(ArtifactError, match="does not exist"):
        int4(tmp_path / "nowhere", tmp_path / "b")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_ort(tmp_path / "nowhere")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "bnb_int8", "bnb_nf4"])
def test_gpu_quantize_is_unavailable_without_cuda(tiny_model_dir, tmp_path, method):
    with pytest.raises(Unavailable, match="CUDA GPU") as info:
        gpu_quantize(tiny_model_dir, tmp_path / method, method, calib_texts=["hello world"])
    assert info.value.reason
    assert not (tmp_path / method).exists()
