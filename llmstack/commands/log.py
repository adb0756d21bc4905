"""`llmstack log export`: logged requests as a training dataset."""
from __future__ import annotations

from .common import log_and_reference_args, reference


def run(args) -> int:
    import time

    from monitoring import requestlog
    since = time.time() - args.since_hours * 3600 if args.since_hours else None
    ref = reference(args) if args.drifted_only else None
    n = requestlog.export(args.log, args.out, since=since, drifted_only=args.drifted_only, reference=ref)
    print(f"{n} requests -> {args.out} (chat JSONL: review the assistant answers, then add it to data.train)")
    return 0


def register(sub) -> None:
    lg = sub.add_parser("log", help="the request log: export as a training dataset",
                        description="The opt-in request log (monitoring.request_log in the serve config).")
    lsub = lg.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex = lsub.add_parser("export", help="export logged requests as chat JSONL the training pipeline accepts",
                         description="Successful requests -> {messages: [...prompt, assistant answer]} rows (PII "
                         "already redacted at logging time). Review and correct the answers, then list the file in "
                         "data.train of the train config.")
    log_and_reference_args(ex)
    ex.add_argument("--out", required=True, help="JSONL file to write")
    ex.add_argument("--since-hours", type=float, help="only requests from the last N hours")
    ex.add_argument("--drifted-only", action="store_true", help="only requests whose prompt features fall outside "
                    "the reference's central 95%% (needs the drift reference: --model or --reference)")
    ex.set_defaults(func=run)
