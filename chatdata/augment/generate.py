"""Language models that write for the augmentation: the paraphrase operation and the label check.

Two backends behind one call (chat prompts in, texts out): a local model (transformers, batched, with a progress bar)
or any OpenAI-compatible endpoint (the openai SDK; this project's own `make serve` is one)."""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from core.errors import ConfigError, DataError

from ..files import Example
from .config import AugmentOp, Generator
from .rows import derive, free_text

Generate = Callable[[list[list[dict]]], list[str]]


def local_model_path(model: str, base_model: str) -> str:
    """`base` -> the model being fine-tuned; a training artifact -> its merged/ model; else the folder or name."""
    if model == "base":
        return base_model
    path = Path(model)
    return str(path / "merged") if (path / "merged" / "config.json").is_file() else model


def generator(cfg: Generator, base_model: str, where: str, greedy: bool = False) -> Generate:
    """The generate function for `cfg`; `where` names the config field in errors."""
    temperature = 0.0 if greedy else cfg.temperature
    if cfg.endpoint:
        return _endpoint(cfg, temperature, where)
    return _local(local_model_path(cfg.model, base_model), cfg, temperature, where)


def _endpoint(cfg: Generator, temperature: float, where: str) -> Generate:
    import openai

    client = openai.OpenAI(base_url=cfg.endpoint, api_key=os.environ.get(cfg.api_key_env) or "none", max_retries=2)

    def one(messages: list[dict]) -> str:
        try:
            out = client.chat.completions.create(model=cfg.model, messages=messages, temperature=temperature,
                                                 max_tokens=cfg.max_new_tokens)
        except openai.OpenAIError as exc:
            raise DataError(f"the endpoint {cfg.endpoint} failed: {type(exc).__name__}: {exc}",
                            field=f"{where}.endpoint", hint="is the server up, and is `model` a model it serves?") \
                from None
        return out.choices[0].message.content or ""

    def generate(prompts: list[list[dict]]) -> list[str]:
        with ThreadPoolExecutor(cfg.batch_size) as pool:
            return list(pool.map(one, prompts))
    return generate


def _local(path: str, cfg: Generator, temperature: float, where: str) -> Generate:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model {path!r}: {exc}", field=f"{where}.model",
                          hint="`base`, a model folder or a training artifact") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def generate(prompts: list[list[dict]]) -> list[str]:
        out = []
        for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="generate", unit="batch", leave=False):
            texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + cfg.batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            sample = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature > 0 else \
                dict(do_sample=False)
            with torch.inference_mode():
                ids = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                     **sample)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in out]
    return generate


def paraphrases(op: AugmentOp, rows: list[Example], shared, generate: Generate,
                answer: Generate | None = None) -> list[Example]:
    """One new row per drawn copy: the model rewrites the free part of the message; the answer is kept (the label
    check, when configured, drops rows whose labels it no longer supports), or with `answer` (op.answer_model)
    regenerated for the new prompt."""
    import torch

    from .rows import copies
    rnd = random.Random(op.seed)
    todo = [(ex, k) for ex in rows for k in range(1, copies(op.rate, rnd) + 1)]
    torch.manual_seed(op.seed)
    prompts = [[{"role": "user", "content": f"{op.instruction}\n\n{free_text(ex, shared)}"}] for ex, _ in todo]
    texts = generate(prompts)
    out = []
    for (ex, k), text in zip(todo, texts):
        parts = iter([text.strip()])
        out.append(derive(ex, shared, lambda p, parts=parts: next(parts, ""), "paraphrase", k))
    if answer is not None and out and out[0].messages is not None:
        for new, text in zip(out, answer([new.prompt_messages() for new in out])):
            last = max(i for i, m in enumerate(new.messages) if m["role"] == "assistant")
            new.messages[last]["content"] = text
    return out
