"""`llmstack serve`: the BentoML service on a model, OpenAI-compatible."""
from __future__ import annotations

import sys

from .common import LazyEpilog, config_help


def run(args) -> int:
    import json
    import os
    import tempfile

    from serving.model_ref import resolve
    from serving.runtime import CONFIG_ENV, load_config

    overrides = list(args.overrides) + [f"{k}={v}" for k, v in (("model.path", args.model),
                                                                 ("server.host", args.host),
                                                                 ("server.port", args.port)) if v is not None]
    cfg = load_config(args.config, overrides)
    if cfg.model.path.startswith("models:/"):  # the model registry: the folder a version / alias names
        from tracking import registry
        cfg.model.path = registry.resolve(cfg.model.path, cfg.registry)
    ref = resolve(cfg.model.path, cfg.model.backend, cfg.model.name, cfg.model.file_name)  # errors before start-up
    cfg.model.path = str(ref.folder)  # absolute: the worker may start elsewhere
    if cfg.registry.enabled:
        from tracking import registry
        registry.register(ref.folder, cfg.registry)
    for a in cfg.adapters:
        a.path = os.path.abspath(a.path)
    key = "set" if cfg.auth.api_key() else f"off (set {cfg.auth.api_key_env} or {cfg.auth.api_key_env}_FILE to require one)"
    if cfg.auth.keys_file:
        from serving.keys import read_keys
        cfg.auth.keys_file = os.path.abspath(cfg.auth.keys_file)
        key = f"{len(read_keys(cfg.auth.keys_file))} named keys from {args_path(cfg.auth.keys_file)}" + \
            (" and the default key" if key == "set" else "")
    if cfg.auth.audit_log:
        cfg.auth.audit_log = os.path.abspath(cfg.auth.audit_log)
    fd, path = tempfile.mkstemp(prefix="llmstack-serve-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg.model_dump(mode="json"), f)
    print(f"serving {ref.folder} as '{ref.name}' on {ref.backend} at http://{cfg.server.host}:{cfg.server.port}/v1 "
          f"(API key {key})", flush=True)
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    argv = [bentoml, "serve", "serving.service:LLMService", "--host", cfg.server.host, "--port",
            str(cfg.server.port)]
    os.environ[CONFIG_ENV] = path
    # BentoML empties <BENTOML_HOME>/prometheus_multiproc_dir when a server starts, so two servers sharing a home
    # wipe each other's metrics: one home per port unless the user chose one.
    os.environ.setdefault("BENTOML_HOME", os.path.join(tempfile.gettempdir(), f"llmstack-bentoml-{cfg.server.port}"))
    os.execv(bentoml, argv)


def args_path(path: str) -> str:
    """A path as the user would write it: relative to the working folder when inside it."""
    import os
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible BentoML service with Prometheus "
                       "metrics", formatter_class=LazyEpilog,
                       epilog=config_help("serving.config", "ServeConfig"),
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
    s.set_defaults(func=run)
