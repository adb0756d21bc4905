"""The `harness` and `report` subcommands (registered by llmstack/cli.py); light at import: lm-eval, torch and the
models load when a command runs."""
from __future__ import annotations

import argparse

ENDPOINT_NOTE = ("Against --endpoint only generate_until tasks run (tickets_triage): the llmstack server refuses "
                 "logprobs/echo/n>1 with 400, so loglikelihood tasks (multiple choice) need --model.")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of documents, got {v}")
    return v


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_harness(args) -> int:
    from training import harness
    harness.run(model=args.model, endpoint=args.endpoint, tasks=args.tasks, limit=args.limit, out=args.out,
                data=args.data, batch_size=args.batch_size, threads=args.threads, timeout=args.timeout)
    return 0


def cmd_report(args) -> int:
    from training import eval_report
    eval_report.run(args.models, config=args.config, limit=args.limit, tasks=args.tasks, out=args.out,
                    harness_limit=args.harness_limit, threads=args.threads, skip_harness=args.no_harness)
    return 0


def add_parsers(sub) -> None:
    from training.harness_tasks_list import SHIPPED  # names only, no lm-eval import

    h = sub.add_parser(
        "harness", help="lm-evaluation-harness tasks on a model folder or a served endpoint (offline, local data)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run lm-eval (lm-evaluation-harness) tasks offline on a model folder (lm-eval's hf model; ONNX "
        "variants through ONNX Runtime) or on a running OpenAI-compatible endpoint (lm-eval's "
        "local-chat-completions). Prompts use the model's chat template.",
        epilog="shipped tasks (training/harness_tasks/):\n" + "\n".join(f"  {n:<22}{d}" for n, d in SHIPPED.items())
        + "\n\n" + ENDPOINT_NOTE + "\n\nexamples:\n  llmstack harness --model artifacts/train/latest --limit 50\n"
        "  llmstack harness --model artifacts/compress/latest/onnx-int8 --tasks tickets_category_mc\n"
        "  llmstack harness --endpoint http://127.0.0.1:3000/v1 --tasks tickets_triage --limit 20")
    src = h.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a HF model folder, a training artifact (its merged model), a compress run (its "
                     "recommended variant), a compress variant folder (ONNX included) or a built-in model name")
    src.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible /v1 base URL, e.g. "
                     "http://127.0.0.1:3000/v1 (`llmstack serve`); generate_until tasks only")
    h.add_argument("--tasks", type=_tasks, help="comma-separated task names or paths to lm-eval task YAMLs "
                   "(default: every shipped task; with --endpoint: the shipped generate_until tasks)")
    h.add_argument("--limit", type=_positive, help="evaluate the first N documents of each task (default: all)")
    h.add_argument("--data", metavar="FILE", help="JSONL of instruction/input/output rows with JSON answers for the "
                   "shipped tasks (default: data/tickets/test.jsonl)")
    h.add_argument("--out", metavar="DIR", help="write results.json, results.md and per-document samples_<task>.jsonl "
                   "there (default: print the table only)")
    h.add_argument("--batch-size", type=_positive, default=8, help="model-folder batch size (default: %(default)s)")
    h.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (default 0: all cores)")
    h.add_argument("--timeout", type=_positive, default=300, help="seconds per endpoint request (default: "
                   "%(default)s)")
    h.set_defaults(func=cmd_harness)

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
    r.add_argument("--limit", type=_positive, help="first N test rows for the task metrics and perplexity "
                   "(default: all)")
    r.add_argument("--harness-limit", type=_positive, help="first N documents per harness task (default: --limit)")
    r.add_argument("--tasks", type=_tasks, help="harness tasks (default: every shipped task)")
    r.add_argument("--no-harness", action="store_true", help="skip the lm-eval harness tasks")
    r.add_argument("--threads", type=int, default=0, help="threads per model process (default 0: all cores)")
    r.add_argument("--out", default="artifacts/reports/latest-eval", metavar="DIR",
                   help="output folder (default: %(default)s)")
    r.set_defaults(func=cmd_report)
