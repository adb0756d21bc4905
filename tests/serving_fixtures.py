"""Helpers shared by the serving tests: configs and API states over a model folder, metric samples, and reading a
generator's stream to the end."""
from __future__ import annotations

from serving.config import ServeConfig
from serving.engine import EngineGenerator, Params


def serve_cfg(path, **sections) -> ServeConfig:
    data = {"model": {"path": str(path), "threads": 1}}
    for k, v in sections.items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:  # a list section (adapters)
            data[k] = v
    return ServeConfig.model_validate(data)


def make_state(path, backend: str = "auto", **sections):
    from prometheus_client import CollectorRegistry

    from serving.runtime import build_state
    cfg = serve_cfg(path, **sections)
    cfg.model.backend = backend
    registry = CollectorRegistry()
    state, ref = build_state(cfg, registry=registry)
    state.registry = registry
    return state


def sample_value(registry, name: str, **labels) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def collect(gen: EngineGenerator, ids: list[int], params: Params, adapter: str = "") -> tuple[str, str, int]:
    text, finish, n = "", None, 0
    async for ev in gen.stream("t", ids, params, adapter):
        text += ev.text
        finish, n = ev.finish, ev.completion_tokens
    return text, finish, n
