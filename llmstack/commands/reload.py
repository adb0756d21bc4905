"""`llmstack reload`: serve another model in a running `llmstack serve`, without a restart (POST /admin/reload)."""
from __future__ import annotations

from .common import LazyEpilog


def swap(url: str, model: str, key: str | None, name: str | None = None, backend: str = "auto",
         timeout: float = 900) -> dict:
    """Ask the server at `url` to swap to `model`; the server's record of the swap. StackError with the server's
    message when it refuses (the old model then still serves)."""
    import httpx

    from core.errors import StackError

    body = {"model": model, "backend": backend} | ({"name": name} if name else {})
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(url.rstrip("/") + "/admin/reload", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise StackError(f"no answer from the server at {url} ({type(exc).__name__}: {exc})", field="--url",
                         hint="start it with `make serve`, or point --url at it") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise StackError(f"the server refused the swap (HTTP {r.status_code}): {message}", field="--model")
    return r.json()


def run(args) -> int:
    import os

    from serving.runtime import load_config

    cfg = load_config(args.config)
    model = args.model
    if model.startswith("models:/"):  # the registry names a folder on this machine
        from tracking import registry
        model = registry.resolve(model, cfg.registry)
    if os.path.exists(model):
        model = os.path.abspath(model)  # the server may run from another folder; else a path on the server's side
    url = args.url or f"http://{cfg.server.host}:{cfg.server.port}"
    key = os.environ.get(cfg.auth.api_key_env)
    record = swap(url, model, key, args.name, args.backend, args.timeout)
    print(f"now serving '{record['model']}' ({record['backend']}) at {url}; clients may keep asking for "
          f"'{record['alias']}'. Loaded in {record['load_seconds']} s; the previous model '{record['previous']}' "
          f"finished its {record['requests_held_by_previous']} requests and was freed"
          f"{'' if record['drained'] else ' (drain timeout: some were cut)'}.")
    if cfg.registry.enabled and os.path.isdir(record["path"]):
        from tracking import registry
        registry.register(record["path"], cfg.registry)
    return 0


def register(sub) -> None:
    r = sub.add_parser("reload", help="swap the model of a running server without downtime",
                       formatter_class=LazyEpilog,
                       description="Load MODEL into the running `llmstack serve` beside the served one, send new "
                       "requests to it, let the requests in flight finish on the old one, then free the old one. A "
                       "failing load leaves the old model serving (exit 2 with the server's message). The API key "
                       "comes from the serve config's auth.api_key_env (default LLMSTACK_API_KEY); a named key "
                       "needs `admin: true`. The new folder is registered in the model registry (@production) like "
                       "`llmstack serve` does.")
    r.add_argument("--model", required=True, help="what to serve next: a compress run, a variant folder, a training "
                   "artifact, an HF / ONNX folder, or models:/<name>@<alias>")
    r.add_argument("--url", help="the server (default: http://<server.host>:<server.port> of --config)")
    r.add_argument("--config", default="configs/serve.yaml", help="serve config: address, key variable, registry "
                   "(default: %(default)s)")
    r.add_argument("--name", help="the new model's id in responses and /v1/models (default: from its artifact)")
    r.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "transformers", "vllm", "openvino"),
                   help="backend for the new model (default: %(default)s, as model.backend)")
    r.add_argument("--timeout", type=float, default=900, help="seconds to wait for load + drain (default: "
                   "%(default)s)")
    r.set_defaults(func=run)
