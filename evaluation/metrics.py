"""The task metrics, defined once: for JSON answers (`eval.json_fields`), the JSON-valid rate, per-field accuracy and
exact match of all scored fields; otherwise generic text metrics, BLEU (sacrebleu) and ROUGE-L (rouge-score)."""
from __future__ import annotations

import json
import re


def parse_json(text: str):
    """The first JSON object in a generation, or None."""
    text = text.strip()
    candidates = [text] + re.findall(r"\{.*?\}", text, flags=re.S)
    for c in candidates:
        try:
            obj = json.loads(c)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def norm_value(v) -> str:
    return str(v).strip().lower() if v is not None else ""


def json_metrics(predictions: list[str], references: list[str], fields: list[str]) -> dict:
    n = len(predictions)
    valid, exact = 0, 0
    correct = {f: 0 for f in fields}
    for pred, ref in zip(predictions, references):
        p, r = parse_json(pred), parse_json(ref) or {}
        valid += p is not None
        p = p or {}
        ok = [(norm_value(p.get(f)) == norm_value(r.get(f))) and f in p for f in fields]
        for f, good in zip(fields, ok):
            correct[f] += good
        exact += all(ok)
    return {"json_valid": round(valid / max(n, 1), 4),
            "field_accuracy": {f: round(c / max(n, 1), 4) for f, c in correct.items()},
            "exact_match": round(exact / max(n, 1), 4)}


def text_metrics(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"bleu": round(bleu, 2), "rougeL": round(sum(rouge) / max(len(rouge), 1), 4)}
