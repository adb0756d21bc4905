"""`llmstack report`: several models evaluated the same way, side by side (evaluation/report.py)."""
from __future__ import annotations

import argparse

from .common import comma_list, positive_int


def run(args) -> int:
    from evaluation import report as eval_report
    eval_report.run(args.models, config=args.config, limit=args.limit, tasks=args.tasks, out=args.out,
                    harness_limit=args.harness_limit, threads=args.threads, skip_harness=args.no_harness)
    return 0


def register(sub) -> None:
    r = sub.add_parser(
        "report", help="side-by-side evaluation report of several models (base, fine-tuned, compressed variants)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate several models the same way and put them side by side in report.md, report.json and "
        "report.png: task metrics on the test split (exact match, per-field accuracy and macro F1, JSON validity), "
        "answer perplexity, BLEU / ROUGE-L of the answers, and the lm-eval harness task scores. Each model is "
        "measured in its own process by evaluation.measure (PyTorch through transformers, ONNX variants through "
        "ONNX Runtime), then `llmstack harness` runs on it.",
        epilog="example:\n  llmstack report --models base=smollm2-135m-instruct finetuned=artifacts/train/latest "
        "compressed=artifacts/compress/latest --limit 40")
    r.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                   help="models to compare, each NAME=PATH (PATH as for `harness --model`); a bare PATH is named "
                   "after its folder")
    r.add_argument("--config", default="configs/train.yaml", help="training config whose data (test split) and eval "
                   "settings (json_fields, max_new_tokens, batch_size) are used (default: %(default)s)")
    r.add_argument("--limit", type=positive_int, help="first N test rows for the task metrics and perplexity "
                   "(default: all)")
    r.add_argument("--harness-limit", type=positive_int, help="first N documents per harness task (default: --limit)")
    r.add_argument("--tasks", type=comma_list, help="harness tasks (default: every shipped task)")
    r.add_argument("--no-harness", action="store_true", help="skip the lm-eval harness tasks")
    r.add_argument("--threads", type=int, default=0, help="threads per model process (default 0: all cores)")
    r.add_argument("--out", default="artifacts/reports/latest-eval", metavar="DIR",
                   help="output folder (default: %(default)s)")
    r.set_defaults(func=run)
