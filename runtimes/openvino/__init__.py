"""OpenVINO GenAI, used from the project's own environment: OpenVINO and optimum-intel live in a separate one
(`make openvino-env`, .venv-openvino; optimum-intel pins transformers / optimum releases the compression stack cannot
use), so nothing here imports openvino. `export_ir` runs optimum-intel's exporter there; `WorkerProcess` starts and
talks to `worker.py` (the continuous-batching pipeline) there. Shared by serving (model.backend=openvino) and
compression (OpenVINO variants, measured like every other variant); imports no stage.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from core.errors import ConfigError, StackError

WORKER = Path(__file__).with_name("worker.py")
IR_FILE = "openvino_model.xml"
WEIGHT_FORMATS = ("int8", "int4", "fp16", "fp32")


def check_python(python: str, field: str) -> str:
    """`python` when it exists, else a ConfigError naming the config field and the make target that installs it."""
    if not Path(python).exists():
        raise ConfigError(f"no OpenVINO environment: {python} does not exist", field=field,
                          hint="run `make openvino-env`, or point it at a Python with openvino-genai and "
                          "optimum-intel")
    return python


def is_ir(folder: Path) -> bool:
    return (Path(folder) / IR_FILE).is_file()


def export_ir(python: str, source: Path, out: Path, weight_format: str, field: str = "openvino.weight_format") -> float:
    """Export the HF model folder `source` to an OpenVINO IR folder `out` (text generation with KV cache, weights
    compressed to `weight_format` by NNCF), atomically: a temporary folder renamed at the end, nothing left behind on
    failure. Returns the seconds it took."""
    if weight_format not in WEIGHT_FORMATS:
        raise ConfigError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}", field=field)
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(source), "--task",
           "text-generation-with-past", "--weight-format", weight_format, str(tmp)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not is_ir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise StackError(f"optimum-intel could not export {source} to OpenVINO: {' | '.join(tail)}", file=source,
                         field=field)
    _keep_source_tokenizer(Path(source), tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return time.perf_counter() - t0


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _keep_source_tokenizer(source: Path, ir: Path) -> None:
    """The exporter rewrites the tokenizer files with its own transformers release, whose tokenizer_config.json
    the project's transformers cannot read; the source's files describe the same tokenizer (OpenVINO itself uses
    openvino_tokenizer.xml), so the IR folder keeps those and stays loadable from both environments."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, ir / name)


def worker_command(python: str, folder: Path, *, max_running: int = 16, batched_tokens: int = 256,
                   cache_gib: int = 1, prefix_caching: bool = True, threads: int = 0,
                   inference_precision: str = "auto", kv_cache_precision: str = "auto") -> list[str]:
    """The worker's command line for the IR in `folder` (see worker.py --help)."""
    return [python, str(WORKER), "--model", str(folder), "--max-running", str(max_running), "--batched-tokens",
            str(batched_tokens), "--cache-gib", str(cache_gib), "--prefix-caching", str(int(prefix_caching)),
            "--threads", str(threads), "--inference-precision", inference_precision,
            "--kv-cache-precision", kv_cache_precision]


def exit_status(code: int | None) -> str:
    """'code 1', or the signal that killed the process ('signal SIGFPE')."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"code {code}"


class WorkerProcess:
    """A running worker: `send` requests, every message it writes goes to `on_message` (from a reader thread), and
    `on_exit(code)` runs once if it exits while not being stopped."""

    def __init__(self, cmd: list[str], on_message: Callable[[dict], None],
                 on_exit: Callable[[int], None] | None = None, field: str = "model.backend"):
        self.cmd, self.on_message, self.on_exit, self.field = cmd, on_message, on_exit, field
        self.proc: subprocess.Popen | None = None
        self.hello: dict = {}
        self.stopping = False
        self._lock = threading.Lock()

    def start(self, timeout_s: float) -> "WorkerProcess":
        """Start the worker and wait until it has loaded and warmed up the model; StackError if it does not."""
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        self.hello = json.loads(first[0]) if first and first[0].strip() else {}
        if not self.hello.get("ready"):
            self.stop()
            why = self.hello.get("fatal") or (f"no answer within {timeout_s:g} s" if not first
                                              else f"it exited with {exit_status(self.proc.poll())}")
            raise StackError(f"the OpenVINO GenAI worker did not start: {why}", field=self.field)
        threading.Thread(target=self._read, name="openvino-reader", daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, msg: dict) -> None:
        with self._lock:
            self.proc.stdin.write(json.dumps(msg, separators=(",", ":")) + "\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        self.stopping = True
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the worker exits when its input ends
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)

    def peak_rss_mb(self) -> float | None:
        """The worker's peak resident memory (VmHWM), while it runs."""
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.on_message(json.loads(line))
        code = self.proc.wait()
        if not self.stopping and self.on_exit:
            self.on_exit(code)
