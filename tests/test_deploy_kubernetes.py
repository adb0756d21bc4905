"""Kubernetes manifests (deploy/kubernetes), checked offline: every kustomization rendered by `kubectl kustomize`;
the built-in resources validated against the Kubernetes 1.37 OpenAPI schemas in strict mode (kubernetes-validate),
the prometheus-operator and KEDA resources against their CRD models (cloudcoil) plus a check that no key was dropped
as unknown; then what a user relies on: probes on the routes the service has, selectors that select, the key file
the service reads, GPUs equal to the tensor-parallel size. Autoscaling, the PrometheusRule and the queries evaluated
by a real Prometheus: test_deploy_kubernetes_autoscaling.py; rendering helpers: k8s_fixtures.py."""
from __future__ import annotations

import copy
import re

import pytest
import yaml
from conftest import ROOT
from k8s_fixtures import (CRD_GROUPS, K8S, KINDS, KUBERNETES_VERSION, NAMESPACE, OVERLAYS, RULES_DIR, SECRET_EXAMPLE,
                          container, one, render, selects, serve_config)


# ---------------------------------------------------------------- rendering
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


def test_retrain_job_runs_a_command_the_cli_accepts_on_the_artifacts_volume():
    """The Job's command line parses with llmstack's own parser and its config (the file the train image ships, plus
    the overrides) validates; it writes to the volume the serving replicas read, and the image copies that config."""
    from core.config import load
    from llmstack.cli import build_parser
    from llmstack.retrain.config import RetrainConfig

    docs = render("jobs/retrain")
    job = one(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:2] == ["llmstack", "retrain"] and pod["restartPolicy"] == "Never"
    args = build_parser().parse_args(c["command"][1:] + c["args"])
    assert args.config == "/app/configs/retrain.yaml" and not args.promote
    cfg = load(RetrainConfig, ROOT / "configs" / "retrain.yaml", args.overrides)
    assert cfg.traffic.select == "review" and cfg.output_dir.startswith("artifacts/")
    dockerfile = (ROOT / "deploy" / "docker" / "train-gpu.Dockerfile").read_text()
    assert c["image"].startswith("llmstack/train-gpu:") and "configs/retrain.yaml /app/configs/" in dockerfile
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["artifacts"]["mountPath"] == c["workingDir"] + "/artifacts" and not mounts["artifacts"].get("readOnly")
    claim = {v["name"]: v for v in pod["volumes"]}["artifacts"]["persistentVolumeClaim"]["claimName"]
    assert claim == one(render("storage"), "PersistentVolumeClaim")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
