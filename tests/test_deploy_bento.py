"""The Bento (`llmstack bento`, deploy/bentofile.yaml) and the pinned requirement locks (deploy/requirements).

A real Bento is built from a compress run around the tiny ONNX model (with a drift reference) in a temporary
BENTOML_HOME, the way users build it; then it is exported with its model, unpacked as `bentoml containerize` lays it
out in the image, and served by `bentoml serve <bento dir>` against an empty BENTOML_HOME: the model, its lineage and
its drift reference must come from the Bento alone. No Docker engine here, so the image build itself is not run.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from importlib import metadata
from pathlib import Path

import import_graph
import pytest
import yaml
from conftest import PY, ROOT, cli_env

RUN_ID = "20260101-000000-bento1"
VARIANT = "onnx-int8"
LOCK = ROOT / "deploy" / "requirements" / "serve-cpu.txt"


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    return import_graph.lock_pins(path)


# ---------------------------------------------------------------- the locks
def test_locks_are_what_the_project_environment_holds():
    """deploy/requirements/*.txt equal what lock.py derives from .venv (pyproject.toml's pins, installed)."""
    res = subprocess.run([PY, "deploy/requirements/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    pins = lock_pins()
    assert pins["torch"].endswith("+cpu") and pins["bentoml"] == metadata.version("bentoml")
    assert all(v and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in pins.values()), "every line name==version"


def test_openvino_runtime_lock_is_a_closed_subset_of_the_openvino_environment():
    """The images' OpenVINO runtime (deploy/requirements/openvino-runtime.txt, the Bento's setup script) pins the
    versions of the tested OpenVINO environment, and holds every package they require (installed with --no-deps)."""
    req = ROOT / "deploy" / "requirements"
    runtime, full = lock_pins(req / "openvino-runtime.txt"), lock_pins(req / "openvino.txt")
    assert "openvino-genai" in runtime and all(full.get(k) == v for k, v in runtime.items()), (runtime, full)
    script = ROOT / "deploy" / "bento-openvino.sh"
    assert os.access(script, os.X_OK)
    assert dict(re.findall(r"^\s+([A-Za-z0-9._-]+)==(\S+)", script.read_text(), re.M)) == runtime
    bentofile = yaml.safe_load((ROOT / "deploy" / "bentofile.yaml").read_text())
    assert bentofile["docker"]["setup_script"] == "deploy/bento-openvino.sh"
    assert {"name": "LLMSTACK_OPENVINO_PYTHON", "value": "/opt/openvino/bin/python"} in bentofile["envs"]
    ov_python = ROOT / ".venv-openvino" / "bin" / "python"
    if ov_python.exists():  # the closure: what these packages require, read from the installed environment
        code = ("import json, sys, re\nfrom importlib import metadata\nout = {}\nfor n in sys.argv[1:]:\n"
                "    out[n] = [re.split(r'[ ;<>=!~\\[]', r)[0] for r in (metadata.requires(n) or []) "
                "if 'extra ==' not in r]\nprint(json.dumps(out))")
        res = subprocess.run([str(ov_python), "-c", code, *runtime], capture_output=True, text=True, timeout=60)
        requires = json.loads(res.stdout)
        norm = {k.lower().replace("_", "-") for k in runtime}
        missing = {r for reqs in requires.values() for r in reqs if r.lower().replace("_", "-") not in norm}
        assert not missing, f"openvino-runtime.txt lacks {missing}"


def serving_imports() -> tuple[set[str], set[str]]:
    """(first-party modules, third-party top-level names) reachable from serving/service.py, function-level imports
    included (the backends are imported lazily)."""
    return import_graph.third_party_imports(["serving.service"])


def test_serve_lock_covers_every_package_the_service_imports():
    """The Bento / serve images install only the serve lock: every third-party import of the service's code (the
    backends' lazy ones too) must be in it, and the service must not reach training or compression code (the Bento
    does not ship it)."""
    modules, third = serving_imports()
    assert {"serving.runtime", "serving.backends.onnx", "serving.backends.vllm", "monitoring.live"} <= modules
    assert not {m for m in modules if m.split(".")[0] in ("training", "compression")}, "serving imports training"
    include = yaml.safe_load((ROOT / "deploy" / "bentofile.yaml").read_text())["include"]
    files = {import_graph.first_party_file(m).relative_to(ROOT).as_posix() for m in modules}
    unshipped = sorted(f for f in files if not any(fnmatch.fnmatch(f, p) or fnmatch.fnmatch(f, p.replace("**/", ""))
                                                   for p in include))  # BentoML's **: zero or more folders
    assert not unshipped, f"the service imports modules the Bento does not include: {unshipped}"
    missing = import_graph.unpinned(third, set(lock_pins()))
    assert not missing, f"imported by the service but not in {LOCK.name}: {missing} (add to SERVE_ROOTS in lock.py)"


# ---------------------------------------------------------------- the Bento
def _compress_run(folder: Path, onnx_dir: Path) -> Path:
    """A compress run as `llmstack compress` leaves it: run manifest recommending one ONNX variant."""
    import shutil
    run = folder / RUN_ID
    variant = run / VARIANT
    shutil.copytree(onnx_dir, variant)
    parent = {"path": "/nowhere/artifacts/train/20260101-000000-train1", "stage": "train",
              "run_id": "20260101-000000-train1"}
    (variant / "manifest.json").write_text(json.dumps({
        "stage": "compress", "variant": VARIANT, "run_id": RUN_ID, "parent": parent,
        "serve": {"backend": "onnxruntime", "file_name": "model.onnx"}}))
    (run / "manifest.json").write_text(json.dumps({
        "stage": "compress", "run_id": RUN_ID, "parent": parent, "variants": [{"name": VARIANT}],
        "recommended_serve": {"path": VARIANT, "backend": "onnxruntime"}}))
    return run


@pytest.fixture(scope="module")
def bento(tmp_path_factory, tiny_onnx_dir, tokenizer):
    """`llmstack bento --model <compress run>` in a fresh BENTOML_HOME; the run holds a drift reference."""
    from serving_fixtures import tiny_drift_reference

    tmp = tmp_path_factory.mktemp("bento")
    run = _compress_run(tmp / "artifacts" / "compress", tiny_onnx_dir)
    tiny_drift_reference(run / VARIANT, tokenizer, run)  # the compress run's reference, as training leaves one
    home = tmp / "bentoml-home"
    t0 = time.time()
    res = subprocess.run([PY, "-m", "llmstack", "bento", "--model", str(run), "model.threads=1",
                          "limits.max_tokens=64"], cwd=ROOT, env=cli_env(BENTOML_HOME=str(home),
                          BENTOML_DO_NOT_TRACK="true"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    model_tag = re.search(r"BentoML model (\S+)", res.stdout).group(1)
    bento_tag = re.search(r"^bento (\S+):", res.stdout, re.M).group(1)
    name, version = bento_tag.split(":")
    return {"tmp": tmp, "home": home, "model_tag": model_tag, "bento_tag": bento_tag, "run": run,
            "path": home / "bentos" / name / version, "seconds": time.time() - t0}


def test_bento_holds_the_service_the_model_and_pinned_requirements(bento):
    path = bento["path"]
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert info["service"] == "serving.service:LLMService"
    # the model: named after its lineage, declared by the service (bento.yaml lists it: containerize ships it)
    assert bento["model_tag"] == f"llmstack-model:{RUN_ID}-{VARIANT}"
    assert [m["tag"] for m in info["services"][0]["models"]] == [bento["model_tag"]]
    assert info["args"]["model"] == bento["model_tag"]
    baked = info["args"]["config"]  # the resolved serve config, overrides included
    assert baked["model"]["threads"] == 1 and baked["limits"]["max_tokens"] == 64
    # requirements: the lock, every line pinned, torch's CPU index; nothing locked at build time (offline)
    reqs = (path / "env" / "python" / "requirements.txt").read_text().splitlines()
    lines = [ln.strip() for ln in reqs if ln.strip() and not ln.startswith("#")]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    pinned = {ln for ln in lines if not ln.startswith("-")}
    assert all("==" in ln for ln in pinned), [ln for ln in pinned if "==" not in ln]
    assert {f"{k}=={v}" for k, v in lock_pins().items()} <= pinned
    # the image: the same pinned base as the serve-cpu Dockerfile; uv may pick torch from PyTorch's index
    dockerfile = (ROOT / "deploy/docker/serve-cpu.Dockerfile").read_text()
    assert f"FROM {info['image']['base_image']} AS runtime" in dockerfile
    generated = (path / "env" / "docker" / "Dockerfile").read_text()  # what `bentoml containerize` builds
    assert generated.index("ENV UV_INDEX_STRATEGY=") < generated.index("pip install -r")
    # the source: the service's packages and config, nothing else
    src = path / "src"
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert {"serving/service.py", "serving/runtime.py", "serving/backends/onnx.py", "serving/static/dashboard.html",
            "core/errors.py", "llmstack/cli.py", "monitoring/live.py", "configs/serve.yaml"} <= files
    top = {f.split("/")[0] for f in files}
    assert top <= {"core", "chatdata", "serving", "llmstack", "monitoring", "runtimes", "tracking", "configs",
                   "bentofile.yaml"}, top
    assert "runtimes/openvino/worker.py" in files  # model.backend=openvino
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".onnx", ".safetensors"))]
    # the stored model: the variant's files, its drift reference and what `llmstack serve` knew about it
    store = bento["home"] / "models" / "llmstack-model" / bento["model_tag"].split(":")[1]
    assert {"model.onnx", "tokenizer.json", "manifest.json", "drift_reference.json", "llmstack_model.json"} <= {
        p.name for p in store.iterdir()}
    bundle = json.loads((store / "llmstack_model.json").read_text())
    assert bundle["name"] == VARIANT and bundle["backend"] == "onnxruntime"
    assert bundle["lineage"]["run_id"] == RUN_ID and bundle["lineage"]["variant"] == VARIANT
    labels = yaml.safe_load((store / "model.yaml").read_text())["labels"]
    assert labels["run_id"] == RUN_ID and labels["variant"] == VARIANT


def _start(cmd, cwd, env, log_path, base, timeout=150):
    import httpx

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the Bento did not become ready; log:\n{Path(log_path).read_text()[-3000:]}")


def test_bento_serves_its_own_model_as_in_the_container(bento, tmp_path):
    """Export the Bento with its model, unpack it (the layout `bentoml containerize` copies into the image) and serve
    that directory against an empty BENTOML_HOME, outside the repository: readiness, the API key from a secret file,
    a chat completion, the model's name and lineage, and live drift against the reference that travelled with it."""
    import httpx
    from serving_fixtures import free_port, metric_sum, stop_server

    archive = tmp_path / "llmstack.bento"
    subprocess.run([str(Path(PY).parent / "bentoml"), "export", bento["bento_tag"], str(archive)], check=True,
                   env=cli_env(BENTOML_HOME=str(bento["home"]), BENTOML_DO_NOT_TRACK="true"), capture_output=True,
                   timeout=120)
    unpacked = tmp_path / "bento"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "models" / "llmstack-model" / bento["model_tag"].split(":")[1] / "model.onnx").is_file()

    key = tmp_path / "api_key"
    key.write_text("s3cret-key\n")
    env = cli_env(BENTOML_HOME=str(tmp_path / "empty-home"), BENTOML_DO_NOT_TRACK="true",
                  LLMSTACK_API_KEY_FILE=str(key))
    env.pop("PYTHONPATH")  # the code must come from the Bento's src/
    env.pop("LLMSTACK_SERVE_CONFIG", None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start([str(Path(PY).parent / "bentoml"), "serve", str(unpacked), "--port", str(port)], tmp_path, env,
                  tmp_path / "serve.log", base)
    try:
        auth = {"Authorization": "Bearer s3cret-key"}
        body = {"model": VARIANT, "messages": [{"role": "user", "content": "My invoice is wrong."}],
                "max_tokens": 8, "temperature": 0}
        assert httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(base + "/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == VARIANT and out["usage"]["completion_tokens"] >= 1
        assert isinstance(out["choices"][0]["message"]["content"], str)
        models = httpx.get(base + "/v1/models", headers=auth, timeout=10).json()
        assert [m["id"] for m in models["data"]] == [VARIANT]
        drift = httpx.get(base + "/drift", timeout=10).json()
        assert drift["enabled"] is True, drift["reason"]
        assert drift["reference"]["path"].startswith(str(unpacked / "models")), drift["reference"]
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert metric_sum(metrics, "llm_model_info", run_id=RUN_ID, variant=VARIANT) == 1
    finally:
        stop_server(proc)


def test_bento_refuses_what_it_cannot_ship(tmp_path):
    """Adapters and the vLLM backend have no place in the CPU Bento: a config error before anything is built."""
    from serving_fixtures import serve_cfg

    from core.errors import ConfigError
    from deploy import bento
    from serving.model_ref import ModelRef

    ref = ModelRef(tmp_path, "m", "transformers")
    nowhere = str(tmp_path / "no-bentofile.yaml")  # should a check be skipped: an error before any import / build
    cfg = serve_cfg(tmp_path, adapters=[{"name": "a", "path": str(tmp_path)}])
    with pytest.raises(ConfigError, match="adapters"):
        bento.build(cfg, ref, nowhere)
    cfg = serve_cfg(tmp_path, model={"backend": "vllm"})
    with pytest.raises(ConfigError, match="vLLM"):
        bento.build(cfg, ref, nowhere)
