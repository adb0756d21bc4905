"""The provisioned base model's tokenizer: portable config, exact round trips, no BOS, ChatML template, and special
tokens that agree with the model's generation settings."""
from __future__ import annotations

import json

import pytest

from conftest import BASE_MODEL, need_base_model

TEXTS = [
    "Hello, world! My router shows error ERR-19.",
    "  leading and trailing spaces  \n\nnew lines\tand tabs",
    "Café, naïve, façade, Ångström, Straße, ÆØÅ",
    "Emoji: 😀👍🏽 🚀 — and a family 👨‍👩‍👧",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά, кириллица, עברית, العربية",
    '{"category": "billing", "summary": "Charged twice (€29.98)"}',
]


@pytest.fixture(scope="module")
def tok_config() -> dict:
    need_base_model()
    return json.loads((BASE_MODEL / "tokenizer_config.json").read_text())


def test_tokenizer_config_is_portable(tok_config):
    # the fast tokenizer named directly (no LlamaTokenizer rebuild) and no BOS added to every encode
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["add_bos_token"] is False
    assert tok_config.get("add_eos_token", False) is False


def test_loaded_tokenizer_is_fast(tokenizer):
    assert tokenizer.is_fast
    assert type(tokenizer).__name__ == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trips_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS[3]])
def test_no_bos_is_prepended(tokenizer, text):
    with_defaults = tokenizer(text)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert with_defaults == plain
    assert with_defaults[0] != tokenizer.bos_token_id
    assert tokenizer.encode(text) == plain


def test_special_tokens_are_single_ids(tokenizer):
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token


def test_eos_and_pad_are_the_chat_end_token_and_match_the_model(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    model_cfg = json.loads((BASE_MODEL / "config.json").read_text())
    gen_cfg = json.loads((BASE_MODEL / "generation_config.json").read_text())
    # generation stops at the token the chat template ends each turn with
    assert gen_cfg["eos_token_id"] == tokenizer.eos_token_id
    assert model_cfg["eos_token_id"] == tokenizer.eos_token_id
    assert gen_cfg["pad_token_id"] == tokenizer.pad_token_id
    assert model_cfg["vocab_size"] >= len(tokenizer)


def test_chat_template_renders_chatml(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My camera is offline."},
            {"role": "assistant", "content": "Restart it."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    for m in msgs:
        assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" in text
    # turns in order, nothing else in between
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    prompt = tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_adds_a_default_system_turn(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n")


@pytest.mark.parametrize("content", [TEXTS[0], TEXTS[2], TEXTS[4], "Ticket:\n" + TEXTS[3]])
def test_rendered_prompt_round_trips_through_tokens(tokenizer, content):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == prompt.count("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == prompt.count("<|im_end|>")
    # tokenizing through the template gives the same ids as tokenizing the rendered text
    direct = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                           add_generation_prompt=True)
    direct = direct["input_ids"] if isinstance(direct, dict) or hasattr(direct, "keys") else direct
    assert list(direct) == ids


def test_saved_copy_behaves_the_same(tokenizer, tmp_path):
    from modeling.model import load_tokenizer

    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    msgs = [{"role": "user", "content": TEXTS[2]}]
    assert again.apply_chat_template(msgs, tokenize=False) == tokenizer.apply_chat_template(msgs, tokenize=False)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved.get("add_bos_token") is False
