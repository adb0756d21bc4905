"""`llmstack train`: fine-tune (SFT or a preference recipe), or resume an interrupted run."""
from __future__ import annotations

import os

from core.errors import StackError

from .common import DEFAULT_CONFIG, OVERRIDES_HELP, LazyEpilog, config_help


def run(args) -> int:
    from core.config import load
    from training.config import TrainConfig

    if args.resume is not None:
        if args.overrides:
            raise StackError("--resume continues a run with its saved config; overrides are not allowed",
                             field="overrides")
        # interrupted runs are looked for under the config's output.dir (default config missing: the default dir)
        path = args.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
        cfg = load(TrainConfig, path)
        from training.sft import recipe as sft
        sft.run(cfg, resume=True, resume_id=args.resume or None)
        return 0
    cfg = load(TrainConfig, args.config or DEFAULT_CONFIG, args.overrides)  # config errors before the heavy imports
    if cfg.recipe in ("dpo", "orpo", "kto"):
        from training.preference import recipe as preference
        preference.run(cfg, force=args.force)
        return 0
    from training.sft import recipe as sft
    sft.run(cfg, force=args.force)
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="fine-tune a model (full, freeze, LoRA and other peft methods) and merge it",
                       formatter_class=LazyEpilog,
                       epilog=config_help("training.config", "TrainConfig"),
                       description="Fine-tune the base model on the configured data, evaluate before and after on the "
                       "test split, and write artifacts/train/<run-id>/ (merged model, adapter, manifest, reports).")
    t.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG}; with --resume: where its output.dir "
                   "is looked for interrupted runs)")
    t.add_argument("--force", action="store_true", help="train even if an artifact with the same config, data and "
                   "base model exists (otherwise: 'already built')")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint (default: the most recent one)")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.set_defaults(func=run)
