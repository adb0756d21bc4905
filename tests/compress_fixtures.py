"""Fixtures and helpers shared by the pruning and distillation tests: tiny decoders of a chosen shape, ticket rows
and calibration ids, logits / greedy / reload helpers."""
from __future__ import annotations

import pytest
import torch

from chatdata import pipeline as data_mod
from compression.prune import calibration_ids, decoder_layers
from conftest import ticket_rows, write_jsonl
from core.config import validate
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
