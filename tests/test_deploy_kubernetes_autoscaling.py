"""Kubernetes manifests, autoscaling and alerting (deploy/kubernetes): the HPA / KEDA scale on a metric
prometheus-adapter really serves, the PrometheusRule equals deploy/prometheus/rules (and promtool accepts it), and the
adapter's and KEDA's queries are evaluated by a real Prometheus scraping the service's own metric definitions
(serving/metrics.py). Rendering and schema checks: tests/test_deploy_kubernetes.py."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from k8s_fixtures import ADAPTER_VALUES, K8S, LOAD_GAUGES, NAMESPACE, OVERLAYS, RULES_DIR, one, render, serve_config
from serving_fixtures import free_port
from test_monitoring_prometheus import EXPORTED, promql_metric_names


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
