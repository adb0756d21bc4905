"""`llmstack drift report | reference | demo`: live traffic against the training run's drift reference."""
from __future__ import annotations

import os

from core.errors import StackError

from .common import log_and_reference_args, reference


def run_report(args) -> int:
    from monitoring import report
    res = report.build(args.log, reference(args), args.out, last=args.last, method=args.method,
                       share=args.share)
    print(f"{res['rows']} requests: {'DATASET DRIFT' if res['dataset_drift'] else 'no dataset drift'} "
          f"({res['drifted_features']} of {res['tested_features']} features drift)")
    for e in res["features"]:
        state = "n/a" if e["drift"] is None else ("DRIFT" if e["drift"] else "ok")
        score = "" if e["score"] is None else f"{e['method']} {e['score']:.4g}"
        print(f"  {e['name']:<28} {state:<6} {score}")
    print(f"report: {res['out']}")
    return 0


def run_reference(args) -> int:
    from training.outputs import drift_reference_for
    print(f"drift reference: {drift_reference_for(args.artifact, args.outputs_from)}")
    return 0


def run_demo(args) -> int:
    from monitoring import demo
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in demo.SETS]
    if unknown:
        raise StackError(f"unknown traffic sets {unknown}; choose from {', '.join(demo.SETS)}", field="--sets")
    demo.run(args.url, sets, n=args.n, concurrency=args.concurrency, max_tokens=args.max_tokens,
             api_key=os.environ.get(args.api_key_env))
    return 0


def register(sub) -> None:
    dr = sub.add_parser("drift", help="drift: an HTML report from the request log, or the live demo",
                        description="Drift of live traffic against the training run's reference profile.")
    dsub = dr.add_subparsers(dest="action", required=True, metavar="ACTION")
    rep = dsub.add_parser("report", help="HTML report of the request log against the drift reference",
                          description="Compare the request log's successful requests with the drift reference "
                          "(per-feature test, score, verdict, reference vs current histograms) and write HTML.")
    log_and_reference_args(rep)
    rep.add_argument("--out", default="artifacts/serve/drift_report.html", help="HTML file (default: %(default)s)")
    rep.add_argument("--last", type=int, help="only the last N requests (default: all)")
    rep.add_argument("--method", choices=["auto", "psi"], default="auto",
                     help="auto: Evidently's default tests; psi: Population Stability Index for numeric features")
    rep.add_argument("--share", type=float, default=0.5,
                     help="dataset drift when at least this share of features drift (default: %(default)s)")
    rep.set_defaults(func=run_report)
    rf = dsub.add_parser("reference", help="(re)build the drift reference of an existing training artifact",
                         description="Training writes drift_reference.json itself; this builds it for an artifact "
                         "made before that (or with other settings), from its config, data and merged model.")
    rf.add_argument("artifact", nargs="?", default="artifacts/train/latest",
                    help="training artifact folder (default: artifacts/train/latest)")
    rf.add_argument("--outputs-from", choices=["eval", "validation"],
                    help="the answers profiled: eval (predictions_after.jsonl, if it has token statistics) or "
                    "validation (generate on the validation split); default: eval when possible")
    rf.set_defaults(func=run_reference)
    dm = dsub.add_parser("demo", help="send in-distribution, then shifted traffic to a running service and show "
                         "the drift verdicts flip",
                         description="Phases: in_distribution (held-out tickets), language (German tickets), "
                         "domain (cooking/travel/code questions), long (long support threads); each sends one "
                         "window of requests, then prints the service's /drift verdict. Watch /dashboard meanwhile.")
    dm.add_argument("--url", default="http://127.0.0.1:3000", help="the running service (default: %(default)s)")
    dm.add_argument("--sets", default="in_distribution,language,in_distribution,domain,in_distribution,long",
                    help="phases in order, comma-separated (default: %(default)s)")
    dm.add_argument("--n", type=int, help="requests per phase (default: the service's drift window size)")
    dm.add_argument("--concurrency", type=int, default=4, help="parallel clients (default: %(default)s)")
    dm.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: %(default)s, the "
                    "demo training's eval.max_new_tokens: the reference answers were cut there too)")
    dm.add_argument("--api-key-env", default="LLMSTACK_API_KEY",
                    help="environment variable holding the API key, if the service needs one (default: %(default)s)")
    dm.set_defaults(func=run_demo)
