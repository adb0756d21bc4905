"""Preference data for the DPO / ORPO / KTO recipe (training/preference/recipe.py): read and validate the rows (every
problem named with its file, line and field), clean, deduplicate, tokenize with the chat template, length-filter and
mix them, with the same data report as the SFT pipeline; and convert them to TRL's row format.

Rows: {prompt | messages | instruction (+ input), chosen, rejected} for every recipe; kto also takes unpaired rows
{prompt ..., completion, label: bool} (pairs become one desirable and one undesirable row).
"""
from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass, field
from types import SimpleNamespace

from chatdata import pipeline as data_mod
from core import artifacts
from core.errors import ConfigError, DataError, StackError, collect
from training.config import TrainConfig


@dataclass
class PrefRow:
    """One validated row: the prompt (chat messages) and either a chosen/rejected pair or a labelled completion."""
    source: str                          # "file:line"
    prompt: list[dict]
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    prompt_ids: list[int] = field(default_factory=list)
    chosen_ids: list[int] = field(default_factory=list)     # answer tokens (end-of-turn included)
    rejected_ids: list[int] = field(default_factory=list)

    # what data.Drops / data.length_stats / dedup read
    def flat_text(self) -> str:
        turns = "\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)
        return f"{turns}\nchosen: {self.chosen}\nrejected: {self.rejected}\ncompletion: {self.completion}|{self.label}"

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + (self.chosen_ids or [])

    @property
    def labels(self) -> list[int]:
        return [-100] * len(self.prompt_ids) + list(self.chosen_ids or [])

    @property
    def paired(self) -> bool:
        return self.chosen is not None

    def answer(self) -> str:
        """The reference answer for generation metrics: the chosen one (or a desirable completion)."""
        return self.chosen if self.paired else self.completion


def _text(row: dict, key: str, loc: str, errors: list, *, required: bool = True) -> str | None:
    """A non-empty string field; an answer may also be TRL's conversational form [{role: assistant, content}]."""
    value = row.get(key)
    if value is None:
        if required:
            errors.append(DataError("missing field", file=loc, field=key,
                                    hint="preference rows need prompt (or messages / instruction), chosen and "
                                         "rejected; see docs/preference.md"))
        return None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and "content" in value[0]:
        value = value[0]["content"]
    if not isinstance(value, str):
        errors.append(DataError(f"must be a string, got {type(value).__name__}", file=loc, field=key))
        return None
    if not value.strip():
        errors.append(DataError("empty string", file=loc, field=key))
        return None
    return value


def _prompt(row: dict, loc: str, errors: list) -> list[dict] | None:
    n = len(errors)
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, list):  # conversational prompt
            ex = data_mod.to_example({"messages": p + [{"role": "assistant", "content": "x"}]}, "chat", loc, errors)
            return ex.messages[:-1] if ex is not None else None
        text = _text(row, "prompt", loc, errors)
        return [{"role": "user", "content": text}] if len(errors) == n else None
    if "messages" in row:
        msgs = row["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            errors.append(DataError("the prompt's messages end with an assistant turn; put the answers in chosen / "
                                    "rejected", file=loc, field="messages"))
            return None
        ex = data_mod.to_example({"messages": (msgs if isinstance(msgs, list) else [])
                                  + [{"role": "assistant", "content": "x"}]}, "chat", loc, errors)
        return ex.messages[:-1] if ex is not None else None
    if "instruction" in row:
        instr = _text(row, "instruction", loc, errors)
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            errors.append(DataError(f"must be a string, got {type(inp).__name__}", file=loc, field="input"))
        if len(errors) > n:
            return None
        return [{"role": "user", "content": f"{instr}\n\n{inp}" if inp.strip() else instr}]
    errors.append(DataError("missing field", file=loc, field="prompt",
                            hint="give the prompt as prompt (text or messages), messages, or instruction + input"))
    return None


def to_row(row: dict, kind: str, loc: str, errors: list, norm: str) -> PrefRow | None:
    """Validate one raw row (kind: pairs | unpaired); problems go to `errors` with file:line and field."""
    n = len(errors)
    prompt = _prompt(row, loc, errors)
    clean = (lambda s: unicodedata.normalize(norm, s).strip() if norm != "none" else s.strip())  # noqa: E731
    if kind == "pairs":
        chosen, rejected = _text(row, "chosen", loc, errors), _text(row, "rejected", loc, errors)
        if chosen is not None and rejected is not None and clean(chosen) == clean(rejected):
            errors.append(DataError("chosen and rejected are the same answer: nothing to prefer", file=loc,
                                    field="rejected"))
        if len(errors) > n:
            return None
        return PrefRow(loc, prompt, chosen=clean(chosen), rejected=clean(rejected))
    completion = _text(row, "completion", loc, errors)
    label = row.get("label")
    if not isinstance(label, bool):
        errors.append(DataError(f"must be true or false, got {label!r}", file=loc, field="label"))
    if len(errors) > n:
        return None
    return PrefRow(loc, prompt, completion=clean(completion), label=label)


def row_kind(columns: set[str], path, recipe: str) -> str:
    """pairs (chosen / rejected) or unpaired (completion / label, kto only), from a file's columns."""
    if columns & {"chosen", "rejected"}:
        return "pairs"
    if recipe == "kto" and {"completion", "label"} <= columns:
        return "unpaired"
    need = "chosen / rejected (or, for kto, completion / label)" if recipe == "kto" else "chosen / rejected"
    raise DataError(f"recipe {recipe} needs preference rows with {need}; this file has columns {sorted(columns)}",
                    file=path, field="chosen",
                    hint="an SFT dataset (messages / instruction + output) has no pairs: build pairs as in "
                         "data/generate_preference.py, or set recipe: sft")


def _encode(tokenizer, row: PrefRow) -> None:
    """prompt_ids (chat template with the generation prompt) and each answer's tokens after it."""
    prompt_ids = tokenizer(data_mod.render(tokenizer, row.prompt, generation_prompt=True),
                           add_special_tokens=False)["input_ids"]

    def answer_ids(text):
        full = tokenizer(data_mod.render(tokenizer, row.prompt + [{"role": "assistant", "content": text}]),
                         add_special_tokens=False)["input_ids"]
        k = 0
        while k < min(len(full), len(prompt_ids)) and full[k] == prompt_ids[k]:
            k += 1
        return full[k:], k

    if row.paired:
        (row.chosen_ids, kc), (row.rejected_ids, kr) = answer_ids(row.chosen), answer_ids(row.rejected)
        k = min(kc, kr)
        row.chosen_ids = prompt_ids[k:kc] + row.chosen_ids if kc > k else row.chosen_ids
        row.rejected_ids = prompt_ids[k:kr] + row.rejected_ids if kr > k else row.rejected_ids
    else:
        row.chosen_ids, k = answer_ids(row.completion)
    row.prompt_ids = prompt_ids[:k]


def _load_split(specs, split, cfg: TrainConfig, tokenizer, drops, errors, sources) -> list[tuple[PrefRow, float]]:
    d, p = cfg.data, cfg.preference
    out = []
    for spec in specs:
        loaded = data_mod.load_spec(spec, split, errors)
        if loaded is None:
            continue
        path, raw, locs = loaded
        try:
            kind = row_kind(set().union(*raw), path, cfg.recipe)
        except StackError as exc:
            errors.append(exc)
            continue
        before, rows = len(errors), []
        for r, loc in zip(raw, locs):
            row = to_row(r, kind, loc, errors, d.unicode_normalization)
            if row is None:
                continue
            if d.system_prompt and row.prompt[0]["role"] != "system":
                row.prompt.insert(0, {"role": "system", "content": d.system_prompt})
            rows.append(row)
        sources.append({"split": split, "path": str(path), "sha256": artifacts.sha256_file(path),
                        "format": "preference" if kind == "pairs" else "unpaired", "weight": spec.weight,
                        "rows_in": len(raw), "invalid": len(errors) - before})
        out.extend((row, spec.weight) for row in rows)
    if errors:
        return out
    kept = data_mod.dedup([r for r, _ in out], split, drops, d.dedup_exact, False, 1.0)
    keep = {id(r) for r in kept}
    final = []
    for row, w in out:
        if id(row) not in keep:
            continue
        _encode(tokenizer, row)
        longest = len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids))
        why = (f"prompt has {len(row.prompt_ids)} tokens > preference.max_prompt_len={p.max_prompt_len}"
               if len(row.prompt_ids) > p.max_prompt_len else
               f"{longest} tokens > data.max_seq_len={d.max_seq_len}" if longest > d.max_seq_len else None)
        if why:
            if d.overlong == "error":
                errors.append(DataError(f"row too long: {why}", file=row.source,
                                        hint="raise the limit or set data.overlong=drop"))
            else:
                drops.add(split, "overlong", row, why)
            continue
        final.append((row, w))
    return final


def prepare(cfg: TrainConfig, tokenizer) -> SimpleNamespace:
    """train / validation / test preference rows and the data report (same shape as the SFT data report); raises
    once with every invalid row."""
    d = cfg.data
    drops, errors, sources, splits = data_mod.Drops(), [], [], {}
    if d.augment.operations or d.reweigh.enabled:
        raise ConfigError("augmentation and reweighing apply to SFT rows, not to preference pairs",
                          field="data.augment" if d.augment.operations else "data.reweigh",
                          hint="augment the rows the pairs are made from with `llmstack augment`, or remove it")
    if not d.train:
        raise DataError("no training dataset configured", field="data.train")
    for split, specs in (("train", d.train), ("validation", d.validation), ("test", d.test)):
        splits[split] = _load_split(specs, split, cfg, tokenizer, drops, errors, sources)
    collect(errors, "invalid rows")
    train_rw, val = splits["train"], [r for r, _ in splits["validation"]]
    if not d.validation and d.val_ratio > 0 and len(train_rw) > 1:
        order = list(range(len(train_rw)))
        random.Random(cfg.train.seed).shuffle(order)
        held = set(order[:max(1, round(d.val_ratio * len(order)))])
        val = [train_rw[i][0] for i in sorted(held)]
        train_rw = [rw for i, rw in enumerate(train_rw) if i not in held]
    train = data_mod._mix(train_rw, cfg.train.seed)
    test = [r for r, _ in splits["test"]] or val
    if not train:
        raise DataError("no training rows left after the data pipeline (see the data report)", field="data.train")
    for s in sources:
        s["dropped"] = drops.count(s["split"], s["path"])
        s["rows_out"] = s["rows_in"] - s["invalid"] - sum(s["dropped"].values())
    rep = {"sources": sources, "splits": {"train": data_mod.length_stats(train), "validation":
                                          data_mod.length_stats(val), "test": data_mod.length_stats(test)},
           "validation_from_train": not d.validation and d.val_ratio > 0, "test_is_validation": not splits["test"],
           "max_seq_len": d.max_seq_len, "drops": drops.items}
    return SimpleNamespace(train=train, validation=val, test=test, report=rep)


def trl_rows(rows: list[PrefRow], recipe: str) -> list[dict]:
    """TRL's conversational format; kto gets each pair as a desirable and an undesirable completion."""
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if recipe != "kto":
        return [{"prompt": r.prompt, "chosen": answer(r.chosen), "rejected": answer(r.rejected)} for r in rows]
    out = []
    for r in rows:
        if r.paired:
            out += [{"prompt": r.prompt, "completion": answer(r.chosen), "label": True},
                    {"prompt": r.prompt, "completion": answer(r.rejected), "label": False}]
        else:
            out.append({"prompt": r.prompt, "completion": answer(r.completion), "label": r.label})
    return out
