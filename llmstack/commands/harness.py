"""`llmstack harness`: lm-evaluation-harness tasks on a model folder or a served endpoint (evaluation/harness)."""
from __future__ import annotations

import argparse

from .common import comma_list, positive_int

ENDPOINT_NOTE = ("Against --endpoint only generate_until tasks run (tickets_triage): the llmstack server refuses "
                 "logprobs/echo/n>1 with 400, so loglikelihood tasks (multiple choice) need --model.")


def run(args) -> int:
    from evaluation.harness import run as harness
    harness.run(model=args.model, endpoint=args.endpoint, tasks=args.tasks, limit=args.limit, out=args.out,
                data=args.data, batch_size=args.batch_size, threads=args.threads, timeout=args.timeout)
    return 0


def register(sub) -> None:
    from evaluation.harness.tasks_list import SHIPPED  # names only, no lm-eval import

    h = sub.add_parser(
        "harness", help="lm-evaluation-harness tasks on a model folder or a served endpoint (offline, local data)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run lm-eval (lm-evaluation-harness) tasks offline on a model folder (lm-eval's hf model; ONNX "
        "variants through ONNX Runtime) or on a running OpenAI-compatible endpoint (lm-eval's "
        "local-chat-completions). Prompts use the model's chat template.",
        epilog="shipped tasks (evaluation/harness/tasks/):\n" + "\n".join(f"  {n:<22}{d}" for n, d in SHIPPED.items())
        + "\n\n" + ENDPOINT_NOTE + "\n\nexamples:\n  llmstack harness --model artifacts/train/latest --limit 50\n"
        "  llmstack harness --model artifacts/compress/latest/onnx-int8 --tasks tickets_category_mc\n"
        "  llmstack harness --endpoint http://127.0.0.1:3000/v1 --tasks tickets_triage --limit 20")
    src = h.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a HF model folder, a training artifact (its merged model), a compress run (its "
                     "recommended variant), a compress variant folder (ONNX included) or a built-in model name")
    src.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible /v1 base URL, e.g. "
                     "http://127.0.0.1:3000/v1 (`llmstack serve`); generate_until tasks only")
    h.add_argument("--tasks", type=comma_list, help="comma-separated task names or paths to lm-eval task YAMLs "
                   "(default: every shipped task; with --endpoint: the shipped generate_until tasks)")
    h.add_argument("--limit", type=positive_int, help="evaluate the first N documents of each task (default: all)")
    h.add_argument("--data", metavar="FILE", help="JSONL of instruction/input/output rows with JSON answers for the "
                   "shipped tasks (default: data/tickets/test.jsonl)")
    h.add_argument("--out", metavar="DIR", help="write results.json, results.md and per-document samples_<task>.jsonl "
                   "there (default: print the table only)")
    h.add_argument("--batch-size", type=positive_int, default=8, help="model-folder batch size (default: %(default)s)")
    h.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (default 0: all cores)")
    h.add_argument("--timeout", type=positive_int, default=300, help="seconds per endpoint request (default: "
                   "%(default)s)")
    h.set_defaults(func=run)
