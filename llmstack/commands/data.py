"""`llmstack data`: the data pipeline of a training config and its report."""
from __future__ import annotations

from .common import DEFAULT_CONFIG, OVERRIDES_HELP


def run(args) -> int:
    from training import data_report
    data_report.run(args.config, args.overrides, args.output)
    return 0


def register(sub) -> None:
    d = sub.add_parser("data", help="run the data pipeline only and print the data report",
                       description="Validate, clean, deduplicate, tokenize and length-filter the configured datasets; "
                       "print the report (rows in/out, every drop with its reason, token lengths).")
    d.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    d.add_argument("--output", help="also write the report as JSON here, and the label fields per split as a PNG beside it")
    d.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    d.set_defaults(func=run)
