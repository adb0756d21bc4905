"""`llmstack pairs`: on-policy preference pairs from a model's own mistakes (training/preference/onpolicy.py)."""
from __future__ import annotations

import argparse


def run(args) -> int:
    from training.preference.onpolicy import build

    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    build(args.model, args.data, args.out, fields, mode=args.mode, max_rows=args.max_rows, batch_size=args.batch_size,
          max_new_tokens=args.max_new_tokens, models_dir=args.models_dir)
    return 0


def register(sub) -> None:
    from training.preference.onpolicy import MODES
    from training.preference.onpolicy import __doc__ as about

    p = sub.add_parser("pairs", help="on-policy preference pairs from a model's own wrong answers or hard negatives",
                       description=about, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a training artifact (its merged model), its merged/ folder, a model folder or a "
                   "built-in model name")
    p.add_argument("--data", required=True, help="instruction or chat dataset with reference answers (JSONL, JSON, "
                   "CSV, Parquet), e.g. data/tickets/train.jsonl")
    p.add_argument("--out", required=True, help="preference JSONL to write (rows: messages, chosen, rejected, "
                   "rejected_kind)")
    p.add_argument("--mode", choices=MODES, default="answers",
                   help="answers: a pair for each wrong greedy answer (rejected = that answer; right answers are "
                   "skipped); hard: a pair for every prompt (rejected = the reference with one --fields value set to "
                   "the wrong value the model ranks highest); mirrored: each prompt where a wrong label outranks the "
                   "reference, plus a mirror pair that rejects the right label of that prompt on another prompt "
                   "(every label chosen as often as rejected) (default: %(default)s)")
    p.add_argument("--fields", default="category,product,urgency",
                   help="JSON fields of the answer that must match the reference (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=0, help="use the first N rows (0: all; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="generation batch size, --mode answers (hard / mirrored score one prompt's variants in one "
                   "batch) (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96,
                   help="generation limit, --mode answers; a cut-off answer counts as invalid JSON (default: "
                   "%(default)s)")
    p.add_argument("--models-dir", default="models", help="where built-in models are provisioned "
                   "(default: %(default)s)")
    p.set_defaults(func=run)
