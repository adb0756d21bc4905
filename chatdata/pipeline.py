"""Data pipeline: load -> validate -> clean -> deduplicate -> tokenize with the chat template -> length filter ->
split -> mix. Every dropped row is recorded with its file, line and reason in the data report; nothing is silent.

Formats: instruction (alpaca: instruction / input / output), chat (OpenAI-style `messages`), text (raw text).
Files: JSONL (read line by line with the json module: values keep their JSON types), JSON, CSV, Parquet (through
`datasets`); reading and validating them is chatdata/files.py.
"""
from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from core.artifacts import sha256_file
from core.errors import DataError, StackError, collect
from core.log import log

from . import eda, reweigh
from .files import Example, detect_format, load_file, to_example
from .similarity import minhash

REASONS = ("empty", "exact_duplicate", "near_duplicate", "overlong")


# ---------------------------------------------------------------- cleaning and deduplication
def _norm(s: str, form: str) -> str:
    s = unicodedata.normalize(form, s) if form != "none" else s
    return s.strip()


def clean(ex: Example, form: str) -> bool:
    """Normalise in place; False when the row is empty (nothing to learn from)."""
    if ex.text is not None:
        ex.text = _norm(ex.text, form)
        return bool(ex.text)
    for m in ex.messages:
        m["content"] = _norm(m["content"], form)
    has_answer = any(m["role"] == "assistant" and m["content"] for m in ex.messages)
    has_prompt = any(m["role"] != "assistant" and m["content"] for m in ex.messages)
    return has_answer and has_prompt


class Drops:
    """Every dropped row with its reason; the data report lists them all."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, split: str, reason: str, ex: Example, detail: str = "") -> None:
        self.items.append({"split": split, "reason": reason, "location": ex.source, "detail": detail})

    def count(self, split: str, source: str | None = None) -> dict[str, int]:
        out = {r: 0 for r in REASONS}
        for d in self.items:
            if d["split"] == split and (source is None or d["location"].startswith(source + ":")):
                out[d["reason"]] += 1
        return out


def dedup(rows: list[Example], split: str, drops: Drops, exact: bool, near: bool, threshold: float) -> list[Example]:
    kept: list[Example] = []
    seen: dict[str, str] = {}
    lsh = None
    if near:
        from datasketch import MinHashLSH
        lsh = MinHashLSH(threshold=threshold, num_perm=128)
    for i, ex in enumerate(rows):
        key = ex.flat_text()
        if exact and key in seen:
            drops.add(split, "exact_duplicate", ex, f"same as {seen[key]}")
            continue
        if lsh is not None:
            mh = minhash(key)
            hits = lsh.query(mh)
            if hits:
                drops.add(split, "near_duplicate", ex, f"near {rows[int(hits[0])].source}")
                continue
            lsh.insert(str(i), mh)
        seen.setdefault(key, ex.source)
        kept.append(ex)
    return kept


# ---------------------------------------------------------------- tokenisation
def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, ex: Example) -> None:
    """Fill input_ids and labels: the chat template applied, loss on assistant turns only (raw text: every token).

    Assistant spans are found by rendering the conversation prefix before and after each assistant turn and mapping
    character spans to tokens with the fast tokenizer's offsets, so it works for any chat template.
    """
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ex.input_ids, ex.labels = ids, list(ids)
        return
    full = render(tokenizer, ex.messages)
    spans = []
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, ex.messages[:i], generation_prompt=True))
        through = render(tokenizer, ex.messages[:i + 1])
        if not full.startswith(through):  # templates that rewrite history: fall back to the last turn only
            continue
        spans.append((start, len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ex.input_ids = enc["input_ids"]
    ex.labels = [tid if any(a <= s < b for a, b in spans) else -100
                 for tid, (s, _e) in zip(enc["input_ids"], enc["offset_mapping"])]


# ---------------------------------------------------------------- the pipeline
@dataclass
class Prepared:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: dict
    extra: dict[str, list[Example]] = field(default_factory=dict)


def split_field(split: str) -> str:
    """The config field a split's datasets come from: data.train, ..., or a dotted path of its own
    (curriculum.datasets.cpt)."""
    return split if "." in split else f"data.{split}"


def load_spec(spec, split: str, errors: list) -> tuple[Path, list[dict], list] | None:
    """A dataset entry's rows (columns renamed to the format's names) and their locations; None, with the reason
    added to `errors`, when the file cannot be read or has no rows."""
    path = Path(spec.path)
    try:
        raw, locs = load_file(path)
    except StackError as exc:
        errors.append(exc)
        return None
    if not raw:
        errors.append(DataError("dataset is empty (no rows)", file=path, field=split_field(split)))
        return None
    if spec.columns:
        inverse = {v: k for k, v in spec.columns.items()}
        raw = [{inverse.get(k, k): v for k, v in r.items()} for r in raw]
    return path, raw, locs


def _load_split(specs, split: str, cfg, drops: Drops, errors: list, sources: list) -> list[tuple[Example, float]]:
    out = []
    for spec in specs:
        loaded = load_spec(spec, split, errors)
        if loaded is None:
            continue
        path, raw, locs = loaded
        fmt = spec.format if spec.format != "auto" else None
        try:
            fmt = fmt or detect_format(set().union(*raw), path)  # JSONL rows may each lack some keys
        except StackError as exc:
            errors.append(exc)
            continue
        before = len(errors)
        rows = []
        for r, loc in zip(raw, locs):
            ex = to_example(r, fmt, loc, errors)
            if ex is None:
                continue
            if not clean(ex, cfg.unicode_normalization):
                drops.add(split, "empty", ex, "no prompt or no answer after cleaning")
                continue
            if cfg.system_prompt and ex.messages and ex.messages[0]["role"] != "system":
                ex.messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            rows.append(ex)
        sources.append({"split": split, "path": str(path), "sha256": sha256_file(path), "format": fmt,
                        "weight": spec.weight, "rows_in": len(raw), "invalid": len(errors) - before})
        out.extend((ex, spec.weight) for ex in rows)
    return out


def read_rows(spec, cfg) -> list[Example]:
    """One dataset's rows validated and cleaned (no de-duplication, no tokenization); one error naming every invalid
    row."""
    errors: list = []
    rows = [ex for ex, _ in _load_split([spec], "train", cfg, Drops(), errors, [])]
    collect(errors, "invalid rows")
    return rows


def _length_filter(rows, split, cfg, tokenizer, drops, errors):
    kept = []
    for ex in rows:
        encode(tokenizer, ex)
        n = len(ex.input_ids)
        if n > cfg.max_seq_len:
            if cfg.overlong == "error":
                errors.append(DataError(f"example has {n} tokens, more than data.max_seq_len={cfg.max_seq_len}",
                                        file=ex.source, hint="raise data.max_seq_len or set data.overlong=drop"))
                continue
            if cfg.overlong == "drop":
                drops.add(split, "overlong", ex, f"{n} tokens > max_seq_len={cfg.max_seq_len}")
                continue
            ex.input_ids, ex.labels = ex.input_ids[:cfg.max_seq_len], ex.labels[:cfg.max_seq_len]
        if all(lbl == -100 for lbl in ex.labels[1:]):
            drops.add(split, "overlong", ex, "truncation removed every answer token")
            continue
        kept.append(ex)
    return kept


def _mix(rows_weights, seed: int) -> list[Example]:
    """Weights are upsampling factors: the integer part repeats rows, the fraction samples the rest (seeded)."""
    rng = random.Random(seed)
    by_weight: dict[float, list[Example]] = {}
    for ex, w in rows_weights:
        by_weight.setdefault(w, []).append(ex)
    out = []
    for w, rows in by_weight.items():
        whole, frac = int(w), w - int(w)
        out.extend(rows * whole)
        out.extend(rng.sample(rows, round(frac * len(rows))))
    return out


def length_stats(rows: list[Example]) -> dict:
    import numpy as np

    if not rows:
        return {"n": 0}
    lens = np.array([len(e.input_ids) for e in rows])
    answer = np.array([sum(1 for lbl in e.labels if lbl != -100) for e in rows])
    q = lambda a, p: int(np.percentile(a, p))  # noqa: E731
    return {"n": int(lens.size), "tokens": int(lens.sum()), "answer_tokens": int(answer.sum()),
            "min": int(lens.min()), "p50": q(lens, 50), "p90": q(lens, 90), "p99": q(lens, 99),
            "max": int(lens.max()), "mean": round(float(lens.mean()), 1)}


def prepare(cfg, tokenizer, seed: int, extra: dict[str, list] | None = None) -> Prepared:
    """Run the whole pipeline for train / validation / test; raise once with every invalid row.

    extra: more splits, {config path: [DatasetSpec]} (a curriculum's named datasets and its general held-out set),
    validated, cleaned, deduplicated and length-filtered like the others; in `Prepared.extra`, and then the training
    split may be empty (the caller builds it from them)."""
    drops, errors, sources = Drops(), [], []
    extra = extra or {}
    if not cfg.train and not extra:
        raise DataError("no training dataset configured", field="data.train")
    splits = {}
    for split, specs in (("train", cfg.train), ("validation", cfg.validation), ("test", cfg.test), *extra.items()):
        rw = _load_split(specs, split, cfg, drops, errors, sources)
        rows = dedup([ex for ex, _ in rw], split, drops, cfg.dedup_exact, cfg.dedup_near, cfg.near_dup_threshold)
        keep = {id(ex) for ex in rows}
        rw = [(ex, w) for ex, w in rw if id(ex) in keep]
        kept = {id(ex) for ex in _length_filter([ex for ex, _ in rw], split, cfg, tokenizer, drops, errors)}
        splits[split] = [(ex, w) for ex, w in rw if id(ex) in kept]
    collect(errors, "invalid rows")

    train_rw, val = _carve_validation(splits["train"], [ex for ex, _ in splits["validation"]], cfg, seed)
    train = _mix(train_rw, seed)
    train, augmented = _augment(train, cfg, tokenizer)
    reweighed = reweigh.reweigh(train, cfg.reweigh) if cfg.reweigh.enabled else None
    test = [ex for ex, _ in splits["test"]] or val
    if not train and not extra:
        counts = drops.count("train")
        raise DataError("no training rows left after the data pipeline "
                        f"(dropped: {', '.join(f'{k}={v}' for k, v in counts.items() if v) or 'none'})",
                        field="data.train", hint="see the data report; e.g. raise data.max_seq_len")
    for s in sources:
        s["dropped"] = drops.count(s["split"], s["path"])
        s["rows_out"] = s["rows_in"] - s["invalid"] - sum(s["dropped"].values())
    report = {"sources": sources, "splits": {"train": length_stats(train), "validation": length_stats(val),
                                             "test": length_stats(test)},
              "validation_from_train": not cfg.validation and cfg.val_ratio > 0,
              "test_is_validation": not splits["test"], "max_seq_len": cfg.max_seq_len, "drops": drops.items,
              "augment": augmented, "reweigh": reweighed}
    explored = {"train": train, "validation": val} | ({} if report["test_is_validation"] else {"test": test})
    report["eda"] = eda.explore(explored, cfg.near_dup_threshold)
    check_leakage(report["eda"]["leakage"], cfg.leakage)
    return Prepared(train, val, test, report, {name: [ex for ex, _ in splits[name]] for name in extra})


def _carve_validation(train_rw: list, val: list[Example], cfg, seed: int) -> tuple[list, list[Example]]:
    """(training rows, validation rows): without a validation dataset, a seeded data.val_ratio of the training rows."""
    if cfg.validation or cfg.val_ratio <= 0:
        return train_rw, val
    order = list(range(len(train_rw)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(cfg.val_ratio * len(order))) if len(order) > 1 else 0
    val_idx = set(order[:n_val])
    return [train_rw[i] for i in range(len(train_rw)) if i not in val_idx], [train_rw[i][0] for i in sorted(val_idx)]


def _augment(train: list[Example], cfg, tokenizer) -> tuple[list[Example], dict | None]:
    """The training rows with the augmentation's new rows (filtered, then length-filtered) after them, and its report.
    A new row that is too long is dropped, never an error (data.overlong: error is about the rows you wrote)."""
    if not cfg.augment.operations:
        return train, None
    from .augment import augment, report, rows
    made = augment(train, cfg.augment, near_threshold=cfg.near_dup_threshold,
                   base_model=getattr(tokenizer, "name_or_path", ""))
    long = Drops()
    kept = _length_filter(made.rows, "train", cfg.model_copy(update={"overlong": "drop"}) if cfg.overlong == "error"
                          else cfg, tokenizer, long, [])
    by_source = {ex.source: ex for ex in made.rows}
    for d in long.items:
        ex = by_source[d["location"]]
        made.report["dropped"].append({"row": ex.source, "parent": ex.parent, "operation": ex.operation,
                                       "reason": "overlong", "detail": d["detail"]})
    log.info(f"augmentation: {len(kept)} new training rows from {len(train)}")
    return train + kept, report.summary(made.report, kept, train, rows.template(train))


def check_leakage(leaks: list[dict], mode: str) -> None:
    """Validation / test rows also in the training split: a warning (data.leakage: warn), or one error naming every
    such row (data.leakage: error)."""
    if not leaks:
        return
    if mode == "error":
        collect([DataError(f"{x['row']} ({x['split']}) is a{'n' if x['kind'] == 'exact' else ''} {x['kind']} "
                           f"duplicate of training row {x['train_row']}", field="data.leakage",
                           hint="remove it from one of the splits, or set data.leakage: warn") for x in leaks],
                "rows leak from the training split")
    log.warning(f"warning: {len(leaks)} validation / test rows are also in the training split (listed in the data "
                "report); data.leakage: error stops the run instead")


def report_markdown(report: dict) -> str:
    lines = ["# Data report", "", "| split | file | format | weight | rows in | empty | exact dup | near dup | "
             "overlong | rows out |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["sources"]:
        d = s["dropped"]
        lines.append(f"| {s['split']} | {s['path']} | {s['format']} | {s['weight']:g} | {s['rows_in']} | {d['empty']} "
                     f"| {d['exact_duplicate']} | {d['near_duplicate']} | {d['overlong']} | {s['rows_out']} |")
    lines += ["", "| split | rows | tokens | answer tokens | min | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"
              "---|---|---|"]
    for name, st in report["splits"].items():
        if st.get("n"):
            lines.append(f"| {name} | {st['n']} | {st['tokens']} | {st['answer_tokens']} | {st['min']} | {st['p50']} "
                         f"| {st['p90']} | {st['p99']} | {st['max']} |")
    for st in report.get("curriculum", []):
        if st is report["curriculum"][0]:
            lines += ["", "## Curriculum stages", "", "| stage | steps | rows (padded) | tokens | loss tokens | "
                      "rows per pass |", "|---|---|---|---|---|---|"]
        comp = ", ".join(f"{k} {v}" for k, v in st["composition"].items())
        lines.append(f"| {st['name']} | {st['steps']} | {st['rows']} ({st['padded_rows']}) | {st['tokens']} | "
                     f"{st['loss_tokens']} | {comp} |")
    if report["validation_from_train"]:
        lines.append("\nValidation rows were split off the training data (data.val_ratio).")
    if report["drops"]:
        lines += ["", f"## Dropped rows ({len(report['drops'])}, all listed in data_report.json)", ""]
        lines += [f"- {d['location']} [{d['split']}] {d['reason']}: {d['detail']}" for d in report["drops"][:50]]
    if report.get("augment"):
        from .augment.report import markdown
        lines += markdown(report["augment"])
    lines += reweigh.markdown(report.get("reweigh"))
    if report.get("eda"):
        lines += eda.markdown(report["eda"])
    return "\n".join(lines) + "\n"
