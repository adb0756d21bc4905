"""`llmstack tune`: hyperparameter search over the training recipe (training/tune)."""
from __future__ import annotations

from .common import LazyEpilog


def _help() -> str:
    from core.config import describe
    from training.tune.config import TuneConfig
    from training.tune.search import SPACE_HELP

    return SPACE_HELP + "\n\ntune config options (override any with section.key=value):\n" + describe(TuneConfig)


def run(args) -> int:
    from training.tune.search import search_from_config

    search_from_config(args.config, args.overrides, args.resume)
    return 0


def register(sub) -> None:
    from training.tune.config import DEFAULT_TUNE_CONFIG  # pydantic only: --help stays instant

    p = sub.add_parser("tune", help="hyperparameter search (grid, random, Optuna TPE) with pruning; writes the best "
                       "config as a ready train YAML", formatter_class=LazyEpilog, epilog=_help,
                       description="Train one trial per sampled set of TrainConfig values (lr, LoRA r/alpha, warmup, "
                       "epochs, any field by dotted name), stop poor trials early from their validation loss, and "
                       "write artifacts/tune/<run-id>/ with the trials table (Markdown, JSON, CSV), a plot, the "
                       "Optuna study and best.yaml.")
    p.add_argument("--config", default=DEFAULT_TUNE_CONFIG, help="tune config YAML (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted (or finished) search, its folder "
                   "under the tune config's output.dir, with its saved config; finished trials count towards "
                   "budget.n_trials, which may be raised with a budget.n_trials=N override (budget.timeout_s "
                   "counts from the resume)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the tune config, e.g. "
                   "budget.n_trials=4 sampler.name=random pruning.pruner=none")
    p.set_defaults(func=run)
