"""The OpenVINO GenAI worker: runs in OpenVINO's own environment (`make openvino-env`, .venv-openvino), started by
path and supervised through `runtimes.openvino.WorkerProcess` (by the service's openvino backend and by compression's
measurement of OpenVINO variants). It imports nothing from this project: only the standard library, numpy and
openvino_genai.

It drives `openvino_genai.ContinuousBatchingPipeline` (paged attention, continuous batching, prefix caching, prefill
split across steps under a per-step token budget) one `step()` at a time and talks JSON lines over its pipes:

  stdin  {"op": "add", "id": 7, "ids": [...], "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": null,
          "ignore_eos": false}
         {"op": "cancel", "id": 7}
  stdout {"ready": true, "eos": [2], "device": "CPU"}                       once, after loading and a warm-up
         {"id": 7, "tokens": [...], "logprobs": [...], "finish": null}       new tokens after a step
         {"id": 7, "tokens": [], "logprobs": [], "finish": "stop"}           the end ("stop", "length", "abort")
         {"id": 7, "error": "..."}                                           a request the pipeline refused
         {"fatal": "..."}                                                    the worker cannot go on (then exits 1)

    python worker.py --model DIR [--max-running 16] [--batched-tokens 256] [--cache-gib 1] ...
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import threading

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder's modules must not shadow installed packages (openvino, ...)

FINISH = {"STOP": "stop", "LENGTH": "length", "NONE": None}


def send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")


def read_stdin(inbox: queue.Queue) -> None:
    for line in sys.stdin:
        if line.strip():
            inbox.put(json.loads(line))
    inbox.put({"op": "exit"})  # the service closed the pipe: it is gone or stopping us


def pipeline(args):
    import openvino_genai as ov_genai

    sc = ov_genai.SchedulerConfig()
    sc.max_num_seqs = args.max_running
    sc.max_num_batched_tokens = args.batched_tokens
    sc.dynamic_split_fuse = True
    sc.enable_prefix_caching = args.prefix_caching
    sc.cache_size = args.cache_gib
    props = {}
    if args.threads:
        props["INFERENCE_NUM_THREADS"] = args.threads
    if args.inference_precision != "auto":
        props["INFERENCE_PRECISION_HINT"] = args.inference_precision
    if args.kv_cache_precision != "auto":
        props["KV_CACHE_PRECISION"] = args.kv_cache_precision
    return ov_genai.ContinuousBatchingPipeline(args.model, sc, "CPU", props)


def generation_config(pipe, msg: dict):
    gc = pipe.get_config()  # the model's generation_config.json: its EOS ids
    gc.max_new_tokens = int(msg["max_tokens"])
    gc.ignore_eos = bool(msg.get("ignore_eos"))
    gc.logprobs = 1  # the generated tokens' log-probabilities, for drift monitoring
    temperature = float(msg.get("temperature") or 0.0)
    gc.do_sample = temperature > 0
    if gc.do_sample:
        gc.temperature = temperature
        gc.top_p = float(msg.get("top_p") or 1.0)
        seed = msg.get("seed")
        gc.rng_seed = random.getrandbits(63) if seed is None else int(seed) % (1 << 63)
    return gc


class Worker:
    def __init__(self, pipe):
        self.pipe = pipe
        self.handles: dict[int, object] = {}

    def add(self, msg: dict) -> None:
        import numpy as np
        import openvino as ov

        rid = int(msg["id"])
        try:
            ids = ov.Tensor(np.asarray([msg["ids"]], dtype=np.int64))
            self.handles[rid] = self.pipe.add_request(rid, ids, generation_config(self.pipe, msg))
        except Exception as exc:  # noqa: BLE001 - reported to that request only
            send({"id": rid, "error": f"{type(exc).__name__}: {exc}"})

    def cancel(self, rid: int) -> None:
        h = self.handles.pop(rid, None)
        if h is not None:
            h.cancel()

    def step(self) -> None:
        self.pipe.step()
        for rid, h in list(self.handles.items()):
            tokens, logprobs, finish = [], [], None
            if h.can_read():
                for out in h.read().values():
                    tokens += list(out.generated_ids)
                    logprobs += [float(x) for x in out.generated_log_probs]
                    finish = FINISH.get(out.finish_reason.name, None) or finish
            status = h.get_status().name
            if status == "IGNORED":  # the scheduler could not fit it (a prompt larger than the KV cache)
                del self.handles[rid]
                send({"id": rid, "error": "the pipeline could not schedule the request (KV cache too small for "
                                          "its prompt?)"})
                continue
            if status != "RUNNING":
                del self.handles[rid]
                finish = finish or ("stop" if status == "FINISHED" else "abort")
            if tokens or finish:
                send({"id": rid, "tokens": tokens, "logprobs": logprobs, "finish": finish})
        sys.stdout.flush()

    def run(self, inbox: queue.Queue) -> None:
        while True:
            busy = self.pipe.has_non_finished_requests()
            msgs = []
            try:
                msgs.append(inbox.get(block=not busy))
                while True:
                    msgs.append(inbox.get_nowait())
            except queue.Empty:
                pass
            for msg in msgs:
                if msg["op"] == "exit":
                    return
                if msg["op"] == "add":
                    self.add(msg)
                elif msg["op"] == "cancel":
                    self.cancel(int(msg["id"]))
            sys.stdout.flush()
            if self.pipe.has_non_finished_requests():
                self.step()


def warm_up(pipe) -> None:
    import numpy as np
    import openvino as ov

    gc = pipe.get_config()
    gc.max_new_tokens, gc.do_sample = 2, False
    h = pipe.add_request(0, ov.Tensor(np.asarray([[1, 2, 3, 4]], dtype=np.int64)), gc)
    while pipe.has_non_finished_requests():
        pipe.step()
    if h.can_read():
        h.read_all()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an OpenVINO IR folder exported by optimum-intel")
    ap.add_argument("--max-running", type=int, default=16, help="sequences decoded together (max_num_seqs)")
    ap.add_argument("--batched-tokens", type=int, default=256,
                    help="tokens one step may process (decode tokens + prefill chunks; max_num_batched_tokens)")
    ap.add_argument("--cache-gib", type=int, default=1, help="KV cache size in GiB")
    ap.add_argument("--prefix-caching", type=int, default=1, help="1: reuse the KV blocks of earlier prompts")
    ap.add_argument("--threads", type=int, default=0, help="inference threads (0: OpenVINO's choice)")
    ap.add_argument("--inference-precision", default="auto", help="auto (bf16 where the CPU has it), f32, bf16, f16")
    ap.add_argument("--kv-cache-precision", default="auto", help="auto, u8, f16, bf16, f32")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        pipe = pipeline(args)
        warm_up(pipe)
        eos = sorted(pipe.get_config().stop_token_ids or [pipe.get_config().eos_token_id])
    except Exception as exc:  # noqa: BLE001 - the service reports it as the backend's start failure
        send({"fatal": f"{type(exc).__name__}: {exc}"})
        sys.stdout.flush()
        return 1
    send({"ready": True, "eos": eos, "device": "CPU"})
    sys.stdout.flush()
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=read_stdin, args=(inbox,), daemon=True).start()
    Worker(pipe).run(inbox)
    return 0


if __name__ == "__main__":
    sys.exit(main())
