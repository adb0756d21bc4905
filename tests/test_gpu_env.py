"""The GPU environment: the GPU lock holds every package the GPU code paths import (checked here, on any machine),
`make gpu-check` refuses clearly without a GPU, and, where a CUDA GPU is present, the GPU paths work: NF4 and GPTQ
variants load and generate, bf16 LoRA training lowers the loss."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import import_graph
import pytest
import torch
from conftest import PY, ROOT, ticket_rows

REQ = ROOT / "deploy" / "requirements"
GPU_LOCKS = (REQ / "train-gpu.txt", REQ / "train-gpu-extra.txt")
# The GPU code paths: GPU quantization, the bf16 training recipe, the Liger / bf16 benchmark and the GPU check. The
# serving vLLM backend's imports belong to the vLLM environment (make vllm-env), not to this lock.
GPU_ROOTS = ["compression.quantize.gpu", "training.sft.recipe", ROOT / "benchmarks" / "bench_train.py",
             ROOT / "benchmarks" / "gpu_check.py"]
# import name -> distribution of the GPU-only packages, which this CPU environment does not have installed
GPU_DISTRIBUTIONS = {"bitsandbytes": "bitsandbytes", "gptqmodel": "gptqmodel", "liger_kernel": "liger-kernel",
                     "triton": "triton", "flash_attn": "flash-attn"}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bitsandbytes / gptqmodel kernels, bf16 autocast); this "
                                       "machine has none: `make gpu-check` runs these paths on one")


def gpu_pins() -> set[str]:
    return {import_graph.canonical(n) for lock in GPU_LOCKS for n in import_graph.lock_pins(lock)}


def unpinned_gpu_imports(roots) -> dict:
    """Third-party imports of `roots` whose distribution the GPU lock (train-gpu.txt + train-gpu-extra.txt) lacks."""
    _, third = import_graph.third_party_imports(roots)
    return import_graph.unpinned(third, gpu_pins(), GPU_DISTRIBUTIONS)


# ---------------------------------------------------------------- the lock and the code agree (any machine)
def test_gpu_lock_pins_every_package_the_gpu_paths_import():
    _, third = import_graph.third_party_imports(GPU_ROOTS)
    assert {"bitsandbytes", "gptqmodel", "optimum", "liger_kernel", "trl", "peft", "torch"} <= third, third
    missing = unpinned_gpu_imports(GPU_ROOTS)
    assert not missing, (f"imported by a GPU code path but not pinned in {', '.join(p.name for p in GPU_LOCKS)}: "
                         f"{missing} (pin it in deploy/requirements/train-gpu-extra.txt and pyproject's gpu extra)")


def test_an_import_missing_from_the_gpu_lock_fails_the_check(tmp_path):
    """The check above bites: a GPU path that imports flash-attn (left out of the lock: PyPI has only its sdist) or
    looks for an unknown package is reported, by name."""
    extra = tmp_path / "new_gpu_path.py"
    extra.write_text("from importlib.util import find_spec\n\n\ndef attention():\n    import flash_attn\n"
                     "    return flash_attn, find_spec('some_kernel_package')\n")
    missing = unpinned_gpu_imports([*GPU_ROOTS, extra])
    assert missing == {"flash_attn": ["flash-attn"], "some_kernel_package": "not installed"}


def test_gpu_extra_and_the_extra_lock_pin_the_same_versions():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    extra_pins = dict(r.split("==") for r in extra)
    lock = import_graph.lock_pins(REQ / "train-gpu-extra.txt")
    assert set(extra_pins) == {"bitsandbytes", "gptqmodel", "liger-kernel"}
    assert {k: lock.get(k) for k in extra_pins} == extra_pins
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in lock.values()), "every line name==version"
    base = import_graph.lock_pins(REQ / "train-gpu.txt")
    assert base["torch"] == "2.13.0" and "flash-attn" not in lock | base


def test_gpu_image_installs_the_extra_lock_after_the_project_lock():
    text = (ROOT / "deploy" / "docker" / "train-gpu.Dockerfile").read_text()
    base, extra = text.index("--requirement /tmp/requirements/train-gpu.txt"), text.index(
        "--requirement /tmp/requirements/train-gpu-extra.txt")
    assert base < extra and "BUILD_CUDA_EXT=0 pip install --no-cache-dir --no-build-isolation" in text
    assert "libpcre2-dev" in text  # pypcre (gptqmodel's) compiles against it


# ---------------------------------------------------------------- make gpu-check
def gpu_check(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "benchmarks/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_gpu_check_help_names_its_steps_and_offline_install():
    r = gpu_check("--help")
    assert r.returncode == 0, r.stderr
    for word in ("--wheelhouse", "--budget", "train-gpu-extra.txt", "vllm==0.32.0", "bench-train", "compress",
                 "serve"):
        assert word in r.stdout, word


def test_gpu_check_refuses_without_a_gpu_and_starts_nothing():
    r = gpu_check(CUDA_VISIBLE_DEVICES="")
    assert r.returncode != 0
    assert "benchmarks/gpu_check.py: no CUDA GPU here" in r.stderr and "Nothing was installed" in r.stderr
    assert not (ROOT / "benchmarks" / "results" / "gpu.json").exists() or "no CUDA GPU" not in (
        ROOT / "benchmarks" / "results" / "gpu.json").read_text()


def test_gpu_check_plan_uses_the_locks_and_relative_outputs():
    r = gpu_check("--dry-run", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "torch==2.13.0" in out and "train-gpu.txt" in out and "train-gpu-extra.txt" in out
    assert "train.mixed_precision=bf16" in out and "--precision bf16" in out and "model.backend=vllm" in out
    assert "--concurrency 1,16" in out and "vllm==0.32.0" in out


# ---------------------------------------------------------------- on a CUDA GPU
@NEEDS_CUDA
@pytest.mark.parametrize("method,quant_method", [("bnb_nf4", "bitsandbytes"), ("gptq", "gptq")])
def test_gpu_variant_loads_in_transformers_and_generates(tiny_model_dir, tmp_path, method, quant_method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compression.quantize import gpu_quantize

    calib = [f"{r['instruction']}\n\n{r['input']}\n{r['output']}" for r in ticket_rows(16)]
    out = gpu_quantize(tiny_model_dir, tmp_path / method, method, calib_texts=calib)
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == quant_method
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": 0})
    ids = tok("Ticket: my invoice is wrong", return_tensors="pt").to(0)
    gen = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8


@NEEDS_CUDA
def test_bf16_lora_training_lowers_the_loss(tiny_config):
    from core import artifacts
    from training.sft import recipe as sft

    cfg = tiny_config(["train.mixed_precision=bf16", "train.max_steps=12", "train.lr=5e-3", "eval.after=false"])
    path = sft.run(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["training"]["distributed"]["mixed_precision"] == "bf16"
    losses = [h["loss"] for h in json.loads((path / artifacts.TRAIN_HISTORY).read_text()) if "loss" in h]
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
