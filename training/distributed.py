"""Several training processes (torchrun / accelerate launch): who is who, and the few collectives `sft.run` needs.

`llmstack train` runs unchanged under `torchrun --nproc_per_node N -m llmstack train ...` and
`accelerate launch -m llmstack train ...`: every process runs `sft.run`; rank 0 decides what the others must agree
on (the run id, whether the run is already built, the checkpoint to resume) and broadcasts it; only rank 0
evaluates, merges and writes files. The HF Trainer (through accelerate) shards the batches and synchronises the
gradients. One process (no WORLD_SIZE > 1 in the environment): nothing here does anything.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from core.errors import StackError
from core.log import log

# what the Trainer uses as ddp_timeout by default: how long a rank waits in a collective (e.g. for rank 0's
# before-training evaluation) before it gives up
TIMEOUT_S = 1800


# `accelerate launch` passes its config's mixed_precision in the environment; read before any TrainingArguments of
# this process rewrites the variable
LAUNCHER_MIXED_PRECISION = os.environ.get("ACCELERATE_MIXED_PRECISION")


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class Dist:
    """This process's place among the training processes (world_size 1: a plain single-process run)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled)."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and return its result on every rank. An exception on rank 0 stops every rank: rank 0
        raises it, the others raise a StackError with its message (the CLI prints it and exits with code 2)."""
        if not self.enabled:
            return fn()
        if self.main:
            try:
                result = ("ok", fn())
            except BaseException as exc:
                self.broadcast(("error", str(exc) if isinstance(exc, StackError) else f"{type(exc).__name__}: {exc}"))
                raise
            return self.broadcast(result)[1]
        status, value = self.broadcast(None)
        if status == "error":
            raise StackError(f"rank 0 stopped the run: {value}")
        return value

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, value: float | int) -> float | int:
        """The sum of `value` over all ranks (every rank must call it)."""
        if not self.enabled:
            return value
        t = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.long, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item()

    def close(self) -> None:
        """Leave the process group (the last call of a run: no collective may follow)."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def info(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


def setup(backend: str | None = None) -> Dist:
    """Join the process group the launcher set up, initialising it the way the HF Trainer would (accelerate's
    PartialState: gloo on CPU, nccl on CUDA GPUs, or `backend`) but earlier, so rank 0 can share its decisions before
    the Trainer exists; the Trainer then finds the group initialised and uses it. Non-zero ranks log warnings only."""
    world = launched_world_size()
    if world <= 1:
        return Dist()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()  # what sft_trainer._training_args passes as use_cpu
    kwargs: dict[str, Any] = {"cpu": True, "backend": backend} if cpu else {
        "backend": backend, "timeout": timedelta(seconds=TIMEOUT_S)}
    state = PartialState(**kwargs)
    if not torch.distributed.is_initialized():  # a launcher the state did not recognise
        raise StackError(f"WORLD_SIZE={world} but no process group could be initialised",
                         hint="launch with torchrun or accelerate launch")
    d = Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
             local_rank=int(os.environ.get("LOCAL_RANK", "0")),
             local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or state.num_processes,
             backend=str(torch.distributed.get_backend()), device=str(state.device))
    if not d.main:
        log.setLevel(logging.WARNING)
    log.info(f"distributed: {d.world_size} processes, backend {d.backend}, this is rank {d.rank}")
    return d
