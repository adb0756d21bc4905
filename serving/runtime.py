"""Build the serving state from a config: resolve the artifact, load the tokenizer and the backend, start the engine.
Used by the BentoML service, the in-process tests and the benchmark alike."""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from core.errors import ConfigError
from monitoring.live import build as build_monitor

from .api import State
from .bundle import bundled
from .config import ServeConfig
from .model_ref import ModelRef, gpu_available, resolve

log = logging.getLogger(__name__)

CONFIG_ENV = "LLMSTACK_SERVE_CONFIG"  # a resolved config (JSON) handed from `llmstack serve` to the BentoML worker
DEFAULT_CONFIG = "configs/serve.yaml"


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> ServeConfig:
    from core.config import load

    if path is None and os.environ.get(CONFIG_ENV):
        return ServeConfig.model_validate(json.loads(Path(os.environ[CONFIG_ENV]).read_text()))
    path = path or DEFAULT_CONFIG
    if not Path(path).is_file() and not overrides and path == DEFAULT_CONFIG:
        return ServeConfig()
    return load(ServeConfig, path, list(overrides))


def _eos_ids(folder: Path, tokenizer) -> set[int]:
    ids = set()
    gen = folder / "generation_config.json"
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _context(folder: Path) -> int:
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return int(cfg.get("max_position_embeddings") or 2048)


def _vllm_sees_gpu(python: str) -> bool:
    """Whether vLLM's own environment sees a GPU. The stack's torch may be the CPU build while vLLM's is CUDA (the
    GPU image, deploy/docker/serve-gpu.Dockerfile, keeps one CUDA torch, vLLM's): ask the Python that runs vLLM."""
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                             text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("True")


def build_state(cfg: ServeConfig, registry=None, monitor=None, alias: str | None = None,
                taken: tuple[str, ...] = ()) -> tuple[State, ModelRef]:
    """Load and warm the model of cfg.model. A swap (serving/swap.py) passes the running service's monitor (re-based
    on the new model's drift reference), its alias and the model ids already used (the new id must differ)."""
    from transformers import AutoTokenizer

    from .engine import Engine, EngineGenerator
    from .metrics import Metrics

    ref = resolve(cfg.model.path, cfg.model.backend, cfg.model.name, cfg.model.file_name)
    bundle = bundled(ref.folder)  # a model imported by `llmstack bento`: served as `llmstack serve` named it
    if bundle:
        ref.lineage = bundle.get("lineage") or ref.lineage
        ref.name = cfg.model.name or bundle.get("name") or ref.name
    ref.name = _unique(ref.name, ref.lineage, taken)
    adapters = {a.name: a.path for a in cfg.adapters}
    if adapters and ref.backend in ("onnxruntime", "openvino"):
        raise ConfigError(f"LoRA adapters need an HF base model on the transformers or vllm backend; "
                          f"{ref.backend} serves merged models", field="adapters", hint="serve a merged variant instead, or set "
                          "model.path to the base model folder and model.backend to transformers/vllm")
    for a in cfg.adapters:
        if not (Path(a.path) / "adapter_config.json").is_file():
            raise ConfigError(f"adapter '{a.name}': no adapter_config.json in {a.path}", field="adapters")
        if a.name == ref.name:
            raise ConfigError(f"adapter name '{a.name}' is the served model's name", field="adapters")
    tok = AutoTokenizer.from_pretrained(str(ref.folder), trust_remote_code=False)
    info = {"backend_format": ref.backend, "stage": ref.lineage.get("stage") or "", "run_id":
            ref.lineage.get("run_id") or "", "variant": ref.lineage.get("variant") or ""}
    metrics = Metrics(ref.name, ref.backend, info=info, registry=registry)
    lim = cfg.limits
    if ref.backend == "vllm":
        from .backends.vllm import VllmGenerator
        gen = VllmGenerator(cfg, ref.folder, ref.name, adapters, gpu_available() or _vllm_sees_gpu(cfg.vllm.python),
                            metrics, _context(ref.folder)).start()
    elif ref.backend == "openvino":
        from .backends.openvino import OpenVinoGenerator
        gen = OpenVinoGenerator(cfg, ref.folder, tok, _eos_ids(ref.folder, tok), metrics).start()
    else:
        if ref.backend == "onnxruntime":
            from .backends.onnx import OnnxBackend
            backend = OnnxBackend(ref.folder, ref.file_name or "model.onnx", cfg.model.threads)
        else:
            from .backends.hf import HFBackend
            backend = HFBackend(ref.folder, cfg.model.threads, adapters=adapters)
        engine = Engine(backend, tok, _eos_ids(ref.folder, tok), max_running=lim.max_running,
                        max_waiting=lim.max_waiting, metrics=metrics, prefix_cache_mb=lim.prefix_cache_mb)
        gen = EngineGenerator(engine.start())
    log.info(f"serving {ref.folder} as '{ref.name}' on {ref.backend}")
    state = State(cfg, gen, tok, ref.name, _context(ref.folder), metrics, list(adapters), ref.lineage, alias)
    state.backend = ref.backend
    if monitor is not None:
        monitor.rebase(ref.folder)
    state.monitor = monitor if monitor is not None else build_monitor(cfg.monitoring, ref.folder, registry=registry)
    return state, ref


def _unique(name: str, lineage: dict, taken: tuple[str, ...]) -> str:
    """A model id no earlier model of this service had: responses name the model that answered, so two models must
    not share one (two compress runs both call their variant onnx-fp32): then the run id is added."""
    if name not in taken:
        return name
    for candidate in (f"{name}@{lineage.get('run_id')}" if lineage.get("run_id") else None,
                      *(f"{name}#{i}" for i in range(2, 10000))):
        if candidate and candidate not in taken:
            return candidate
    raise ConfigError(f"no free model id for '{name}'", field="model.name")


def close_state(state: State, keep_monitor: bool = False) -> None:
    if state.monitor is not None and not keep_monitor:
        state.monitor.close()
    gen = state.gen
    if hasattr(gen, "engine"):
        gen.engine.stop()
    elif hasattr(gen, "stop"):
        gen.stop()
