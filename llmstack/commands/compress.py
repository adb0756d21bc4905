"""`llmstack compress`: build, measure and gate the configured variants."""
from __future__ import annotations

from .common import LazyEpilog, config_help


def run(args) -> int:
    from compression.config import CompressConfig
    from core.config import load

    overrides = list(args.overrides) + ([f"input={args.input}"] if args.input else [])
    cfg = load(CompressConfig, args.config, overrides)  # config errors before the heavy imports
    from compression import run
    run.run(cfg, fast=args.fast)
    return 0


def register(sub) -> None:
    c = sub.add_parser("compress", help="quantize, prune and distill the fine-tuned model; measure and gate every variant",
                       formatter_class=LazyEpilog,
                       epilog=config_help("compression.config", "CompressConfig"),
                       description="Build the configured variants (prune -> distill -> ONNX export -> quantize) from a "
                       "training artifact or HF model folder, measure each and the input model the same way (size, "
                       "load RAM, prefill, decode tokens/s, perplexity, task score, agreement), mark each fit or unfit "
                       "by the quality gate, and write artifacts/compress/<run-id>/ with report.md/json/png and the "
                       "recommended variant.")
    c.add_argument("--config", default="configs/compress.yaml", help="YAML config (default: %(default)s)")
    c.add_argument("--input", help="training artifact or HF model folder (overrides the config's input; default "
                   "artifacts/train/latest)")
    c.add_argument("--fast", action="store_true", help="build only fast.variants (default onnx-int8, then onnx-fp32), "
                   "in order, until one passes the quality gate, and recommend it; no reference speed run (what "
                   "`make serve` runs when no compress artifact exists)")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. prune.drop_layers=6 "
                   "distill.steps=50 measure.eval_samples=50 gate.max_task_drop=0.05")
    c.set_defaults(func=run)
