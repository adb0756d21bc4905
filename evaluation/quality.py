"""Evaluation on held-out rows: answer-token loss / perplexity and a task metric (metrics.py) on greedy generations."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList

from chatdata.pipeline import Example, render
from modeling.collate import Collator, answer_loss, common_prefix, decoder_and_head, prefix_cache

from .metrics import json_metrics, text_metrics


@torch.no_grad()
def loss_and_perplexity(model, rows: list[Example], pad_id: int, max_len: int, fast: bool, batch_size: int = 16,
                        pack: bool = True) -> dict:
    model.eval()
    collate = Collator(pad_id, max_len, pack=pack, share_prefix=fast)
    device = next(model.parameters()).device  # a model trained on a GPU is scored there
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in rows[i:i + batch_size]])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, n = answer_loss(model, batch, fast=fast)
        total, count = total + float(loss), count + n
    mean = total / max(count, 1)
    return {"loss": round(mean, 4), "perplexity": round(math.exp(min(mean, 50)), 3), "answer_tokens": count}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             desc: str = "generating", share_prefix: bool = True, min_prefix: int = 8,
             stats: list | None = None) -> list[str]:
    """Greedy generations for chat prompts, batched with left padding, longest prompts first (less padding).

    share_prefix: the token prefix common to a batch's prompts (system prompt, instruction) is run once and its
    keys/values are handed to `generate` as the cache for every row; the rows' own tokens follow it, left padded.
    Same positions and attention as the unshared batch (needs a standard causal LM, not a prompt-learning adapter).
    Any model with the transformers `generate` API works (ONNX Runtime's ORTModelForCausalLM too, share_prefix=False).
    stats: a list to fill with one dict per prompt: n_tokens (generated, EOS excluded), logprob_sum (the greedy
    tokens' log-probabilities, EOS included) and finish ("stop" at EOS, else "length"), as the service counts them.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    peft_cfg = getattr(model, "active_peft_config", None)
    share_prefix = share_prefix and not getattr(peft_cfg, "is_prompt_learning", False)  # virtual tokens come first
    ids = [tokenizer(render(tokenizer, p, generation_prompt=True), add_special_tokens=False)["input_ids"]
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = tokenizer.pad_token_id
    out: list[str] = [""] * len(ids)
    if stats is not None:
        stats[:] = [None] * len(ids)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[s:s + batch_size]
        rows = [ids[i] for i in idx]
        p = common_prefix(rows, [len(r) - 1 for r in rows], min_prefix) if share_prefix else 0
        width = max(len(r) for r in rows) - p
        input_ids = torch.tensor([r[:p] + [pad] * (width - len(r) + p) + r[p:] for r in rows])
        mask = torch.tensor([[1] * p + [0] * (width - len(r) + p) + [1] * (len(r) - p) for r in rows])
        kwargs = {}
        if p:
            kwargs["past_key_values"] = prefix_cache(decoder_and_head(model)[0], input_ids[:1, :p], len(rows))
        steps: list[torch.Tensor] = []
        if stats is not None:
            kwargs["logits_processor"] = LogitsProcessorList([_GreedyLogprobs(steps)])
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             **kwargs)
        new = gen[:, input_ids.shape[1]:]
        for j, (i, seq) in enumerate(zip(idx, new)):
            out[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
            if stats is not None:
                toks = seq.tolist()
                eos = toks.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in toks else None
                n = eos if eos is not None else len(toks)
                upto = n + (1 if eos is not None else 0)
                stats[i] = {"n_tokens": n, "logprob_sum": round(float(sum(steps[t][j] for t in range(upto))), 5),
                            "finish": "stop" if eos is not None else "length"}
    return out


class _GreedyLogprobs:
    """A logits processor that changes nothing and records each step's greedy token log-probability per row."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, input_ids, scores):
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values.tolist())
        return scores


def evaluate(model, tokenizer, rows: list[Example], cfg, *, max_len: int, fast: bool, pack: bool = True,
             label: str = "") -> tuple[dict, list[dict]]:
    """Loss/perplexity and the task metric (greedy generations) on the first eval.max_samples rows (0: all)."""
    rows = rows[:cfg.max_samples] if cfg.max_samples else rows
    metrics = loss_and_perplexity(model, rows, tokenizer.pad_token_id, max_len, fast, batch_size=cfg.batch_size,
                                  pack=pack)
    chat = [e for e in rows if e.messages is not None]
    predictions: list[dict] = []
    if chat:
        refs = [e.reference() for e in chat]
        stats: list[dict] = []
        preds = generate(model, tokenizer, [e.prompt_messages() for e in chat], cfg.max_new_tokens, cfg.batch_size,
                         desc=f"eval {label}".strip(), share_prefix=fast, stats=stats)
        metrics["n"] = len(chat)
        metrics.update(json_metrics(preds, refs, cfg.json_fields) if cfg.json_fields else text_metrics(preds, refs))
        predictions = [{"source": e.source, "reference": r, "prediction": p} | st
                       for e, r, p, st in zip(chat, refs, preds, stats)]
    return metrics, predictions


def table(before: dict | None, after: dict | None) -> str:
    """The before/after table printed at the end of training and stored in the manifest."""
    keys = [("loss", "answer loss"), ("perplexity", "perplexity"), ("json_valid", "JSON valid"),
            ("exact_match", "exact match (scored fields)"), ("bleu", "BLEU"), ("rougeL", "ROUGE-L")]
    fields = sorted({*((before or {}).get("field_accuracy", {})), *((after or {}).get("field_accuracy", {}))})

    def get(m, k):
        if m is None:
            return None
        return m.get("field_accuracy", {}).get(k[6:]) if k.startswith("field:") else m.get(k)

    rows = [(k, name) for k, name in keys if get(before, k) is not None or get(after, k) is not None]
    rows[3:3] = [(f"field:{f}", f"accuracy: {f}") for f in fields]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    if before is None:
        return "\n".join(["| metric | value |", "|---|---|"] + [f"| {n} | {fmt(get(after, k))} |" for k, n in rows])
    out = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k, name in rows:
        b, a = get(before, k), get(after, k)
        change = f"{a - b:+.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"
        out.append(f"| {name} | {fmt(b)} | {fmt(a)} | {change} |")
    return "\n".join(out)
