"""`llmstack retrain`: served traffic → a new model → old vs new → a promotion decision (→ a swap with --promote)."""
from __future__ import annotations

from .common import OVERRIDES_HELP, LazyEpilog, config_help


def run(args) -> int:
    from core.config import load
    from llmstack.retrain.config import RetrainConfig

    cfg = load(RetrainConfig, args.config, args.overrides)  # config errors before the heavy imports
    from llmstack.retrain import recipe
    recipe.run(cfg, promote=args.promote)
    return 0


def register(sub) -> None:
    r = sub.add_parser("retrain", help="retrain from served traffic, compare with the served model, decide (and "
                       "swap it in with --promote)", formatter_class=LazyEpilog,
                       epilog=config_help("llmstack.retrain.config", "RetrainConfig"),
                       description="Select traffic from the request log (drifted requests, or a review file where a "
                       "person accepted / corrected answers), fine-tune a candidate continuing the served model's "
                       "training with its own training rows in the mix, compress it (fast path), score served and "
                       "candidate on the same held-out rows and drifted rows, and decide by the promotion rule (no "
                       "held-out regression beyond promotion.max_heldout_drop, a drifted gain above "
                       "promotion.min_drifted_gain). Writes artifacts/retrain/<run-id>/ (manifest, report.md, the "
                       "selected rows, predictions) and logs the decision to MLflow (experiment llmstack-retrain).")
    r.add_argument("--config", default="configs/retrain.yaml", help="YAML config (default: %(default)s)")
    r.add_argument("--promote", action="store_true", help="when the rule says promote: swap the running service to "
                   "the candidate (POST /admin/reload at service.url, key from service.api_key_env) and point the "
                   "registry alias at it")
    r.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    r.set_defaults(func=run)
