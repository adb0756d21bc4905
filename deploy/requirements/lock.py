"""Pinned requirement locks for the Bento and the container images, generated offline from the project's own
environment (.venv): the dependency closure of a set of root packages, every package pinned to the version installed
there. No resolver and no network: .venv was installed from pyproject.toml's pins, so its versions are the tested ones.

    .venv/bin/python deploy/requirements/lock.py          # rewrite the locks
    .venv/bin/python deploy/requirements/lock.py --check  # exit 1 when a lock is stale (tests/test_deploy_bento.py)

Locks (markers evaluated for Linux x86_64 on Python 3.11, the CPU image and the Bento, and 3.12, Ubuntu 24.04's
Python in the GPU images; a requirement needed under either is pinned):
  serve-cpu.txt  what `llmstack serve` / serving.service imports (serving, monitoring, llmstack): the Bento's
                 requirements_txt, deploy/docker/serve-cpu.Dockerfile, and the stack venv of serve-gpu.Dockerfile.
                 torch is the CPU build (torch==X+cpu from https://download.pytorch.org/whl/cpu).
  train-gpu.txt  the whole project's dependencies (pyproject.toml [project].dependencies): train-gpu.Dockerfile.
                 torch is PyPI's Linux build (CUDA); its CUDA-only dependencies come with it, pinned by torch itself.

Not generated: train-gpu-extra.txt, the GPU paths' own packages (pyproject.toml's `gpu` extra: bitsandbytes,
gptqmodel, liger-kernel, and what they add), pinned by hand. .venv is a CPU environment and cannot hold them (their
CUDA kernels, gptqmodel's build needs torch's CUDA build), so there is no installed closure to read them from; the
file says how its pins were resolved, and tests/test_gpu_env.py checks it against the GPU code paths' imports and the
extra's pins.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Third-party packages the serving code imports (tests/test_deploy_bento.py checks this list against an import scan
# of serving.service's first-party import graph): the API and server, the tokenizer, the three backends' clients
# (onnxruntime; torch + transformers + peft for HF folders and LoRA adapters; httpx for the supervised vLLM), the
# drift monitor's statistics.
SERVE_ROOTS = ["bentoml", "fastapi", "pydantic", "pyyaml", "prometheus-client", "numpy", "scipy", "httpx",
               "transformers", "tokenizers", "safetensors", "onnxruntime", "torch", "peft"]
PYTHONS = ("3.11", "3.12")


def environments() -> list[dict]:
    """Marker environments: this machine's (Linux x86_64) with each target Python."""
    envs = []
    for v in PYTHONS:
        env = dict(default_environment())
        env.update(python_version=v, python_full_version=f"{v}.0", sys_platform="linux", platform_system="Linux",
                   os_name="posix", platform_machine="x86_64", implementation_name="cpython",
                   platform_python_implementation="CPython")
        envs.append(env)
    return envs


def _wanted(req: Requirement, extras: set[str], envs: list[dict]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for env in envs for e in (extras | {""}))


def closure(roots: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of the roots and everything they require (with requested extras)."""
    envs = environments()
    pins: dict[str, str] = {}
    done: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in roots]
    missing = []
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        version = dist.version
        if req.specifier and not req.specifier.contains(version.split("+")[0], prereleases=True):
            raise SystemExit(f"{req.name} {version} installed, but {req} is required: reinstall .venv")
        pins[name] = version
        for line in dist.requires or []:
            sub = Requirement(line)
            if _wanted(sub, set(req.extras), envs):
                todo.append(sub)
    if missing:
        raise SystemExit(f"required but not installed in {sys.prefix}: {sorted(set(missing))}")
    return dict(sorted(pins.items()))


def project_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def render(pins: dict[str, str], header: str, torch: str) -> str:
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    lines.append("# Generated by deploy/requirements/lock.py from .venv; regenerate, do not edit.")
    for name, version in pins.items():
        if name == "torch":
            version = torch
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def locks() -> dict[str, str]:
    torch_version = metadata.version("torch").split("+")[0]
    serve = closure(SERVE_ROOTS)
    train = closure(project_dependencies())
    return {
        "serve-cpu.txt": render(serve, f"""
Serving closure (serving.service, `llmstack serve`): the Bento's requirements_txt and the serve images' lock.
torch is the CPU build: pip needs {TORCH_CPU_INDEX} for torch=={torch_version}+cpu (the Dockerfiles install
it from there first; the Bento adds the index as extra_index_url).""", f"{torch_version}+cpu"),
        "train-gpu.txt": render(train, """
The project's dependencies (pyproject.toml) for the GPU training image. torch is PyPI's Linux build (CUDA);
its CUDA-only dependencies (nvidia-*, cuda-toolkit, triton) are exact pins in torch's own metadata.""",
                                torch_version),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a lock differs from what .venv gives")
    args = p.parse_args(argv)
    stale = []
    for name, text in locks().items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"{path.relative_to(ROOT)}: {sum(1 for ln in text.splitlines() if '==' in ln)} pins")
    if stale:
        print(f"stale locks: {', '.join(stale)} (run .venv/bin/python deploy/requirements/lock.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
