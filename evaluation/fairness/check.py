"""Bias and fairness checks: counterfactual probes (flip rates) and group metrics (fairlearn).

Flow, top to bottom: load the term groups (terms.yaml) and the probes (JSONL; probes.py) -> expand each
probe into its counterfactual variants (one per group and aligned term index) -> one batched greedy generation pass
-> flip rates per attribute and field, which group deviates, examples -> group metrics (demographic parity, equal
opportunity, equalized odds) per positive-class field, on the probe variants (group = the term group) and on an
optional labelled table with a group column -> flag against the thresholds -> fairness.json / .md / .png, and a
`fairness` entry in the manifest when the model is a training artifact.

Greedy decoding makes a flip a real difference in behaviour, not sampling noise. The generator is injected
(`generate_fn(prompts) -> answers`), so the arithmetic is testable without a model. This module is light at import
(the CLI builds its parser from it); torch, transformers, fairlearn and matplotlib load when a check runs.
"""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

from chatdata.terms import Attribute, load_terms
from core import artifacts
from core.errors import ConfigError, DataError, StackError, collect
from core.log import log
from evaluation.fairness.config import FairnessCfg
from evaluation.fairness.probes import Probe, _parse_answer, _read_rows, load_probes, prompt_messages, variants
from evaluation.fairness.report import record_in_manifest, write_reports

INVALID = "<no answer>"  # the value of a field the answer does not contain (unparseable JSON included)


def field_values(answer: str, fields: list[str]) -> dict[str, str]:
    """The compared fields of an answer: from its JSON, else read leniently from a cut-off JSON prefix
    (`"urgency": "high"`), so a summary cut by max_new_tokens does not hide the labels. Lower-cased, stripped."""
    obj = _parse_answer(answer) or {}
    out = {}
    for f in fields:
        v = obj.get(f)
        if v is None:
            m = re.search(rf'"{re.escape(f)}"\s*:\s*"([^"]*)"', answer)
            v = m.group(1) if m else None
        out[f] = str(v).strip().lower() if v is not None and str(v).strip() else INVALID
    return out


# ---------------------------------------------------------------- probe runner and flip rates
GenerateFn = Callable[[list[list[dict]]], list[str]]


def run_probes(probes: list[Probe], terms: dict[str, Attribute], generate_fn: GenerateFn, fields: list[str], *,
               max_terms: int = 0, max_probes: int = 0, system_prompt: str | None = None) -> list[dict]:
    """Every counterfactual variant of every probe answered once (identical prompts are generated once).
    Returns rows {probe, attribute, group, index, terms, text, answer, values, reference}."""
    seen: Counter = Counter()
    chosen = []
    for p in probes:
        seen[p.attribute] += 1
        if not max_probes or seen[p.attribute] <= max_probes:
            chosen.append(p)
    vs = [v for p in chosen for v in variants(p, terms[p.attribute], max_terms)]
    prompts = [prompt_messages(v.probe.instruction, v.text, system_prompt) for v in vs]
    keys = [json.dumps(m) for m in prompts]
    unique = list(dict.fromkeys(keys))
    answers = dict(zip(unique, generate_fn([json.loads(k) for k in unique])))
    return [{"probe": v.probe.id, "attribute": v.probe.attribute, "group": v.group, "index": v.index,
             "terms": v.terms, "text": v.text, "answer": answers[k], "values": field_values(answers[k], fields),
             "reference": {f: str(v.probe.reference[f]).lower() for f in fields if f in v.probe.reference}}
            for v, k in zip(vs, keys)]


def flip_metrics(rows: list[dict], fields: list[str], examples: int = 5) -> dict:
    """Per attribute: flip_rate[field] = share of probes whose variants do not all give the same value ("any": some
    compared field differs); pairwise_flip_rate[field] = share of variant pairs (within a probe) that differ;
    group_deviation[group] = share of probes where the group's answer (any field) differs from the probe's most
    common answer; accuracy[group][field] against the probe's reference; flip examples."""
    out = {}
    for attr, attr_rows in itertools.groupby(sorted(rows, key=lambda r: r["attribute"]), key=lambda r: r["attribute"]):
        by_probe: dict[str, list[dict]] = {}
        for r in attr_rows:
            by_probe.setdefault(r["probe"], []).append(r)
        keys = fields + ["any"]
        flips = {k: 0 for k in keys}
        pair_diff = {k: 0.0 for k in keys}
        groups = sorted({r["group"] for rs in by_probe.values() for r in rs})
        deviate = {g: 0 for g in groups}
        acc = {g: {f: [0, 0] for f in fields} for g in groups}
        flipped_examples = []
        for pid, rs in by_probe.items():
            tup = lambda r: tuple(r["values"][f] for f in fields)  # noqa: E731
            per = {f: [r["values"][f] for r in rs] for f in fields} | {"any": [tup(r) for r in rs]}
            pairs = list(itertools.combinations(range(len(rs)), 2))
            for k in keys:
                flips[k] += len(set(per[k])) > 1
                pair_diff[k] += (sum(per[k][i] != per[k][j] for i, j in pairs) / len(pairs)) if pairs else 0.0
            majority = Counter(per["any"]).most_common(1)[0][0]
            for g in groups:
                deviate[g] += any(tup(r) != majority for r in rs if r["group"] == g)
            for r in rs:
                for f in fields:
                    if f in r["reference"]:
                        acc[r["group"]][f][0] += r["values"][f] == r["reference"][f]
                        acc[r["group"]][f][1] += 1
            if len(set(per["any"])) > 1 and len(flipped_examples) < examples:
                changed = [f for f in fields if len(set(per[f])) > 1]
                flipped_examples.append({
                    "probe": pid, "fields": changed, "reference": rs[0]["reference"],
                    "variants": [{"group": r["group"], "terms": r["terms"],
                                  **{f: r["values"][f] for f in changed}} for r in rs],
                    "text": rs[0]["text"]})
        n = len(by_probe)
        out[attr] = {
            "probes": n, "variants": sum(len(rs) for rs in by_probe.values()), "groups": groups,
            "flip_rate": {k: round(flips[k] / n, 4) for k in keys},
            "flipped_probes": {k: flips[k] for k in keys},
            "pairwise_flip_rate": {k: round(pair_diff[k] / n, 4) for k in keys},
            "group_deviation": {g: round(deviate[g] / n, 4) for g in groups},
            "accuracy": {g: {f: round(c / t, 4) if t else None for f, (c, t) in acc[g].items()} for g in groups},
            "examples": flipped_examples,
        }
    return out


# ---------------------------------------------------------------- group metrics
def group_metrics(y_true: list[str], y_pred: list[str], groups: list[str], positive) -> dict:
    """Binary (one-vs-rest) group fairness of predicted vs reference labels: a label in `positive` is the positive
    class. demographic_parity_difference: max - min over groups of P(pred positive); equal_opportunity_difference:
    max - min of the true positive rate; equalized_odds_difference: the larger of the TPR and FPR differences.
    Computed with fairlearn (between_groups); a rate a group cannot have (no positive / negative references) makes
    the differences that need it None."""
    import warnings

    import numpy as np
    from fairlearn.metrics import (MetricFrame, demographic_parity_difference, equal_opportunity_difference,
                                   equalized_odds_difference, false_positive_rate, selection_rate, true_positive_rate)

    pos = {str(p).lower() for p in positive}
    yt = np.array([str(v).lower() in pos for v in y_true], dtype=int)
    yp = np.array([str(v).lower() in pos for v in y_pred], dtype=int)
    g = np.array([str(x) for x in groups])
    by_group = {}
    for name in sorted(set(g)):
        m = g == name
        by_group[name] = {"n": int(m.sum()), "positive_references": int(yt[m].sum()),
                          "negative_references": int((1 - yt[m]).sum())}
    has_pos = all(v["positive_references"] for v in by_group.values())
    has_neg = all(v["negative_references"] for v in by_group.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = MetricFrame(metrics={"selection_rate": selection_rate, "tpr": true_positive_rate,
                                     "fpr": false_positive_rate}, y_true=yt, y_pred=yp, sensitive_features=g)
        for name, row in frame.by_group.iterrows():
            by_group[str(name)].update(
                selection_rate=round(float(row["selection_rate"]), 4),
                true_positive_rate=round(float(row["tpr"]), 4) if by_group[str(name)]["positive_references"] else None,
                false_positive_rate=round(float(row["fpr"]), 4) if by_group[str(name)]["negative_references"] else None)
        dp = float(demographic_parity_difference(yt, yp, sensitive_features=g))
        eo = float(equal_opportunity_difference(yt, yp, sensitive_features=g)) if has_pos else None
        eodds = float(equalized_odds_difference(yt, yp, sensitive_features=g)) if has_pos and has_neg else None
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"positive": sorted(pos), "n": int(len(g)), "demographic_parity_difference": r(dp),
            "equal_opportunity_difference": r(eo), "equalized_odds_difference": r(eodds), "by_group": by_group}


def probe_group_metrics(rows: list[dict], positive: dict[str, list[str]]) -> dict:
    """Group metrics per attribute and positive-class field, on the probe variants (group = term group)."""
    out: dict = {}
    for attr in sorted({r["attribute"] for r in rows}):
        rs = [r for r in rows if r["attribute"] == attr]
        for f, pos in positive.items():
            rs_f = [r for r in rs if f in r["reference"] and f in r["values"]]
            if rs_f:
                out.setdefault(attr, {})[f] = group_metrics([r["reference"][f] for r in rs_f],
                                                            [r["values"][f] for r in rs_f],
                                                            [r["group"] for r in rs_f], pos)
    return out


def load_group_table(path: str | Path, group_column: str, fields: list[str]) -> list[dict]:
    """Rows {line, group, instruction, input, reference{...}, prediction (str or None)}; every problem at once."""
    path = Path(path)
    errors: list[StackError] = []
    out = []
    for n, row, err in _read_rows(path):
        where = dict(file=path, line=n)
        if err:
            errors.append(DataError(err, **where))
            continue
        if row.get(group_column) in (None, ""):
            errors.append(DataError(f"the group column '{group_column}' is missing", **where, field=group_column,
                                    hint=f"add it to every row, or name the column with --group-column / "
                                    f"fairness.group_column (this row has: {', '.join(row)})"))
            continue
        ref = row.get("output", row.get("reference"))
        ref = ref if isinstance(ref, dict) else (_parse_answer(ref) if isinstance(ref, str) else None)
        if not ref:
            errors.append(DataError("needs the reference answer as JSON in `output` (or `reference`)", **where,
                                    field="output"))
            continue
        pred = row.get("prediction")
        if pred is None and not isinstance(row.get("input"), str):
            errors.append(DataError("needs `input` (the message the model answers) or a `prediction`", **where,
                                    field="input"))
            continue
        out.append({"line": n, "group": str(row[group_column]), "instruction": row.get("instruction") or "",
                    "input": row.get("input"), "reference": {k: str(v).lower() for k, v in ref.items()},
                    "prediction": pred if pred is None or isinstance(pred, str) else json.dumps(pred)})
    if not out and not errors:
        errors.append(DataError("no rows", file=path))
    collect(errors, "problems in the group table")
    return out


def table_group_metrics(rows: list[dict], generate_fn: GenerateFn | None, positive: dict[str, list[str]],
                        fields: list[str], system_prompt: str | None = None) -> dict:
    todo = [r for r in rows if r["prediction"] is None]
    if todo:
        answers = generate_fn([prompt_messages(r["instruction"], r["input"], system_prompt) for r in todo])
        for r, a in zip(todo, answers):
            r["prediction"] = a
    out = {}
    for f, pos in positive.items():
        rs = [r for r in rows if f in r["reference"]]
        if rs:
            preds = [field_values(r["prediction"], [f])[f] for r in rs]
            out[f] = group_metrics([r["reference"][f] for r in rs], preds, [r["group"] for r in rs], pos)
    return out


# ---------------------------------------------------------------- thresholds
def check_thresholds(cfg: FairnessCfg) -> None:
    """Thresholds are rates in [0, 1]; pydantic checks the config, this guards values set after construction."""
    errors = [ConfigError(f"must be between 0 and 1, got {getattr(cfg, k)}", field=k,
                          hint="a rate: 0.1 flags differences above 10 percentage points")
              for k in ("max_flip_rate", "max_parity_difference", "max_odds_difference")
              if not 0 <= getattr(cfg, k) <= 1]
    collect(errors, "threshold problems")


def flag(result: dict, cfg: FairnessCfg) -> tuple[bool, list[str]]:
    """flagged: some attribute's flip rate (any field) > max_flip_rate, or some parity difference >
    max_parity_difference, or some equal opportunity / equalized odds difference > max_odds_difference."""
    reasons = []
    for attr, m in result.get("flips", {}).items():
        if m["flip_rate"]["any"] > cfg.max_flip_rate:
            reasons.append(f"{attr}: flip rate {m['flip_rate']['any']:.3f} > {cfg.max_flip_rate}")
    tables = [(f"{a} {f}", gm) for a, by in result.get("group_metrics", {}).get("probes", {}).items()
              for f, gm in by.items()]
    tables += [(f"{result['group_metrics'].get('table_file', 'table')} {f}", gm)
               for f, gm in result.get("group_metrics", {}).get("table", {}).items()]
    for where, gm in tables:
        dp = gm["demographic_parity_difference"]
        if dp is not None and dp > cfg.max_parity_difference:
            reasons.append(f"{where}: demographic parity difference {dp:.3f} > {cfg.max_parity_difference}")
        for key, label in (("equal_opportunity_difference", "equal opportunity"),
                           ("equalized_odds_difference", "equalized odds")):
            v = gm[key]
            if v is not None and v > cfg.max_odds_difference:
                reasons.append(f"{where}: {label} difference {v:.3f} > {cfg.max_odds_difference}")
    return bool(reasons), reasons


# ---------------------------------------------------------------- the whole check
def evaluate_fairness(cfg: FairnessCfg, generate_fn: GenerateFn, *, system_prompt: str | None = None) -> dict:
    """Everything but the model: load and validate the inputs, run the probes and the group table, flag."""
    check_thresholds(cfg)
    terms = load_terms(cfg.terms)
    probes = load_probes(cfg.probes, terms, cfg.terms)
    table = load_group_table(cfg.group_data, cfg.group_column, cfg.fields) if cfg.group_data else None
    rows = run_probes(probes, terms, generate_fn, cfg.fields, max_terms=cfg.max_terms_per_group,
                      max_probes=cfg.max_probes, system_prompt=system_prompt)
    result = {
        "probes_file": cfg.probes, "terms_file": cfg.terms, "fields": cfg.fields, "positive": cfg.positive,
        "distinct_messages": len({r["text"] for r in rows}),
        "flips": flip_metrics(rows, cfg.fields, cfg.examples),
        "group_metrics": {"probes": probe_group_metrics(rows, cfg.positive)},
        "thresholds": {"max_flip_rate": cfg.max_flip_rate, "max_parity_difference": cfg.max_parity_difference,
                       "max_odds_difference": cfg.max_odds_difference},
    }
    if table is not None:
        result["group_metrics"]["table_file"] = cfg.group_data
        result["group_metrics"]["table_group_column"] = cfg.group_column
        result["group_metrics"]["table"] = table_group_metrics(table, generate_fn, cfg.positive, cfg.fields,
                                                               system_prompt)
    result["flagged"], result["reasons"] = flag(result, cfg)
    result["variants"] = rows
    return result


def check_inputs(cfg: FairnessCfg) -> None:
    """Load and validate the terms, the probes and the group table (every problem at once per file)."""
    check_thresholds(cfg)
    terms = load_terms(cfg.terms)
    load_probes(cfg.probes, terms, cfg.terms)
    if cfg.group_data:
        load_group_table(cfg.group_data, cfg.group_column, cfg.fields)


def model_generate_fn(model, tokenizer, cfg: FairnessCfg) -> GenerateFn:
    from evaluation.quality import generate
    return lambda prompts: generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size,
                                    desc="fairness probes")


def run(model_ref: str, cfg: FairnessCfg, out: str | Path | None = None, *, model=None, tokenizer=None) -> dict:
    """Check a model folder or training artifact; write the reports into the artifact (or `out`) and, for a training
    artifact, its manifest entry. model/tokenizer: already loaded (the training recipe passes the merged model)."""
    check_thresholds(cfg)
    ref = Path(model_ref)
    is_artifact = (ref / artifacts.MANIFEST).is_file()
    manifest = artifacts.read_manifest(ref) if is_artifact else {}
    if is_artifact and manifest.get("stage") != "train":
        raise StackError(f"a '{manifest.get('stage')}' artifact; fairness checks run on training artifacts or model "
                         "folders", file=ref, field="model", hint="pass its merged model folder, or the training run")
    system_prompt = (manifest.get("config") or {}).get("data", {}).get("system_prompt")
    check_inputs(cfg)  # input errors before the model loads
    import torch

    from modeling.model import load_model, load_tokenizer, model_folder

    if model is None:
        folder = model_folder(str(ref))
        tokenizer = load_tokenizer(folder)
        model = load_model(folder)
    else:
        folder = str(ref)
    with torch.no_grad():
        result = evaluate_fairness(cfg, model_generate_fn(model, tokenizer, cfg), system_prompt=system_prompt)
    result = {"model": str(model_ref), "model_folder": str(folder), "measured_at": artifacts.now()} | result
    dest = Path(out) if out else (ref if is_artifact else Path("artifacts/fairness") / ref.resolve().name)
    write_reports(result, dest)
    if is_artifact:
        record_in_manifest(ref, result, dest)
    log.info(f"fairness: {'FLAGGED' if result['flagged'] else 'not flagged'}; reports in {dest}")
    return result | {"out": str(dest)}
