"""Prometheus and Grafana for the service (deploy/): promtool checks and unit tests of the recording and alerting
rules, the Grafana dashboard and provisioning against the metrics the service exports and the rules that exist, and
a real Prometheus (started by deploy/prometheus/monitor.py, as `make monitor` does) scraping the real server on the
tiny ONNX model, with the rules evaluated on what it scraped."""
from __future__ import annotations

import json
import functools
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import PY, ROOT
from serving_fixtures import free_port as _free_port, metric_sum, start_server, stop_server

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
MONITOR = PROM / "monitor.py"
RULE_FILES = [PROM / "rules" / "recording.yml", PROM / "rules" / "alerts.yml"]
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llmstack.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "llmstack.yml"
KEY = "monitoring-test-key"

# What the service exports: serving/metrics.py, labelled model, adapter, backend ...
HISTOGRAMS = ["llm_time_to_first_token_seconds", "llm_inter_token_latency_seconds", "llm_e2e_request_latency_seconds",
              "llm_request_queue_time_seconds"]
COUNTERS = ["llm_prompt_tokens_total", "llm_generation_tokens_total", "llm_requests_total"]
GAUGES = ["llm_requests_running", "llm_requests_waiting", "llm_model_info"]
# ... and monitoring/live.py (the drift monitor), one per service process, without those labels
SERVICE_LEVEL = {"llm_drift_score", "llm_drift_detected", "llm_dataset_drift", "llm_drift_window_rows",
                 "llm_monitor_dropped_total"}
EXPORTED = set(COUNTERS + GAUGES) | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")} | SERVICE_LEVEL
PROMETHEUS_OWN = {"up", "ALERTS"}  # written by Prometheus itself (scrape health, alert state)
QUANTILES = {"0.5", "0.95", "0.99"}
SEVERITIES = {"critical", "warning", "info"}

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
            "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression selects: everything but strings, label matchers,
    ranges, grouping clauses, functions, keywords and numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group().lower() in KEYWORDS:
            continue
        names.add(m.group())
    return names


def test_promql_metric_names_finds_what_is_selected():
    expr = ('sum by (le, model) (rate(llm_x_bucket{le=~"1|1\\\\.0", a="b}"}[5m])) / on(model) group_left(q) '
            'model:y:rate5m{m=~"$model"} > bool 1e-9 or vector(0) unless absent(up)')
    assert promql_metric_names(expr) == {"llm_x_bucket", "model:y:rate5m", "up"}


def _rules(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


RECORDED = {r["record"] for r in _rules(RULE_FILES[0])}
ALERTS = {r["alert"]: r for r in _rules(RULE_FILES[1])}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian package prometheus: `make system-deps`)")
    return tool


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


# ---------------------------------------------------------------- config and rules
def test_monitor_renders_a_config_that_promtool_accepts(tmp_path):
    promtool = _promtool()
    _ok(_run([promtool, "check", "config", PROM / "prometheus.yml"]))  # the template as is (relative rule paths)
    r = _run([PY, MONITOR, "--print-config", "--target", "10.1.2.3:8080", "--scrape-interval", "2s"], cwd=tmp_path)
    _ok(r)
    config = yaml.safe_load(r.stdout)
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "2s"
    assert config["rule_files"] == [str(p) for p in RULE_FILES]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llmstack"]
    assert job["static_configs"] == [{"targets": ["10.1.2.3:8080"]}] and job["metrics_path"] == "/metrics"
    rendered = tmp_path / "elsewhere" / "prometheus.yml"  # absolute rule paths: valid from any folder
    rendered.parent.mkdir()
    rendered.write_text(r.stdout)
    check = _run([promtool, "check", "config", rendered])
    _ok(check)
    assert "2 rule files found" in check.stdout + check.stderr


def test_monitor_rejects_bad_arguments_and_explains_a_missing_binary(tmp_path):
    r = _run([PY, MONITOR, "--target", "localhost"])
    assert r.returncode == 2 and "host:port" in r.stderr
    r = _run([PY, MONITOR, "--retention", "a week"])
    assert r.returncode == 2 and "duration" in r.stderr
    r = _run([PY, MONITOR, "--rule-dir", "/etc/prometheus/rules"])
    assert r.returncode != 0 and "--print-config" in r.stderr
    r = _run([PY, MONITOR, "--data-dir", tmp_path / "data"], env={**os.environ, "PATH": str(tmp_path)})
    assert r.returncode != 0 and "make system-deps" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()
    helptext = _run([PY, MONITOR, "--help"]).stdout
    for option in ("--target", "--host", "--port", "--data-dir", "--retention", "--scrape-interval", "--prometheus",
                   "--print-config", "--rule-dir"):
        assert option in helptext


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path):
    _ok(_run([_promtool(), "check", "rules", path]))


def test_promtool_unit_tests_of_the_rules():
    assert {p.name for p in RULE_TESTS} >= {"recording_test.yml", "alerts_test.yml"}
    r = _run([_promtool(), "test", "rules", *RULE_TESTS], cwd=PROM / "tests")
    _ok(r)
    assert "FAILED" not in r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    tested = {}
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                tested.setdefault(t["alertname"], set()).add(bool(t.get("exp_alerts")))
    for name in ALERTS:
        assert tested.get(name) == {True, False}, f"{name}: needs a firing and a silent case, has {tested.get(name)}"


def test_rules_read_only_exported_metrics_and_follow_the_conventions():
    for rule in _rules(RULE_FILES[0]):
        name = rule["record"]
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), f"{name}: not level:metric:operations"
        unknown = promql_metric_names(rule["expr"]) - EXPORTED
        assert not unknown, f"{name} reads {unknown}, which the service does not export"
    # each histogram: p50 / p95 / p99, each rule computing the quantile its label says
    for hist in HISTOGRAMS:
        rules = [r for r in _rules(RULE_FILES[0]) if r["record"] == f"model_quantile:{hist}:histogram_quantile_5m"]
        assert {r["labels"]["quantile"] for r in rules} == QUANTILES, hist
        for r in rules:
            assert r["expr"].startswith(f"histogram_quantile({r['labels']['quantile']}, "), r
            assert f"rate({hist}_bucket[5m])" in r["expr"] and "by (le, model)" in r["expr"], r
    for name, rule in ALERTS.items():
        assert re.fullmatch(r"LLM[A-Za-z]+", name)
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        unknown = promql_metric_names(rule["expr"]) - EXPORTED - RECORDED - PROMETHEUS_OWN
        assert not unknown, f"alert {name} reads {unknown}, neither exported nor recorded"
    assert {"LLMLatencySLOFastBurn", "LLMLatencySLOSlowBurn", "LLMHighErrorRatio", "LLMDriftDetected",
            "LLMDatasetDrift", "LLMServiceDown"} <= set(ALERTS)
    # multi-window burn rates: 14.4x over 1h and 5m, 6x over 6h and 30m, of a 1% budget
    fast, slow = (" ".join(ALERTS[a]["expr"].split()) for a in ("LLMLatencySLOFastBurn", "LLMLatencySLOSlowBurn"))
    assert re.fullmatch(r"(\S+):ratio_rate1h > \(14\.4 \* 0\.01\) and \1:ratio_rate5m > \(14\.4 \* 0\.01\)", fast), fast
    assert re.fullmatch(r"(\S+):ratio_rate6h > \(6 \* 0\.01\) and \1:ratio_rate30m > \(6 \* 0\.01\)", slow), slow
    assert ALERTS["LLMDriftDetected"]["for"] == "15m"


# ---------------------------------------------------------------- Grafana
def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out += [p] + p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_grafana_provisioning_points_at_the_datasource_and_the_dashboards_folder():
    ds = yaml.safe_load(DATASOURCES.read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["uid"]
    assert source["url"] == "${PROMETHEUS_URL}"
    prov = yaml.safe_load(PROVIDERS.read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.startswith("/var/lib/grafana/dashboards")
    # the documented mounts: the dashboards folder at the provider's path, provisioning where Grafana reads it
    readme = (DEPLOY / "README.md").read_text()
    assert f"deploy/grafana/dashboards:{path}" in readme
    assert "deploy/grafana/provisioning:/etc/grafana/provisioning" in readme


def test_dashboard_queries_only_exported_metrics_and_recorded_rules_through_the_provisioned_datasource():
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"]
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "model"]
    assert var["type"] == "query" and var["datasource"]["uid"] == uid
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
    assert m and m.group(1) in EXPORTED and m.group(2) == "model"
    for ann in dash["annotations"]["list"]:
        assert ann["datasource"]["uid"] == uid
        assert promql_metric_names(ann["expr"]) <= EXPORTED | RECORDED | PROMETHEUS_OWN
    panels = _panels(dash)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        where = f"panel {p['id']} {p['title']!r}"
        assert p["type"] in {"timeseries", "stat", "table"}, where
        assert p["datasource"]["uid"] == uid, where
        assert p["targets"], where
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, where
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, where
            names = promql_metric_names(t["expr"])
            assert names, f"{where}: no metric in {t['expr']!r}"
            assert names <= EXPORTED | RECORDED, f"{where}: {names - EXPORTED - RECORDED} neither exported nor recorded"
            # filter by $model exactly where the series have a model label (the drift series have none: a
            # model filter would hide them)
            if names & (SERVICE_LEVEL | {r for r in RECORDED if r.startswith("job:")}):
                assert "model" not in t["expr"], f"{where}: service-level series have no model label: {t['expr']!r}"
            else:
                assert 'model=~"$model"' in t["expr"], f"{where}: not filtered by $model: {t['expr']!r}"


@pytest.mark.parametrize("view,needle,kind", [
    ("TTFT p50/p95/p99", "model_quantile:llm_time_to_first_token_seconds:histogram_quantile_5m", "timeseries"),
    ("inter-token p50/p95/p99", "model_quantile:llm_inter_token_latency_seconds:histogram_quantile_5m", "timeseries"),
    ("e2e p50/p95/p99", "model_quantile:llm_e2e_request_latency_seconds:histogram_quantile_5m", "timeseries"),
    ("output tokens/s", "model:llm_generation_tokens:rate5m", "timeseries"),
    ("requests by status", "sum by (status) (model_status:llm_requests:rate5m", "timeseries"),
    ("requests by finish reason", "sum by (finish_reason) (model_finish_reason:llm_requests:rate5m", "timeseries"),
    ("running requests", "llm_requests_running", "timeseries"),
    ("waiting requests", "llm_requests_waiting", "timeseries"),
    ("TTFT SLO windows", "model:llm_time_to_first_token_seconds_slow:ratio_rate1h", "timeseries"),
    ("drift p-values", 'llm_drift_score{method=~"ks|chisquare|z"}', "timeseries"),
    ("drift distances", 'llm_drift_score{method=~"wasserstein|jensenshannon|psi"}', "timeseries"),
    ("drift detected per feature", "max by (feature) (llm_drift_detected", "stat"),
    ("dataset drift", "llm_dataset_drift", "stat"),
    ("drift window", "llm_drift_window_rows", "stat"),
    ("model info", "llm_model_info", "table"),
])
def test_dashboard_has_a_panel_for(view, needle, kind):
    hits = [p["title"] for p in _panels(_dashboard()) if p["type"] == kind and any(needle in e for e in _exprs(p))]
    assert hits, f"no {kind} panel for {view} (a query with {needle!r})"


# ---------------------------------------------------------------- the real thing
def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None and not stop_server(proc):
        pytest.fail(f"{proc.args[:3]} did not stop within 30 s of SIGTERM")


class PromAPI:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params):
        r = httpx.get(self.base + path, params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.status_code} {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict, float]]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.get("/api/v1/query", **params)
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value `expr` returns now (or at unix time `at`), None while it returns nothing or NaN."""
        result = self.query(expr, at)
        assert len(result) <= 1, f"{expr}: {result}"
        return result[0][1] if result and not math.isnan(result[0][1]) else None


def _wait(what: str, check, timeout: float, logs: list[Path], every: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-2500:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n{tails}")


def test_real_prometheus_scrapes_the_real_server_and_evaluates_the_rules(tiny_onnx_dir, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus: `make system-deps`)")
    prom_port = _free_port()
    prom = PromAPI(f"http://127.0.0.1:{prom_port}")
    serve_log, prom_log = tmp_path / "serve.log", tmp_path / "prometheus.log"
    logs = [serve_log, prom_log]
    auth = {"Authorization": f"Bearer {KEY}"}
    procs = []
    try:
        # BentoML keeps the multiprocess metric files in $BENTOML_HOME/prometheus_multiproc_dir and empties that
        # folder whenever a server starts: a private home, or any other server started on this machine meanwhile
        # (another test, another checkout) wipes this one's counters.
        proc, base, _ = start_server(tiny_onnx_dir, log_path=serve_log, LLMSTACK_API_KEY=KEY,
                                     BENTOML_HOME=str(tmp_path / "bentoml"))
        procs.append(proc)
        port = int(base.rsplit(":", 1)[1])

        def complete(i: int) -> dict:
            body = {"model": "tiny", "prompt": f"ticket {i}: my parcel", "max_tokens": 6, "temperature": 0,
                    "ignore_eos": True}
            r = httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        complete(0)  # the labelled series exist from the first request on: Prometheus sees the later ones as increases

        data_dir = tmp_path / "prom"
        with open(prom_log, "w") as out:
            procs.append(subprocess.Popen(
                [PY, MONITOR, "--target", f"127.0.0.1:{port}", "--port", str(prom_port), "--data-dir", str(data_dir),
                 "--scrape-interval", "1s", "--retention", "1h"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))

        def target_up():
            (t,) = [t for t in prom.get("/api/v1/targets")["activeTargets"] if t["labels"]["job"] == "llmstack"]
            return t["health"] == "up" and t["scrapeUrl"] == f"{base}/metrics" and t
        _wait("the llmstack target to be up", target_up, 60, logs)
        assert (data_dir / "prometheus.yml").is_file() and (data_dir / "tsdb").is_dir()
        assert prom.value('up{job="llmstack"}') == 1
        time.sleep(2)  # a scrape or two of the warm-up state

        n = 3
        done = [complete(i) for i in range(1, n + 1)]
        time.sleep(1.5)  # the next scrape sees them
        metrics = httpx.get(base + "/metrics").text
        requests = metric_sum(metrics, "llm_requests_total", model="tiny", status="success")
        tokens = metric_sum(metrics, "llm_generation_tokens_total", model="tiny")
        assert requests == n + 1 and tokens >= sum(d["usage"]["completion_tokens"] for d in done)
        exported = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line.startswith("llm_")}
        assert EXPORTED - SERVICE_LEVEL <= exported, f"this test's list of metrics is stale: {EXPORTED - exported}"

        # raw series: what Prometheus stored equals what the service exported
        _wait("llm_requests_total in Prometheus",
              lambda: prom.value('sum(llm_requests_total{job="llmstack",model="tiny",status="success"})') == requests,
              30, logs)
        assert prom.value('sum(llm_generation_tokens_total{model="tiny"})') == tokens
        assert prom.value('llm_model_info{model="tiny",backend="onnxruntime"}') == 1

        # recording rules, evaluated on the scraped increases
        def recorded():
            # One instant for every rule, two evaluation intervals back: read "now", two rules of one group can come
            # from different evaluations (the rates move as the 5m window fills), e.g. success/s > requests/s.
            at = time.time() - 2
            value = functools.partial(prom.value, at=at)
            got = {
                "requests/s": value('model:llm_requests:rate5m{model="tiny"}'),
                "success/s": value('model_status:llm_requests:rate5m{model="tiny",status="success"}'),
                "tokens/s": value('model:llm_generation_tokens:rate5m{model="tiny"}'),
                "errors": value('model:llm_requests_errors:ratio_rate5m{model="tiny"}'),
                "ttft p95": value('model_quantile:llm_time_to_first_token_seconds:histogram_quantile_5m'
                                  '{model="tiny",quantile="0.95"}'),
                "itl p50": value('model_quantile:llm_inter_token_latency_seconds:histogram_quantile_5m'
                                  '{model="tiny",quantile="0.5"}'),
                "slow ttft": value('model:llm_time_to_first_token_seconds_slow:ratio_rate5m{model="tiny"}'),
            }
            return got if all(v is not None for v in got.values()) else None
        got = _wait("the recording rules to have values", recorded, 30, logs)
        assert got["requests/s"] > 0 and got["success/s"] == pytest.approx(got["requests/s"]) and got["tokens/s"] > 0, got
        assert got["errors"] == 0, got  # only successes: 0, not absent
        assert 0 < got["ttft p95"] <= 180 and 0 < got["itl p50"] <= 180 and 0 <= got["slow ttft"] <= 1, got

        # both rule files loaded, every group and rule healthy once evaluated
        expected_groups = {g["name"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]}

        def rules_ok():
            groups = prom.get("/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            healthy = all(r["health"] == "ok" for r in rules)
            return {g["name"] for g in groups} == expected_groups and healthy and rules
        rules = _wait("every rule group loaded and healthy", rules_ok, 30, logs)
        assert {r["name"] for r in rules if r["type"] == "alerting"} == set(ALERTS)
        assert {r["name"] for r in rules if r["type"] == "recording"} == RECORDED
        firing = [a for a in prom.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == "LLMServiceDown"]
        assert firing == []

        # every dashboard query is valid PromQL here, and those on the model's series have data (the drift series
        # only exist once the monitor has a reference profile and enough traffic)
        for panel in _panels(_dashboard()):
            for expr in _exprs(panel):
                result = prom.query(expr.replace("$model", "tiny"))
                names = promql_metric_names(expr)
                if not names & (SERVICE_LEVEL | {r for r in RECORDED if r.startswith("job:")}):
                    assert result, f"panel {panel['title']!r}: {expr} returned nothing"
    finally:
        for proc in reversed(procs):
            _stop(proc)
