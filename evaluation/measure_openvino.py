"""Measure an OpenVINO variant like every other (evaluation/measure.py), through the OpenVINO GenAI worker in its
own environment (runtimes/openvino): the worker's peak RAM after loading, time to the first token for the fixed
prompt, decode tokens/s at batch 1 and at `measure.batch` requests at once from the arrival times of forced tokens, and the task metric on greedy
generations of the test rows (all submitted at once: the pipeline batches them; evaluation.measure decodes and
scores them like every other variant's). OpenVINO GenAI does not expose logits, so there is no answer perplexity
(reported as "-")."""
from __future__ import annotations

import queue
import statistics
import time

from core.errors import CompressError
from runtimes.openvino import WorkerProcess, check_python, exit_status, worker_command


class _Runner:
    """Blocking requests to a worker: each request's messages land in its own queue with their arrival time."""

    def __init__(self, cmd: list[str]):
        self.queues: dict[int, queue.Queue] = {}
        self.ids = 0
        self.worker = WorkerProcess(cmd, self._on_message, self._on_exit, field="variants")

    def _on_message(self, msg: dict) -> None:
        q = self.queues.get(msg.get("id"))
        if q is not None:
            q.put((time.perf_counter(), msg))

    def _on_exit(self, code: int) -> None:
        for q in self.queues.values():
            q.put((time.perf_counter(), {"error": f"the OpenVINO GenAI worker exited with {exit_status(code)}"}))

    def submit(self, ids: list[int], max_tokens: int, ignore_eos: bool = False) -> int:
        self.ids += 1
        self.queues[self.ids] = queue.Queue()
        self.worker.send({"op": "add", "id": self.ids, "ids": ids, "max_tokens": max_tokens, "temperature": 0.0,
                          "ignore_eos": ignore_eos})
        return self.ids

    def collect(self, wid: int) -> tuple[list[int], list[float]]:
        """The request's tokens and the arrival time of each, once it has finished."""
        tokens, stamps = [], []
        while True:
            at, msg = self.queues[wid].get(timeout=600)
            if "error" in msg:
                raise CompressError(f"OpenVINO GenAI: {msg['error']}")
            tokens += msg["tokens"]
            stamps += [at] * len(msg["tokens"])
            if msg["finish"]:
                del self.queues[wid]
                return tokens, stamps


def _batch_rate(run: _Runner, prompt: list[int], decode_tokens: int, batch: int) -> float:
    """Decode tokens/s of `batch` copies of the prompt submitted at once: the tokens that arrived after every request
    had its first one, over the time from then to the last."""
    stamps = [run.collect(w)[1] for w in [run.submit(prompt, decode_tokens, ignore_eos=True) for _ in range(batch)]]
    start, end = max(s[0] for s in stamps), max(s[-1] for s in stamps)
    return sum(t > start for s in stamps for t in s) / max(end - start, 1e-9)


def _speed(run: _Runner, prompt: list[int], decode_tokens: int, runs: int, batch: int) -> dict:
    run.collect(run.submit(prompt, 8, ignore_eos=True))  # warm-up
    first = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run.collect(run.submit(prompt, 1, ignore_eos=True))
        first.append(time.perf_counter() - t0)
    rates = []
    for _ in range(runs):
        _, stamps = run.collect(run.submit(prompt, decode_tokens, ignore_eos=True))
        rates.append((len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9))
    median = statistics.median(rates)
    out = {"prefill_ms": round(1000 * statistics.median(first), 1), "prompt_tokens": len(prompt),
           "decode_tokens_per_s": round(median, 1),
           "decode_spread": round((max(rates) - min(rates)) / 2 / median, 3) if runs > 1 else None, "runs": runs}
    if batch > 1:
        _batch_rate(run, prompt, 8, batch)  # warm-up at this batch
        rate = statistics.median(_batch_rate(run, prompt, decode_tokens, batch) for _ in range(min(runs, 2)))
        out.update(batch=batch, batch_decode_tokens_per_s=round(rate, 1))
    return out


def measure_openvino(spec: dict) -> dict:
    """The measurements of the OpenVINO variant described by `spec` (see evaluation.measure.measure_in_child), with
    the generated token ids of every test row under "generated_ids"."""
    python = check_python(spec["openvino_python"], "openvino.python")
    slots = max(spec["batch_size"], spec.get("batch", 0))
    cmd = worker_command(python, spec["folder"], max_running=slots, threads=spec["threads"],
                         batched_tokens=max(256, slots), prefix_caching=False,
                         inference_precision=spec["openvino_precision"])  # the same prompt is
    # timed several times: a prefix cache would turn its prefill into a lookup
    run = _Runner(cmd)
    t0 = time.perf_counter()
    run.worker.start(600)
    try:
        out = {"load_seconds": round(time.perf_counter() - t0, 2), "load_peak_rss_mb": run.worker.peak_rss_mb(),
               "load_rss_delta_mb": run.worker.peak_rss_mb()}
        rows = spec["rows"]
        t1 = time.perf_counter()
        out.update(_speed(run, rows[0]["prompt_ids"], spec["decode_tokens"], spec["runs"], spec.get("batch", 0)))
        out["generate_seconds"] = None
        out["seconds"] = {"load": out["load_seconds"], "speed": round(time.perf_counter() - t1, 1)}
        if not spec.get("quality", True):
            out["peak_rss_mb"] = run.worker.peak_rss_mb()
            return out
        t2 = time.perf_counter()
        wids = [run.submit(r["prompt_ids"], spec["max_new_tokens"]) for r in rows]
        out.update({"loss": None, "perplexity": None, "answer_tokens": None,
                    "generated_ids": [run.collect(w)[0] for w in wids], "peak_rss_mb": run.worker.peak_rss_mb()})
        out["seconds"]["generation"] = round(time.perf_counter() - t2, 1)
        return out
    finally:
        run.worker.stop()
