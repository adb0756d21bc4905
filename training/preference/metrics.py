"""Held-out metrics of a preference run, before and after training (training/preference/recipe.py calls `evaluate`).

What is measured on the held-out pairs (before and after, see `pair_metrics` and `answer_metrics`):
- preference accuracy: share of pairs where the model gives the chosen answer a higher log-probability (summed over
  its tokens) than the rejected one, and the mean log-probability margin;
- after training, the implicit reward margin beta * ((logp - logp_ref)(chosen) - (logp - logp_ref)(rejected)) and its
  accuracy (share > 0), the reference being the model before training;
- rejected-like rate: share of greedy answers to the held-out prompts that look like a rejected answer: not a bare
  JSON object (invalid JSON, or prose around it), a scored field missing, or a scored field's value wrong;
- format errors: the rejected-like answers that are not a bare JSON object with every scored field, whatever their
  labels (learning the answer's shape shows apart from learning its labels);
- per-prompt change: answers fixed / broken (and format errors fixed / introduced) with an exact sign test.
"""
from __future__ import annotations

import json

import torch

from evaluation import metrics as task_metrics
from evaluation import quality as ev
from modeling.collate import decoder_and_head
from training.config import TrainConfig
from training.preference.data import PrefRow

REJECTED_KINDS = ("invalid_json", "extra_text", "missing_field", "wrong_value")
FORMAT_KINDS = REJECTED_KINDS[:3]  # the answer is not a bare JSON object with every scored field: a format error


# ---------------------------------------------------------------- metrics
@torch.no_grad()
def sequence_logps(model, pad_id: int, rows: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each (prompt_ids, answer_ids) answer given its prompt."""
    model.eval()
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for j, (p, a) in enumerate(chunk):
            ids[j, :len(p) + len(a)] = torch.tensor(p + a)
            mask[j, :len(p) + len(a)] = 1
            target[j, len(p):len(p) + len(a)] = True
        # the LM head only where the next token is an answer token (the full vocabulary for every position of a
        # batch would be most of the work and memory)
        decoder, head = decoder_and_head(model)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        keep = target[:, 1:]
        logp = torch.log_softmax(head(hidden[keep]).float(), -1).gather(-1, ids[:, 1:][keep][:, None])[:, 0]
        row = torch.arange(len(chunk))[:, None].expand_as(keep)[keep]
        out += torch.zeros(len(chunk)).index_add_(0, row, logp).tolist()
    return out


def pair_metrics(chosen: list[float], rejected: list[float], ref: dict | None = None, beta: float = 0.1) -> dict:
    """Preference accuracy and log-probability margin; with `ref` (the same metrics' logps before training), the
    implicit reward margin and accuracy as DPO defines them."""
    n = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected)]
    out = {"pairs": n, "pref_accuracy": round(sum(m > 0 for m in margins) / max(n, 1), 4),
           "logp_margin": round(sum(margins) / max(n, 1), 4),
           "logp_chosen": round(sum(chosen) / max(n, 1), 4)}
    if ref is not None:
        rewards = [beta * ((c - rc) - (r - rr)) for c, r, rc, rr in
                   zip(chosen, rejected, ref["chosen_logps"], ref["rejected_logps"])]
        out["reward_margin"] = round(sum(rewards) / max(n, 1), 4)
        out["reward_accuracy"] = round(sum(x > 0 for x in rewards) / max(n, 1), 4)
    return out


def rejected_kind(prediction: str, reference: str, fields: list[str]) -> str | None:
    """Why a greedy answer looks like a rejected one (None: it matches the chosen answer on every scored field):
    invalid_json (no JSON object in it), extra_text (a JSON object with prose around it), missing_field (a scored
    field absent), wrong_value (a scored field's value differs from the reference)."""
    text = prediction.strip()
    obj = task_metrics.parse_json(text)
    if obj is None:
        return "invalid_json"
    try:
        bare = isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, ValueError):
        bare = False
    if not bare:
        return "extra_text"
    ref = task_metrics.parse_json(reference) or {}
    fields = fields or sorted(ref)
    if any(f not in obj for f in fields):
        return "missing_field"
    if any(task_metrics.norm_value(obj.get(f)) != task_metrics.norm_value(ref.get(f)) for f in fields):
        return "wrong_value"
    return None


def answer_metrics(predictions: list[str], references: list[str], fields: list[str]) -> dict:
    kinds = [rejected_kind(p, r, fields) for p, r in zip(predictions, references)]
    n = max(len(kinds), 1)
    return {"rejected_like": round(sum(k is not None for k in kinds) / n, 4),
            "rejected_like_kinds": {k: round(kinds.count(k) / n, 4) for k in REJECTED_KINDS},
            "format_errors": round(sum(k in FORMAT_KINDS for k in kinds) / n, 4)}


def evaluate(model, tokenizer, rows: list[PrefRow], cfg: TrainConfig, *, ref: dict | None = None,
             label: str = "", generate: bool = True) -> tuple[dict, list[dict], dict]:
    """Pair metrics (log-probabilities) and, with preference.generate, the rejected-like rate of greedy answers on
    the first eval.max_samples held-out rows. Returns (metrics, predictions, logps for the reference)."""
    rows = rows[:cfg.eval.max_samples] if cfg.eval.max_samples else rows
    pairs = [r for r in rows if r.paired]
    pad = tokenizer.pad_token_id
    bs = cfg.eval.batch_size
    logps = {"chosen_logps": sequence_logps(model, pad, [(r.prompt_ids, r.chosen_ids) for r in pairs], bs),
             "rejected_logps": sequence_logps(model, pad, [(r.prompt_ids, r.rejected_ids) for r in pairs], bs)}
    metrics = pair_metrics(logps["chosen_logps"], logps["rejected_logps"], ref, cfg.preference.beta) if pairs else {}
    predictions: list[dict] = []
    if cfg.preference.generate and generate:
        held = [r for r in rows if r.paired or r.label]
        refs = [r.answer() for r in held]
        stats: list[dict] = []
        preds = ev.generate(model, tokenizer, [r.prompt for r in held], cfg.eval.max_new_tokens, bs,
                            desc=f"eval {label}".strip(), stats=stats)
        metrics["n"] = len(held)
        if cfg.eval.json_fields:
            metrics.update(task_metrics.json_metrics(preds, refs, cfg.eval.json_fields))
        metrics.update(answer_metrics(preds, refs, cfg.eval.json_fields))
        predictions = [{"source": r.source, "reference": a, "prediction": p,
                        "rejected_like": rejected_kind(p, a, cfg.eval.json_fields)} | st
                       for r, a, p, st in zip(held, refs, preds, stats)]
    return metrics, predictions, logps


def paired_change(before_preds: list[dict], after_preds: list[dict]) -> dict:
    """Per held-out prompt (the same prompts before and after): answers that went from rejected-like to right
    (fixed) and from right to rejected-like (broken), and the exact two-sided sign test p-value of that split: how
    often a split at least this uneven comes from training that changed nothing on average. On 100 prompts a drop
    of a few points is often p > 0.05. The same for format errors alone (format_*: a format error before and none
    after, whatever the labels), which separates learning the answer's shape from learning its labels."""
    from math import comb

    def split(bad) -> tuple[int, int, float]:
        fixed = sum(bad(b) and not bad(a) for b, a in zip(before_preds, after_preds))
        broken = sum(not bad(b) and bad(a) for b, a in zip(before_preds, after_preds))
        n, k = fixed + broken, min(fixed, broken)
        p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
        return fixed, broken, round(p, 4)

    return dict(zip(("answers_fixed", "answers_broken", "sign_test_p"),
                    split(lambda r: r["rejected_like"] is not None))) | \
        dict(zip(("format_fixed", "format_broken", "format_sign_test_p"),
                 split(lambda r: r["rejected_like"] in FORMAT_KINDS)))


def table(before: dict | None, after: dict | None) -> str:
    """The before/after table: the preference metrics, then the task metrics (evaluate.table)."""
    keys = [("rejected_like", "rejected-like answers (lower is better)"),
            *[(f"kind:{k}", f"  of which {k}") for k in REJECTED_KINDS],
            ("format_errors", "format errors (invalid_json, extra_text, missing_field)"),
            ("pref_accuracy", "preference accuracy (logp chosen > rejected)"),
            ("logp_margin", "mean logp margin (chosen - rejected)"),
            ("reward_accuracy", "implicit reward accuracy"), ("reward_margin", "implicit reward margin"),
            ("answers_fixed", "answers fixed (rejected-like before, right after)"),
            ("answers_broken", "answers broken (right before, rejected-like after)"),
            ("sign_test_p", "sign test p-value (fixed vs broken)"),
            ("format_fixed", "format errors fixed (whatever the labels)"),
            ("format_broken", "format errors introduced"),
            ("format_sign_test_p", "sign test p-value (format fixed vs introduced)")]

    def get(m, k):
        if m is None:
            return None
        return m.get("rejected_like_kinds", {}).get(k[5:]) if k.startswith("kind:") else m.get(k)

    fmt = lambda v: "-" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for k, name in keys:
        b, a = get(before, k), get(after, k)
        if b is None and a is None:
            continue
        change = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"| {name} | {fmt(b)} | {fmt(a)} | {change} |")
    if before is None:  # after only: one value column
        lines = ["| metric | value |", "|---|---|"] + ["| " + ln.split(" | ")[0][2:] + " | " + ln.split(" | ")[2] + " |"
                                                     for ln in lines[2:]]
    return "\n".join(lines + ev.table(before, after).splitlines()[2:])


METRIC_DEFINITIONS = {
    "pref_accuracy": "share of held-out pairs where the model's summed log-probability of the chosen answer is above "
                     "the rejected one's",
    "logp_margin": "mean of logp(chosen) - logp(rejected), summed over answer tokens",
    "reward_margin": "mean implicit reward margin beta * ((logp - logp_before)(chosen) - (logp - logp_before)"
                     "(rejected)), the model before training being the reference",
    "reward_accuracy": "share of held-out pairs with a positive implicit reward margin",
    "answers_fixed": "held-out prompts whose greedy answer was rejected-like before training and right after",
    "answers_broken": "held-out prompts whose greedy answer was right before training and rejected-like after",
    "sign_test_p": "exact two-sided sign test p-value of answers_fixed vs answers_broken (is the change more than "
                   "noise on these prompts?)",
    "format_errors": "share of greedy answers with a format error: invalid_json, extra_text or missing_field "
                     "(rejected_like without wrong_value)",
    "format_fixed": "held-out prompts whose greedy answer had a format error before training and none after",
    "format_broken": "held-out prompts whose greedy answer had no format error before training and one after",
    "format_sign_test_p": "exact two-sided sign test p-value of format_fixed vs format_broken",
    "rejected_like": "share of greedy answers to the held-out prompts that are not a bare JSON object (invalid_json, "
                     "extra_text), miss a scored field (missing_field) or get a scored field wrong (wrong_value)",
}
