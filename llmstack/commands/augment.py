"""`llmstack augment`: a dataset file augmented on its own (the data.augment section of a training config)."""
from __future__ import annotations

from .common import DEFAULT_CONFIG, OVERRIDES_HELP, LazyEpilog, config_help


def run(args) -> int:
    from training import augment
    augment.run(args.input, args.output, args.config, args.overrides, only_new=args.only_new)
    return 0


def register(sub) -> None:
    a = sub.add_parser("augment", help="augment a dataset file (noise, slots, paraphrase, counterfactual) with a "
                       "quality filter", formatter_class=LazyEpilog,
                       epilog=config_help("chatdata.augment.config", "AugmentCfg", "data.augment."),
                       description="Apply the data.augment operations of a training config to one dataset file: "
                       "each new row passes the quality filter (duplicates, length, language, label check, cap per "
                       "original) or is listed with the reason it was dropped. Writes chat JSONL (the original rows, "
                       "then the new ones with their `parent` and `operation`) and OUTPUT.report.{md,json}. "
                       "`llmstack train` does the same to its training split when data.augment is set.")
    a.add_argument("input", help="dataset file (.jsonl, .json, .csv, .parquet; instruction, chat or text rows)")
    a.add_argument("-o", "--output", required=True, help="where to write the augmented rows (JSONL)")
    a.add_argument("--config", default=DEFAULT_CONFIG, help="training config whose data.augment (and model, for "
                   "`model: base`) is used (default: %(default)s)")
    a.add_argument("--only-new", action="store_true", help="write only the new rows (e.g. a noisy copy of a test set)")
    a.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + "; e.g. "
                   "'data.augment.operations=[{op: char_noise, rate: 1, strength: 0.15}]'")
    a.set_defaults(func=run)
