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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, overrides=(), log_path=None, timeout: float = 180, **env):
    """`llmstack serve` on the tiny model the way users start it, in its own process group; returns (process, base
    URL, log path) once /readyz answers 200, or fails the test with the log's tail."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    import httpx
    import pytest

    from conftest import PY, ROOT, cli_env

    port = free_port()
    log_path = log_path or tempfile.mkstemp(prefix="serve-", suffix=".log")[1]
    cmd = [PY, "-m", "llmstack", "serve", "--model", str(model_dir), "--port", str(port), "model.threads=1",
           "model.name=tiny", *overrides]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base, log_path
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    with open(log_path) as f:
        pytest.fail(f"server did not become ready; log:\n{f.read()[-3000:]}")


def stop_server(proc, timeout: float = 30) -> bool:
    """SIGTERM the server's process group; True when it stopped in time (else it is killed)."""
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return False


def metric_sum(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples in Prometheus text (/metrics) over the label sets matching `labels`."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())) or \
                (not labels and line.startswith(name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def chat_rows(path, n=None) -> list[list[dict]]:
    """Chat messages of a JSONL file: chat rows as they are, instruction rows as training renders them."""
    from conftest import read_jsonl
    return [r["messages"] if "messages" in r else [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}]
            for r in read_jsonl(path)[:n]]


def tiny_drift_reference(model_dir, tokenizer, folder, n: int = 60, max_tokens: int = 6):
    """A drift reference for a model as training makes one: the train split's prompts fit the basis, the validation
    prompts are the rows, and the answers are the model's own to `n` validation prompts, measured in-process through
    the service's monitor (drift off: no reference yet). Returns the saved file."""
    from fastapi.testclient import TestClient

    from conftest import ROOT
    from monitoring import drift
    from serving.api import build_app
    from serving.runtime import close_state

    tickets = ROOT / "data" / "tickets"
    st = make_state(model_dir, monitoring={"drift": {"window": 500}})
    assert not st.monitor.enabled and "no drift_reference.json" in st.monitor.snapshot()["reason"]
    val = chat_rows(tickets / "validation.jsonl")
    with TestClient(build_app(st)) as c:
        for msgs in val[:n]:
            r = c.post("/v1/chat/completions", json={"model": st.model_name, "messages": msgs,
                                                     "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 200, r.text
    st.monitor.flush()
    outputs = [{"n_tokens": r["output_tokens"], "finish": r["finish_reason"],
                "logprob_sum": None if r["output_logprob_mean"] is None else r["output_logprob_mean"] * r["output_tokens"]}
               for r in st.monitor.window]
    close_state(st)
    assert len(outputs) == n
    fit = [drift.chat_prompt(tokenizer, m) for m in chat_rows(tickets / "train.jsonl")]
    return drift.build_reference(fit, [drift.chat_prompt(tokenizer, m) for m in val], outputs).save(folder)
