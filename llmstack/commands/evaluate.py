"""`llmstack eval`: one model on the test split of a training config."""
from __future__ import annotations

from .common import DEFAULT_CONFIG, OVERRIDES_HELP


def run(args) -> int:
    from evaluation import run as evaluation_run
    evaluation_run.run(args.model, args.config, args.overrides, args.output)
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model folder or training artifact on the test split",
                       description="Loss/perplexity and the task metric (JSON fields or BLEU/ROUGE) of any HF model "
                       "folder or training artifact, on the config's test data.")
    e.add_argument("model", help="HF model folder, training artifact (uses its merged/ model) or built-in name")
    e.add_argument("--config", default=DEFAULT_CONFIG, help="config whose data and eval sections are used")
    e.add_argument("--output", help="write metrics and predictions as JSON here")
    e.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    e.set_defaults(func=run)
