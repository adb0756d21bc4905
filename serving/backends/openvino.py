"""OpenVINO GenAI backend: the service supervises a worker process (runtimes/openvino/worker.py) that runs in
OpenVINO's own environment (`make openvino-env`: optimum-intel pins transformers / optimum releases the compression
stack cannot use) and drives `openvino_genai.ContinuousBatchingPipeline`. The service never imports openvino.

The worker hands back token ids; the service turns them into text, stop sequences, finish reasons and metrics with
the same `TokenStream` as our own engine, so both backends answer alike. Sampling (greedy, temperature, top_p, seed)
runs in OpenVINO. The model: an OpenVINO IR folder, or an HF folder (a training artifact's merged model) that is
exported once with optimum-intel into `openvino.export_dir` with `openvino.weight_format` (NNCF weight compression)
and reused while the source is unchanged.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from core.errors import StackError
from runtimes.openvino import WorkerProcess, check_python, exit_status, export_ir, is_ir, worker_command

from ..requests import Overloaded, Params, Request
from ..token_stream import TokenStream

log = logging.getLogger(__name__)


def _source_key(folder: Path, weight_format: str) -> str:
    """What the export depends on: the source folder's path, its files' sizes and times, the weight format."""
    h = hashlib.sha256(f"{folder.resolve()}|{weight_format}".encode())
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def prepare(cfg, folder: Path) -> Path:
    """The OpenVINO IR folder to serve: `folder` itself when it is one, else its export (built once, atomically)."""
    if is_ir(folder):
        return folder
    fmt = cfg.openvino.weight_format
    out = Path(cfg.openvino.export_dir) / f"{folder.name}-{fmt}-{_source_key(folder, fmt)}"
    if is_ir(out):
        log.info(f"OpenVINO: reusing the export {out}")
        return out
    python = check_python(cfg.openvino.python, "openvino.python")
    log.info(f"OpenVINO: exporting {folder} ({fmt} weights) with optimum-intel")
    seconds = export_ir(python, folder, out, fmt)
    log.info(f"OpenVINO: exported in {seconds:.0f} s to {out}")
    return out


RUNTIME_PYTHON_ENV = "LLMSTACK_OPENVINO_PYTHON"  # the serving images' runtime-only environment (no optimum-intel)


def command(cfg, folder: Path) -> list[str]:
    """The worker's command line for the IR in `folder`; its Python is $LLMSTACK_OPENVINO_PYTHON when set (it runs
    an IR with the OpenVINO runtime alone), else openvino.python."""
    o, lim = cfg.openvino, cfg.limits
    python = (check_python(os.environ[RUNTIME_PYTHON_ENV], RUNTIME_PYTHON_ENV) if os.environ.get(RUNTIME_PYTHON_ENV)
              else check_python(o.python, "openvino.python"))
    return worker_command(python, folder, max_running=lim.max_running,
                          batched_tokens=o.max_batched_tokens, cache_gib=o.kv_cache_gib,
                          prefix_caching=lim.prefix_cache_mb > 0, threads=cfg.model.threads,
                          inference_precision=o.inference_precision, kv_cache_precision=o.kv_cache_precision)


class OpenVinoGenerator:
    """The API's `Generator` over a supervised OpenVINO GenAI worker."""

    def __init__(self, cfg, folder: Path, tokenizer, eos_ids: set[int], metrics=None):
        self.cfg, self.metrics = cfg, metrics
        self.worker = WorkerProcess(command(cfg, prepare(cfg, folder)), self._on_message, self._on_exit)
        self.out = TokenStream(tokenizer, eos_ids, metrics)
        self.ready = False
        self.reqs: dict[int, Request] = {}
        self._ids = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "OpenVinoGenerator":
        log.info("starting the OpenVINO GenAI worker: %s", " ".join(self.worker.cmd))
        self.worker.start(self.cfg.openvino.startup_timeout_s)
        self.ready = True
        return self

    def stop(self) -> None:
        self.ready = False
        self.worker.stop()

    # ------------------------------------------------------------ requests
    def _report_load(self) -> None:
        """The worker runs at most max_running sequences; the requests in flight beyond that wait in its queue."""
        if self.metrics:
            cap, n = self.cfg.limits.max_running, len(self.reqs)
            self.metrics.load(min(n, cap), max(0, n - cap))

    def _submit(self, req: Request) -> int:
        lim = self.cfg.limits
        with self._lock:
            if len(self.reqs) >= lim.max_running + lim.max_waiting:
                raise Overloaded(f"{len(self.reqs)} requests in flight (limit {lim.max_running + lim.max_waiting})")
            self._ids += 1
            wid = self._ids
            self.reqs[wid] = req
        req.started = time.perf_counter()  # the worker queues internally: queue time is what the service adds
        if self.metrics:
            self.metrics.queue_time(req)
        p = req.params
        self.worker.send({"op": "add", "id": wid, "ids": req.prompt_ids, "max_tokens": p.max_tokens,
                    "temperature": p.temperature, "top_p": p.top_p, "seed": p.seed, "ignore_eos": p.ignore_eos})
        self._report_load()
        return wid

    def _done(self, wid: int) -> None:
        """The request's stream is over: forget it, and stop its sequence in the worker when the worker has not
        finished it (a stop sequence, max_tokens seen first here, or the client gone)."""
        with self._lock:
            running = self.reqs.pop(wid, None) is not None
        if running and self.ready:
            try:
                self.worker.send({"op": "cancel", "id": wid})
            except OSError:  # the worker is gone; the reader reports it
                pass
        self._report_load()

    async def stream(self, rid: str, prompt_ids: list[int], params: Params, adapter: str = ""):
        if not self.ready:
            raise StackError("the OpenVINO GenAI worker is not running", field="model.backend")
        req = Request(rid, prompt_ids, params, asyncio.get_running_loop(), {})
        wid = self._submit(req)  # Overloaded propagates to the caller's first anext()
        finished = False
        try:
            while True:
                ev = await req.events.get()
                yield ev
                if ev.finish is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the client went away: count it once, stop the worker's sequence
                self.out.finish(req, "abort")
            self._done(wid)

    # ------------------------------------------------------------ the worker's output (its reader thread)
    def _on_message(self, msg: dict) -> None:
        wid = msg.get("id")
        req = self.reqs.get(wid)
        if req is None:
            return
        if "error" in msg or msg["finish"]:
            with self._lock:  # the worker is done with it: nothing to cancel
                self.reqs.pop(wid, None)
        if req.finish is not None:
            return
        if "error" in msg:
            self.out.finish(req, "abort", error=f"OpenVINO GenAI: {msg['error']}")
            return
        for tok, lp in zip(msg["tokens"], msg["logprobs"] or [0.0] * len(msg["tokens"])):
            if self.out.accept(req, tok, lp):
                break  # EOS, a stop sequence or max_tokens: the service's verdict
        if msg["finish"]:
            self.out.finish(req, msg["finish"], flush=True)

    def _on_exit(self, code: int) -> None:
        self.ready = False
        log.error(f"the OpenVINO GenAI worker exited with {exit_status(code)}")
        for req in list(self.reqs.values()):
            self.out.finish(req, "abort", error=f"the OpenVINO GenAI worker exited with {exit_status(code)}")
