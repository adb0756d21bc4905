"""The serving config: one pydantic model, YAML -> model -> code (configs/serve.yaml). Field docstrings are the
`llmstack serve --help` text."""
from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import Field

from core.config import Section
from core.errors import ConfigError
from monitoring.config import MonitoringCfg
from tracking.config import RegistryCfg


class ModelCfg(Section):
    path: str = "artifacts/compress/latest"
    """What to serve: a compress run (its recommended variant), one compress variant folder, a training artifact
    (its merged model) or any HF model folder (safetensors) / ONNX export folder."""
    name: Optional[str] = None
    """The model id clients send and /v1/models lists (default: the artifact's variant or folder name)."""
    backend: Literal["auto", "onnxruntime", "transformers", "vllm", "openvino"] = "auto"
    """auto: what the artifact's manifest names (ONNX variants: onnxruntime; HF folders: vllm on a GPU machine,
    transformers otherwise; OpenVINO IR folders: openvino). openvino: OpenVINO GenAI's continuous-batching pipeline
    on an HF folder (exported once, see `openvino`) or an IR folder."""
    file_name: Optional[str] = None
    """ONNX file inside the folder (default: the manifest's, else model.onnx)."""
    threads: int = Field(0, ge=0)
    """CPU threads for the model (0: all cores)."""


class ServerCfg(Section):
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 in containers)."""
    port: int = Field(3000, ge=1, le=65535)
    """HTTP port."""
    default_max_tokens: int = Field(256, ge=1)
    """max_tokens of a chat request that sets none."""


class LimitsCfg(Section):
    max_prompt_tokens: int = Field(2048, ge=1)
    """Longer prompts are refused with 400 naming the limit."""
    max_tokens: int = Field(1024, ge=1)
    """The largest max_tokens a request may ask for."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Larger request bodies are refused with 413."""
    max_running: int = Field(8, ge=1)
    """Requests decoded together in one batch (continuous batching slots)."""
    max_waiting: int = Field(32, ge=0)
    """Requests queued for a slot; beyond running + waiting, requests get 429 with Retry-After."""
    prefix_cache_mb: int = Field(256, ge=0)
    """Memory for automatic prefix caching (KV of earlier prompts' 16-token blocks, reused when a new prompt starts
    the same way, e.g. the same system prompt); 0: off. In-process backends only (vLLM has its own)."""
    retry_after_s: int = Field(1, ge=1)
    """The Retry-After an overloaded server answers."""
    drain_timeout_s: float = Field(300, gt=0)
    """Model swaps (POST /admin/reload, `llmstack reload`): how long the old model may take to finish the requests
    it holds before it is freed anyway (their streams then end with an error)."""


class AuthCfg(Section):
    api_key_env: str = "LLMSTACK_API_KEY"
    """Environment variable holding the API key; when it is set, every route except open_routes needs
    'Authorization: Bearer <key>'. Unset: no key needed. Or set <api_key_env>_FILE to a file holding the key
    (a Docker / Kubernetes secret, e.g. /run/secrets/llmstack_api_key)."""
    keys_file: Optional[str] = None
    """Named API keys (YAML: keys.<name>: {sha256, requests_per_min, tokens_per_min, admin}; `llmstack keys add`
    writes them; only `admin: true` keys may swap the model): every route except open_routes needs one of them; per-key counters in /metrics, per-key limits (429 with
    Retry-After), an audit line per request. Re-read when it changes: a revoked key is refused from then on."""
    audit_log: Optional[str] = None
    """Where the audit lines go (JSONL, appended): time, key name, route, status, tokens, seconds; never the prompt.
    Null: the `llmstack.audit` logger (the server's log)."""
    open_routes: list[str] = ["/livez", "/healthz", "/readyz", "/metrics", "/drift", "/dashboard", "/playground"]
    """Routes reachable without the key (health probes, the Prometheus scrape, the drift JSON, the dashboard page:
    aggregates only, never prompts; the playground page, whose API calls still need the key)."""

    def api_key(self, environ=None) -> str | None:
        """The key from <api_key_env>, else from the file <api_key_env>_FILE names; None when neither is set.
        A named file that is missing or empty is an error (a secret that failed to mount must not open the API)."""
        env = os.environ if environ is None else environ
        if env.get(self.api_key_env):
            return env[self.api_key_env]
        path = env.get(self.api_key_env + "_FILE")
        if not path:
            return None
        try:
            key = open(path, encoding="utf-8").read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the API key file: {e.strerror}", file=path,
                              field=self.api_key_env + "_FILE") from None
        if not key:
            raise ConfigError("the API key file is empty", file=path, field=self.api_key_env + "_FILE",
                              hint="write the key into the file, or unset the variable to serve without a key")
        return key


class VllmCfg(Section):
    python: str = ".venv-vllm/bin/python"
    """Python of the separate vLLM environment (vLLM pins another transformers; see the README)."""
    port: int = Field(8100, ge=1, le=65535)
    """Local port of the supervised vLLM OpenAI server."""
    kv_cache_gib: int = Field(2, ge=1)
    """VLLM_CPU_KVCACHE_SPACE on CPU (GiB)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """vLLM's --gpu-memory-utilization on GPU machines."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM's --tensor-parallel-size: GPUs one model is split across, layer by layer (within a node; fast
    interconnect)."""
    pipeline_parallel_size: int = Field(1, ge=1)
    """vLLM's --pipeline-parallel-size: stages of consecutive layers, one per GPU group (across nodes when a model
    does not fit one node). GPUs used = tensor_parallel_size x pipeline_parallel_size."""
    distributed_executor_backend: Optional[Literal["mp", "ray"]] = None
    """vLLM's --distributed-executor-backend: mp (one node, vLLM's default) or ray (multi-node; start the Ray
    cluster first). Unset: vLLM chooses."""
    startup_timeout_s: int = Field(900, ge=10)
    """How long to wait for vLLM's server to answer /health."""
    extra_args: list[str] = []
    """More vLLM server arguments, passed through."""


class OpenVinoCfg(Section):
    python: str = ".venv-openvino/bin/python"
    """Python of the separate OpenVINO environment (`make openvino-env`; optimum-intel pins other transformers /
    optimum releases than the compression stack). The environment variable LLMSTACK_OPENVINO_PYTHON, when set, runs
    the worker instead (an IR needs only the OpenVINO runtime: the serving images set it); exports still use this."""
    weight_format: Literal["int8", "int4", "fp16", "fp32"] = "int8"
    """Weights of the export made from an HF folder (optimum-intel + NNCF weight compression; int8: asymmetric
    per-channel). An IR folder is served as it is."""
    export_dir: str = "artifacts/serve/openvino"
    """Where exports are kept (one folder per source and weight format, reused while the source is unchanged)."""
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = "auto"
    """Activation precision (OpenVINO's INFERENCE_PRECISION_HINT); auto: bf16 on CPUs with AVX-512 BF16 / AMX, else
    f32. f32 gives transformers' exact greedy tokens."""
    kv_cache_precision: Literal["auto", "u8", "f16", "bf16", "f32"] = "auto"
    """KV cache element type (KV_CACHE_PRECISION); auto: OpenVINO's default for the CPU (u8 on recent releases)."""
    kv_cache_gib: int = Field(1, ge=1)
    """KV cache size (GiB; paged blocks shared by all sequences and the prefix cache)."""
    max_batched_tokens: int = Field(256, ge=16)
    """Per-step token budget: decode tokens plus chunks of arriving prompts (prefill split across steps so it does
    not stall decoding; OpenVINO's dynamic split-fuse)."""
    startup_timeout_s: int = Field(600, ge=10)
    """How long to wait for the worker to load and warm up the model."""


class AdapterCfg(Section):
    name: str
    """The model id that selects this adapter."""
    path: str
    """A PEFT LoRA adapter folder (a training artifact's adapter/)."""








class ServeConfig(Section):
    """The service: what to serve, where, with which limits, key and vLLM settings."""
    model: ModelCfg = ModelCfg()
    """The model and its backend."""
    server: ServerCfg = ServerCfg()
    """Where the service listens, and request defaults."""
    limits: LimitsCfg = LimitsCfg()
    """Request and capacity limits."""
    auth: AuthCfg = AuthCfg()
    """The API key."""
    vllm: VllmCfg = VllmCfg()
    """The supervised vLLM server (backend vllm)."""
    openvino: OpenVinoCfg = OpenVinoCfg()
    """The supervised OpenVINO GenAI worker (backend openvino)."""
    monitoring: MonitoringCfg = MonitoringCfg()
    """Drift detection and the request log."""
    registry: RegistryCfg = RegistryCfg()
    """The MLflow model registry: what is served is registered and aliased (`models:/<name>@<alias>` serves it)."""
    adapters: list[AdapterCfg] = []
    """Multi-LoRA: adapters on the served base, each chosen by the request's model name (transformers: peft
    mixed-adapter batches; vllm: --lora-modules). The base must be the HF model the adapters were trained on."""
