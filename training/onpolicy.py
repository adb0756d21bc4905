"""`llmstack pairs`: on-policy preference pairs from a model's own mistakes.

The shipped pairs (data/preference) reject random near misses; a fine-tuned model that already ranks those below the
correct answer learns little from them (docs/preference.md). Here the model answers the prompts of an instruction
dataset greedily, each answer is scored against the dataset's reference like the preference evaluation does
(`preference.rejected_kind`: invalid JSON, text around the JSON, a missing or wrong scored field), and every wrong
answer becomes a pair: chosen = the reference, rejected = what the model said. Rows the model gets right are
skipped. The output is the preference-row format the dpo / orpo / kto recipes read.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from llmstack import artifacts
from llmstack.errors import DataError, collect


def build(model: str, data: str, out: str, fields: list[str], *, max_rows: int = 0, batch_size: int = 32,
          max_new_tokens: int = 96, models_dir: str = "models") -> dict:
    """Write the pairs to `out` (JSONL, atomically) and return a summary."""
    from . import data as data_mod
    from . import evaluate as ev
    from .config import ModelCfg, TrainConfig
    from .model import load_model, load_tokenizer
    from .preference import rejected_kind, resolve_model

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
    model_dir, _ = resolve_model(TrainConfig(model=ModelCfg(name_or_path=model, models_dir=models_dir)))
    tokenizer = load_tokenizer(model_dir)
    lm = load_model(model_dir)
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
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tmp.replace(target)
    summary = {"model": str(model_dir), "data": str(data), "sha256": artifacts.sha256_file(data),
               "prompts": len(examples), "pairs": len(pairs), "right": len(examples) - sum(kinds.values()),
               "rejected_kinds": dict(kinds), "fields": fields, "out": str(target)}
    print(f"{len(examples)} prompts: {summary['right']} answered right, {len(pairs)} pairs -> {target} "
          f"({', '.join(f'{k} {v}' for k, v in kinds.most_common()) or 'no pairs'})")
    return summary


def cmd(args) -> int:
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    build(args.model, args.data, args.out, fields, max_rows=args.max_rows, batch_size=args.batch_size,
          max_new_tokens=args.max_new_tokens, models_dir=args.models_dir)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="on-policy preference pairs from a model's own wrong answers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a training artifact (its merged model), its merged/ folder, a model folder or a "
                   "built-in model name")
    p.add_argument("--data", required=True, help="instruction or chat dataset with reference answers (JSONL, JSON, "
                   "CSV, Parquet), e.g. data/tickets/train.jsonl")
    p.add_argument("--out", required=True, help="preference JSONL to write (rows: messages, chosen, rejected, "
                   "rejected_kind)")
    p.add_argument("--fields", default="category,product,urgency",
                   help="JSON fields of the answer that must match the reference (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=0, help="use the first N rows (0: all; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="generation batch size (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96,
                   help="generation limit; a cut-off answer counts as invalid JSON (default: %(default)s)")
    p.add_argument("--models-dir", default="models", help="where built-in models are provisioned "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd)
