"""Zero-downtime model swaps: POST /admin/reload (what `llmstack reload` and `llmstack retrain --promote` call).

The new model is loaded and warmed beside the served one (in a thread: the old one keeps answering meanwhile), then
new requests go to it; the requests the old one holds finish on it, and it is freed once none is left (or after
limits.drain_timeout_s). A load that fails leaves the old model serving and answers the error. Every request holds
one model from start to end (serving/api.py `_leased`), and its response names that model.

Clients keep using the name they know: the first model's id stays an alias of whatever is served; responses and
/v1/models name the model itself (a swapped-in model gets an id no earlier model had). The drift monitor carries
over, re-based on the new model's reference; the request log goes on (each row names its model).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Literal, Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from core.errors import StackError

from . import openai_schema as oa
from .runtime import build_state, close_state

log = logging.getLogger(__name__)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    """What to serve next, a path on the server as model.path takes it: a compress run (its recommended variant), a
    variant folder, a training artifact or an HF / ONNX folder."""
    name: Optional[str] = None
    """The new model's id (default: from its artifact, made unique)."""
    backend: Literal["auto", "onnxruntime", "transformers", "vllm", "openvino"] = "auto"
    file_name: Optional[str] = None


class Swapper:
    """One swap at a time; the history of swaps for the log and the reply."""

    def __init__(self, app, cfg, registry=None):
        self.app, self.cfg, self.registry = app, cfg, registry
        self.busy = False
        self.ids: list[str] = []  # every model id this service has served: a new one must differ
        self.history: list[dict] = []

    async def reload(self, req: ReloadRequest) -> dict:
        if self.busy:
            raise oa.APIError(409, "a model swap is in progress; retry when it is done", code="swap_in_progress")
        self.busy = True
        try:
            return await self._swap(req)
        finally:
            self.busy = False

    async def _swap(self, req: ReloadRequest) -> dict:
        old = self.app.state.llm
        if old is None:
            raise oa.APIError(503, "the first model is still loading", type="server_error", code="not_ready")
        self.ids = self.ids or [old.model_name]
        cfg = self._config(req)
        t0 = time.perf_counter()
        try:
            new, ref = await asyncio.to_thread(build_state, cfg, self.registry, old.monitor, old.alias,
                                               tuple(self.ids))
        except StackError as exc:
            raise oa.APIError(400, f"model: {exc}; still serving '{old.model_name}'", param="model",
                              code="load_failed") from None
        except Exception as exc:  # noqa: BLE001 - any load failure leaves the old model serving
            log.exception("loading the new model failed")
            raise oa.APIError(500, f"loading the new model failed ({type(exc).__name__}: {exc}); still serving "
                              f"'{old.model_name}'", type="server_error", code="load_failed") from None
        loaded = time.perf_counter() - t0
        self.app.state.llm = new  # from here on, new requests take the new model
        self.ids.append(new.model_name)
        t1 = time.perf_counter()
        held = old.inflight
        drained = await self._drain(old)
        await asyncio.to_thread(close_state, old, True)
        if old.metrics is not None:
            old.metrics.retire()
        record = {"model": new.model_name, "previous": old.model_name, "alias": new.alias, "path": str(ref.folder),
                  "backend": ref.backend, "lineage": ref.lineage, "load_seconds": round(loaded, 2),
                  "drain_seconds": round(time.perf_counter() - t1, 2), "requests_held_by_previous": held,
                  "drained": drained}
        self.history.append(record)
        log.info(f"model swapped: '{old.model_name}' -> '{new.model_name}' ({ref.folder}, {ref.backend}); loaded in "
                 f"{loaded:.1f} s, the previous model finished its {held} requests"
                 f"{'' if drained else ' only in part: drain timeout'}")
        return record

    def _config(self, req: ReloadRequest):
        cfg = self.cfg.model_copy(deep=True)
        cfg.model.path, cfg.model.name, cfg.model.backend = req.model, req.name, req.backend
        cfg.model.file_name = req.file_name
        cfg.vllm.port = _free_port()  # a supervised vLLM server runs beside the old one until the swap is done
        return cfg

    async def _drain(self, old) -> bool:
        deadline = time.monotonic() + self.cfg.limits.drain_timeout_s
        while old.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return old.inflight <= 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def reload_route(request: Request, req: ReloadRequest) -> dict:
    swapper = getattr(request.app.state, "swapper", None)
    if swapper is None:
        raise oa.APIError(501, "this server cannot swap models (start it with `llmstack serve`)", code="no_swap")
    return await swapper.reload(req)
