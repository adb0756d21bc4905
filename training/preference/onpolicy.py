"""`llmstack pairs`: on-policy preference pairs from a model's own mistakes.

The shipped pairs (data/preference) reject random near misses; a fine-tuned model that already ranks those below the
correct answer learns little from them (docs/preference.md). Here the model answers the prompts of an instruction
dataset greedily, each answer is scored against the dataset's reference like the preference evaluation does
(`rejected_kind`: invalid JSON, text around the JSON, a missing or wrong scored field), and every wrong
answer becomes a pair: chosen = the reference, rejected = what the model said. Rows the model gets right are
skipped (`--mode answers`, the default).

`--mode hard` makes one pair for EVERY prompt, right or wrong: rejected = the reference with one scored field set to
the wrong value the model itself ranks highest (summed log-probability of the whole answer, over every other value
that field takes in the dataset). Pairs from wrong answers alone all reject the labels the model over-uses, and DPO
then shifts the label prior away from them even where they are right (docs/preference.md measured it); hard
negatives contrast each prompt's right value with its closest wrong one. They still reject some labels more often
than they choose them, and DPO shifted the prior towards the rarely rejected ones (measured). `--mode mirrored`
pairs each of the model's mistakes (reference v outranked by u) with a mirror (another prompt whose reference is u,
rejected: v), so every label is chosen exactly as often as it is rejected.

The output is the preference-row format the dpo / orpo / kto recipes read.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from core import artifacts
from core.errors import DataError, collect

MODES = ("answers", "hard", "mirrored")
MAX_VALUES = 32   # a field with more distinct values than this is free text, not a label: no hard negatives for it


def field_values(references: list[str], fields: list[str], where: str) -> dict[str, list[str]]:
    """The distinct string values each scored field takes in the references (the candidates for hard negatives)."""
    from evaluation.metrics import parse_json

    values: dict[str, list[str]] = {f: [] for f in fields}
    for ref in references:
        obj = parse_json(ref) or {}
        for f in fields:
            if isinstance(obj.get(f), str) and obj[f] not in values[f]:
                values[f].append(obj[f])
    labels = {f: v for f, v in values.items() if 2 <= len(v) <= MAX_VALUES}
    if not labels:
        raise DataError(f"no scored field has between 2 and {MAX_VALUES} distinct string values in the references "
                        f"({', '.join(f'{f}: {len(v)}' for f, v in values.items())}): nothing to build hard negatives "
                        "from", file=where, field="--fields")
    return labels


def swap_field(reference: str, name: str, value: str) -> str:
    """The reference answer with field `name` set to `value`, formatted as the reference is (only the value's
    characters change)."""
    pattern = re.compile(r'("' + re.escape(name) + r'"\s*:\s*)"(?:[^"\\]|\\.)*"')
    if len(pattern.findall(reference)) == 1:
        return pattern.sub(lambda m: m.group(1) + json.dumps(value, ensure_ascii=False), reference)
    from evaluation.metrics import parse_json
    return json.dumps(dict(parse_json(reference), **{name: value}), ensure_ascii=False)


def answer_logps(lm, prompt_ids: list[int], answers: list[list[int]]) -> list[float]:
    """Summed log-probability of each answer after one shared prompt: the prompt is run once and its key/value
    cache repeated for the answers (right-padded; causal attention keeps the padding out of the real tokens)."""
    import copy

    import torch  # here, not at import: the CLI imports this module to build its parser

    lm.eval()
    with torch.no_grad():
        out = lm(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        cache = copy.deepcopy(out.past_key_values)
        cache.batch_repeat_interleave(len(answers))
        width = max(len(a) for a in answers)
        ids = torch.tensor([a + [a[-1]] * (width - len(a)) for a in answers])
        mask = torch.ones(len(answers), len(prompt_ids) + width, dtype=torch.long)
        logits = lm(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=False).logits
        logits = torch.cat([out.logits[:, -1:].expand(len(answers), 1, -1), logits[:, :-1]], 1).float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
        keep = torch.tensor([[j < len(a) for j in range(width)] for a in answers])
        return (logp * keep).sum(1).tolist()


def score_variants(lm, tokenizer, examples, values: dict[str, list[str]]) -> list[dict]:
    """For each example with a label field: the model's summed log-probability of its reference answer and of every
    variant with one label field set to another value: {ex, ref, obj, ref_logp, variants: [(field, value, text,
    logp)]}."""
    from tqdm.auto import tqdm

    from evaluation.metrics import parse_json
    from training.preference.data import PrefRow, _encode

    scored = []
    for ex in tqdm(examples, desc="scoring label variants", unit="prompt"):
        ref, obj = ex.reference(), parse_json(ex.reference()) or {}
        variants = [(f, v, swap_field(ref, f, v)) for f, vals in values.items() if f in obj
                    for v in vals if v != obj[f]]
        if not variants:
            continue
        rows = []
        for _f, _v, text in variants:
            row = PrefRow(source="", prompt=ex.prompt_messages(), chosen=ref, rejected=text)
            _encode(tokenizer, row)
            rows.append(row)
        # _encode moves tokens the answers share at the start of the assistant turn into prompt_ids only when both
        # sides agree; rows of one prompt can still differ there, so score from the shortest common prompt
        k = min(len(r.prompt_ids) for r in rows)
        logps = answer_logps(lm, rows[0].prompt_ids[:k], [rows[0].prompt_ids[k:] + rows[0].chosen_ids]
                             + [r.prompt_ids[k:] + r.rejected_ids for r in rows])
        scored.append({"ex": ex, "ref": ref, "obj": obj, "ref_logp": logps[0],
                       "variants": [(f, v, t, lp) for (f, v, t), lp in zip(variants, logps[1:])]})
    return scored


def _pair(item: dict, variant: tuple, role: str) -> dict:
    f, v, text, logp = variant
    return {"messages": item["ex"].prompt_messages(), "chosen": item["ref"], "rejected": text,
            "rejected_kind": "wrong_value", "rejected_field": f, "rejected_value": v,
            "logp_margin": round(item["ref_logp"] - logp, 4), "role": role}


def hard_pairs(scored: list[dict]) -> list[dict]:
    """One pair per example: rejected = the variant the model scores highest."""
    return [_pair(it, max(it["variants"], key=lambda x: x[3]), "hard") for it in scored]


def mirrored_pairs(scored: list[dict]) -> tuple[list[dict], int]:
    """The model's mistakes (a variant, field f = u, outscores the reference, f = v), each followed by its mirror:
    another prompt whose reference has f = u, rejected = it with f = v (of the unused ones, the one the model finds
    hardest). Every label is then chosen exactly as often as it is rejected, so DPO cannot lower the loss by shifting
    a label's prior — only by telling the prompts apart. Returns (pairs, mistakes left unmatched: no prompt with
    that label was left)."""
    tops = [max(it["variants"], key=lambda x: x[3]) for it in scored]
    mistakes = {i for i, it in enumerate(scored) if tops[i][3] > it["ref_logp"]}
    pairs, used, unmatched = [], set(), 0
    for i in sorted(mistakes):
        it, top = scored[i], tops[i]
        f, u = top[0], top[1]
        v = it["obj"][f]
        # a mistake prompt whose own mistake is exactly this mirror (u over v) is one already: as a mirror it would
        # be a duplicate row (dropped by the data pipeline, which unbalances the set)
        mirrors = [(j, var) for j, other in enumerate(scored) if j != i and j not in used
                   and other["obj"].get(f) == u for var in other["variants"] if var[0] == f and var[1] == v
                   and not (j in mistakes and tops[j][:2] == (f, v))]
        if not mirrors:
            unmatched += 1
            continue
        j, var = max(mirrors, key=lambda m: m[1][3] - scored[m[0]]["ref_logp"])
        used.add(j)
        pairs += [_pair(it, top, "mistake"), _pair(scored[j], var, "mirror")]
    return pairs, unmatched


def build(model: str, data: str, out: str, fields: list[str], *, mode: str = "answers", max_rows: int = 0,
          batch_size: int = 32, max_new_tokens: int = 96, models_dir: str = "models") -> dict:
    """Write the pairs to `out` (JSONL, atomically) and return a summary."""
    from chatdata import pipeline as data_mod
    from evaluation import quality as ev
    from modeling.model import load_model, load_tokenizer
    from training.config import ModelCfg, TrainConfig
    from training.outputs import resolve_base
    from training.preference.metrics import rejected_kind

    rows, locs = data_mod.load_file(data)
    if not rows:
        raise DataError("dataset is empty (no rows)", file=data, field="--data")
    fmt = data_mod.detect_format(set().union(*rows), data)
    if fmt == "text":
        raise DataError("raw text rows have no reference answer to compare with", file=data, field="--data",
                        hint="use an instruction or chat dataset")
    errors: list = []
    examples = [data_mod.to_example(r, fmt, loc, errors) for r, loc in zip(rows, locs)]
    collect(errors, "invalid rows")
    examples = examples[:max_rows] if max_rows else examples
    if mode not in MODES:
        raise DataError(f"unknown mode {mode!r} (one of: {', '.join(MODES)})", field="--mode")
    values = field_values([e.reference() for e in examples], fields, data) if mode != "answers" else {}
    model_dir, _ = resolve_base(TrainConfig(model=ModelCfg(name_or_path=model, models_dir=models_dir)))
    tokenizer = load_tokenizer(model_dir)
    lm = load_model(model_dir)
    if mode in ("hard", "mirrored"):
        scored = score_variants(lm, tokenizer, examples, values)
        outranked = sum(max(x[3] for x in it["variants"]) > it["ref_logp"] for it in scored)
        pairs, unmatched = (hard_pairs(scored), 0) if mode == "hard" else mirrored_pairs(scored)
        kinds = Counter(f"{p['rejected_field']}={p['rejected_value']}" for p in pairs)
        summary = {"mode": mode, "prompts": len(examples), "pairs": len(pairs), "reference_outranked": outranked,
                   "unmatched_mistakes": unmatched, "rejected_values": dict(kinds), "values": values}
        print(f"{len(examples)} prompts: the reference outranked by a wrong label on {outranked}; {len(pairs)} "
              + ("hard-negative pairs" if mode == "hard" else f"pairs ({len(pairs) // 2} mistakes + their mirrors, "
                 f"{unmatched} mistakes without a mirror left out)")
              + f" (most common rejected: {', '.join(f'{k} {v}' for k, v in kinds.most_common(6)) or 'none'})")
        return _write(pairs, out, summary, model_dir, data, fields)
    answers = ev.generate(lm, tokenizer, [e.prompt_messages() for e in examples], max_new_tokens, batch_size,
                          desc="on-policy answers")
    pairs, kinds = [], Counter()
    for ex, answer in zip(examples, answers):
        kind = rejected_kind(answer, ex.reference(), fields)
        if kind is None:
            continue
        if not answer.strip():  # wrong, but nothing to reject (preference rows need text on both sides)
            kinds["empty (skipped)"] += 1
            continue
        kinds[kind] += 1
        pairs.append({"messages": ex.prompt_messages(), "chosen": ex.reference(), "rejected": answer,
                      "rejected_kind": kind})
    summary = {"mode": mode, "prompts": len(examples), "pairs": len(pairs),
               "right": len(examples) - sum(kinds.values()), "rejected_kinds": dict(kinds)}
    print(f"{len(examples)} prompts: {summary['right']} answered right, {len(pairs)} pairs "
          f"({', '.join(f'{k} {v}' for k, v in kinds.most_common()) or 'no pairs'})")
    return _write(pairs, out, summary, model_dir, data, fields)


def _write(pairs: list[dict], out: str, summary: dict, model_dir, data, fields) -> dict:
    """Write the pairs atomically (no half-written file) and return the summary."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tmp.replace(target)
    print(f"wrote {len(pairs)} pairs -> {target}")
    return {"model": str(model_dir), "data": str(data), "sha256": artifacts.sha256_file(data), "fields": fields,
            "out": str(target)} | summary
