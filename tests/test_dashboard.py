"""The built-in dashboard (/dashboard) in a real headless Chromium: against the real server on the tiny ONNX model
with live drift monitoring (the numbers it shows agree with /metrics and /drift; a live screenshot with traffic
flowing, for the README), and against a stub server with known histograms and each /drift state, behind a path
prefix. Plus the page itself in-process: offline (no external resources) and open without the API key.

Chromium runs two ways: `--dump-dom` after a virtual-time budget (timers and fetches run without real waiting) for
the assertions, and the DevTools protocol over a pipe for real time (rates need real seconds) and the screenshot."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from browser import Browser, chromium, dump_dom, png_size
from conftest import ROOT
from serving_fixtures import chat_rows, metric_sum, tiny_drift_reference

KEY = "dashboard-test-key"
SCREENSHOT = ROOT / "benchmarks" / "results" / "dashboard.png"
TICKETS, SHIFTS = ROOT / "data" / "tickets", ROOT / "data" / "drift"


# ---------------------------------------------------------------- reading the page and /metrics
def points(dom: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r'data-chart="([\w-]+)" data-points="(\d+)"', dom)}


def shown(dom: str, element_id: str) -> float:
    """The number shown in a stat block (its data-value)."""
    m = re.search(r'id="%s".*?data-value="([^"]*)"' % re.escape(element_id), dom, re.S)
    assert m and m[1], f"no value for #{element_id}"
    return float(m[1])


def shown_quantile(dom: str, key: str, q: str) -> float:
    block = re.search(r'id="n-%s">(.*?)</div></div>' % key, dom, re.S)[1]
    m = re.search(r'<span>%s</span><b data-value="([^"]*)"' % q, block)
    return float(m[1])


def status(dom: str) -> str:
    return re.search(r'<div class="status" id="status">(.*?)</div>', dom, re.S)[1]


def drift_section(dom: str) -> str:
    return re.search(r'<section class="card wide" id="drift">(.*?)</section>', dom, re.S)[1]


def histogram_quantile(q: float, text: str, name: str) -> float:
    """Prometheus's histogram_quantile over the cumulative buckets of `name`, summed over label sets."""
    by_le: dict[float, float] = {}
    for line in text.splitlines():
        m = re.match(r'%s_bucket\{.*le="([^"]+)".*\} (\S+)$' % re.escape(name), line)
        if m:
            le = float("inf") if m[1] == "+Inf" else float(m[1])
            by_le[le] = by_le.get(le, 0.0) + float(m[2])
    buckets = sorted(by_le.items())
    n = buckets[-1][1]
    rank = q * n
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, count = 0.0, buckets[b][1]
    if b > 0:
        start, count, rank = buckets[b - 1][0], count - buckets[b - 1][1], rank - buckets[b - 1][1]
    return start + (buckets[b][0] - start) * rank / count


# ---------------------------------------------------------------- the page in-process
def test_page_is_offline_and_open_without_the_key():
    from fastapi.testclient import TestClient

    from serving.api import Guard, build_app
    from serving.config import ServeConfig
    app = build_app(None)
    app.add_middleware(Guard, api_key=KEY, open_routes=ServeConfig().auth.open_routes)
    with TestClient(app) as c:
        r = c.get("/dashboard")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert c.get("/drift").json() == {"enabled": False}
        assert c.get("/v1/models").status_code == 401  # the key is enforced elsewhere
    assert "<script>" in html and "<style>" in html and 'fetch(url' in html
    assert not re.search(r"https?://|//cdn|<link|<script[^>]+src|<img|@import|url\(", html, re.I), \
        "the dashboard must load no external resources"
    assert '"metrics"' in html and '"drift"' in html  # relative URLs: works behind a path prefix


# ---------------------------------------------------------------- a stub server: known numbers, each drift state
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, "+Inf")


def _hist(name: str, counts_by_adapter: dict[str, tuple]) -> str:
    out = []
    for adapter, counts in counts_by_adapter.items():
        for le, c in zip(BUCKETS, counts):
            out.append(f'{name}_bucket{{adapter="{adapter}",backend="onnxruntime",le="{le}",model="stub m"}} {c:.1f}')
        out.append(f'{name}_count{{adapter="{adapter}",backend="onnxruntime",model="stub m"}} {counts[-1]:.1f}')
    return "\n".join(out)


STUB_METRICS = "\n".join([
    "# HELP llm_time_to_first_token_seconds Time from arrival to the first generated token",
    "# TYPE llm_time_to_first_token_seconds histogram",
    _hist("llm_time_to_first_token_seconds", {"": (1, 4, 9, 10, 10, 10), "a1": (0, 2, 3, 6, 7, 7)}),
    _hist("llm_inter_token_latency_seconds", {"": (50, 90, 99, 100, 100, 100)}),
    _hist("llm_e2e_request_latency_seconds", {"": (0, 0, 1, 8, 16, 17)}),
    'llm_generation_tokens_total{adapter="",backend="onnxruntime",model="stub m"} 400.0',
    'llm_prompt_tokens_total{adapter="",backend="onnxruntime",model="stub m"} 90.0',
    'llm_requests_total{adapter="",backend="onnxruntime",finish_reason="length",model="stub m",status="success"} 17.0',
    'llm_requests_total{adapter="a1",backend="onnxruntime",finish_reason="none",model="stub m",status="rejected"} 2.0',
    'llm_requests_running{adapter="",backend="onnxruntime",model="stub m"} 1.0',
    'llm_requests_waiting{adapter="",backend="onnxruntime",model="stub m"} 3.0',
    'llm_model_info{adapter="",backend="onnxruntime",model="stub m",run_id="r \\"7\\"",variant="int8 dynamic"} 1.0',
    "",
])


def _feature(name, kind, method, score, threshold, drift):
    return {"name": name, "kind": kind, "method": method, "score": score, "threshold": threshold, "drift": drift,
            "reference_rows": 350, "current_rows": 57}


DRIFT_ON = {"enabled": True, "reference": {"path": "runs/x/drift_reference.json", "rows": 350},
            "window": {"size": 200, "rows": 57, "min_rows": 30}, "computed_at": "2026-11-23T10:00:00Z",
            "dataset_drift": True, "drift_share": 0.5, "share_threshold": 0.5,
            "features": [_feature("prompt_tokens", "numeric", "ks", 0.31, 0.05, False),
                         _feature("prompt_novel_token_rate", "numeric", "ks", 1.2e-9, 0.05, True),
                         _feature("prompt_embedding_distance", "numeric", "wasserstein", 0.42, 0.1, True),
                         _feature("finish_reason", "categorical", "chisquare", 0.8, 0.05, False)]}
DRIFT_COLLECTING = {**DRIFT_ON, "computed_at": None, "window": {"size": 200, "rows": 12, "min_rows": 30},
                    "dataset_drift": None, "drift_share": None, "features": []}


def growing_metrics(n: int) -> str:
    """The metrics after n scrapes of a server where each scrape interval adds two slow (0.5-1 s) first tokens to
    fifty fast ones from before, and 30 generated tokens."""
    return "\n".join([_hist("llm_time_to_first_token_seconds", {"": (50, 50, 50, 50, 50 + 2 * n, 50 + 2 * n)}),
                      f'llm_generation_tokens_total{{adapter="",backend="onnxruntime",model="g"}} {30.0 * n}', ""])


@pytest.fixture
def stub():
    """/p/dashboard, /p/metrics, /p/drift (the page behind a path prefix); `drift` is what /p/drift answers (an int:
    that HTTP error); with `grow`, /p/metrics answers growing_metrics(number of earlier scrapes)."""
    from serving.dashboard import page
    state = {"drift": DRIFT_ON, "grow": False, "scrapes": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            status, ctype, body = 404, "text/plain", b"not found"
            if path == "/p/dashboard":
                status, ctype, body = 200, "text/html; charset=utf-8", page().encode()
            elif path == "/p/metrics":
                text = growing_metrics(state["scrapes"]) if state["grow"] else STUB_METRICS
                state["scrapes"] += 1
                status, ctype, body = 200, "text/plain; version=0.0.4", text.encode()
            elif path == "/p/drift" and isinstance(state["drift"], int):
                status, body = state["drift"], b"boom"
            elif path == "/p/drift":
                status, ctype, body = 200, "application/json", json.dumps(state["drift"]).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/p/dashboard?refresh=1"
    yield state
    server.shutdown()
    server.server_close()


def test_stub_quantiles_model_and_every_drift_state(stub, tmp_path):
    dom = dump_dom(stub["url"], tmp_path, budget_ms=3500)
    assert 'data-ready="1"' in dom and "NaN" not in dom and "undefined" not in dom
    for key, name in (("ttft", "llm_time_to_first_token_seconds"), ("itl", "llm_inter_token_latency_seconds"),
                      ("e2e", "llm_e2e_request_latency_seconds")):
        for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            assert shown_quantile(dom, key, label) == pytest.approx(histogram_quantile(q, STUB_METRICS, name)), \
                (key, label)
    assert shown(dom, "req-total") == 19
    assert re.search(r'<span>running</span><b data-value="1"', dom) and re.search(r'<span>waiting</span><b '
                                                                                  r'data-value="3"', dom)
    assert 'id="model-name">stub m<' in dom and "int8 dynamic" in dom and "r &quot;7&quot;" in dom
    pts = points(dom)
    assert pts["ttft"] >= 9 and pts["tokens"] >= 2 and pts["load"] >= 6, pts  # 3 lines; rates from the 2nd scrape
    section = drift_section(dom)
    assert "DATASET DRIFT" in section and "drift share 50% (threshold 50%)" in section
    rows = dict(re.findall(r'data-feature="([\w]+)" data-drift="(\d)"', section))
    assert rows == {"prompt_tokens": "0", "prompt_novel_token_rate": "1", "prompt_embedding_distance": "1",
                    "finish_reason": "0"}
    assert "1.2e-9" in section and all(pts[f"drift-{f}"] >= 3 for f in rows), pts

    stub["drift"] = DRIFT_COLLECTING
    section = drift_section(dump_dom(stub["url"], tmp_path, budget_ms=1500))
    assert "collecting: 12 of 30" in section and "data-feature" not in section

    stub["drift"] = {"enabled": False}
    section = drift_section(dump_dom(stub["url"], tmp_path, budget_ms=1500))
    assert "drift monitoring off" in section

    stub["drift"] = 500  # an error is shown, not thrown; the metrics still render
    dom = dump_dom(stub["url"], tmp_path, budget_ms=1500)
    assert 'data-ready="1"' in dom and re.search(r'class="err">drift: HTTP 500<', dom)
    assert "drift monitoring off" in drift_section(dom) and points(dom)["ttft"] > 0


def test_stub_window_quantiles_and_rates_use_the_delta(stub, tmp_path):
    stub["grow"] = True
    dom = dump_dom(stub["url"] + "&window=5", tmp_path, budget_ms=9000)  # ~9 scrapes, 1 s apart in virtual time
    assert 'data-ready="1"' in dom and "err" not in status(dom)
    # the last 5 s hold only the 10 slow observations: p50 = 0.5 + 0.5 * 5/10; since start it would be < 0.1 s
    assert re.search(r'id="w-ttft">10 observed · last 5 s<', dom)
    assert shown_quantile(dom, "ttft", "p50") == pytest.approx(0.75)
    assert shown_quantile(dom, "ttft", "p99") == pytest.approx(0.5 + 0.5 * 9.9 / 10)
    assert shown(dom, "n-tokens") == pytest.approx(30, rel=0.02)  # tokens/s
    # no observations at all in the window: a dash, no point drawn, never NaN
    assert re.search(r'id="w-itl">0 observed · last 5 s<', dom) and "NaN" not in dom
    assert re.search(r'<span>p50</span><b data-value="">—</b>', re.search(r'id="n-itl">(.*?)</div></div>', dom)[1])
    assert points(dom)["itl"] == 0


# ---------------------------------------------------------------- the real server, drift monitoring on
@pytest.fixture(scope="module")
def reference(tiny_onnx_dir, tokenizer, tmp_path_factory) -> Path:
    return tiny_drift_reference(tiny_onnx_dir, tokenizer, tmp_path_factory.mktemp("drift-ref"), max_tokens=8)


@pytest.fixture(scope="module")
def server(tiny_onnx_dir, reference, tmp_path_factory):
    from serving_fixtures import start_server, stop_server
    chromium()  # skip before starting anything
    proc, base, _ = start_server(tiny_onnx_dir, [f"monitoring.drift.reference={reference}",
                                                 "monitoring.drift.window=40", "monitoring.drift.min_rows=30",
                                                 "monitoring.drift.interval_s=1"],
                                 log_path=tmp_path_factory.mktemp("dash-server") / "serve.log", LLMSTACK_API_KEY=KEY)
    yield base
    stop_server(proc)


def _complete(client: httpx.Client, base: str, prompt: str, max_tokens: int) -> dict:
    r = client.post(base + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_real_server_dashboard_agrees_with_metrics(server, tmp_path):
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        sent = [_complete(client, server, f"Where is my parcel {i}?", 8) for i in range(4)]
    dom = dump_dom(server + "/dashboard?refresh=1", tmp_path)  # no key: the page and its fetches are open
    metrics = httpx.get(server + "/metrics").text
    drift = httpx.get(server + "/drift").json()
    assert 'data-ready="1"' in dom and "NaN" not in dom and "err" not in status(dom), status(dom)
    pts = points(dom)
    for chart in ("ttft", "itl", "e2e", "tokens", "requests", "load"):
        assert pts.get(chart, 0) > 0, (chart, pts)
    assert 'id="model-name">tiny<' in dom and "onnxruntime" in dom
    total = metric_sum(metrics, "llm_requests_total")
    assert total >= len(sent) and shown(dom, "req-total") == total
    assert shown(dom, "n-tokens") == 0  # no traffic while the page ran
    assert re.search(r'<span>output tokens total</span><b data-value="%g"' % metric_sum(
        metrics, "llm_generation_tokens_total"), dom)
    # no scrape 60 s old yet: quantiles over everything since the server started, as histogram_quantile gives them
    assert shown_quantile(dom, "e2e", "p50") == pytest.approx(
        histogram_quantile(0.5, metrics, "llm_e2e_request_latency_seconds"))
    section = drift_section(dom)
    if not drift.get("enabled"):
        assert "drift monitoring off" in section
    elif not drift.get("computed_at"):
        assert "collecting:" in section
    else:
        assert ("DATASET DRIFT" if drift["dataset_drift"] else "no dataset drift") in section
        assert all(f'data-feature="{f["name"]}"' in section for f in drift["features"])


def test_real_server_live_screenshot(server, tmp_path):
    """Real time (DevTools protocol) with traffic flowing while the page refreshes: in-distribution tickets from one
    client, German ones from another (so the live monitor's window drifts). The rates move, the drift table shows
    what /drift says, and the screenshot (1280x900) goes to benchmarks/results/dashboard.png for the README."""
    stop, done, errors = threading.Event(), [], []

    def traffic(chats: list[list[dict]]):
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            i = 0
            while not stop.is_set():
                r = client.post(server + "/v1/chat/completions", json={
                    "model": "tiny", "messages": chats[i % len(chats)], "max_tokens": (8, 24, 48, 16)[i % 4],
                    "temperature": 0})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                done.append(r.json())
                i += 1
                time.sleep(0.05 * (i % 3))

    browser = Browser(tmp_path)
    threads = [threading.Thread(target=traffic, args=(chat_rows(SHIFTS / name),))
               for name in ("in_distribution.jsonl", "language.jsonl")]
    try:
        browser.open(server + "/dashboard?refresh=1", 1280, 900)
        browser.wait_for("document.body.dataset.ready === '1'")
        for t in threads:
            t.start()
        time.sleep(12)
        browser.wait_for("document.querySelectorAll('#drift-table [data-feature]').length > 0")
        time.sleep(1.5)  # another refresh or so: the sparklines have points
        stop.set()
        rate = browser.js("+document.querySelector('#n-tokens b').dataset.value")
        state = browser.js("JSON.stringify([...document.querySelectorAll('[data-chart]')].map("
                           "e => [e.dataset.chart, +e.dataset.points]))")
        text = browser.js("document.body.innerText")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        stop.set()
        for t in threads:
            if t.ident:
                t.join(60)
        browser.close()
    drift = httpx.get(server + "/drift").json()
    assert not errors, errors
    assert len(done) >= 10 and rate > 0, (len(done), rate)
    charts = dict(json.loads(state))
    assert all(n >= 5 for chart, n in charts.items() if not chart.startswith("drift-")), charts
    assert drift["computed_at"] and {f"drift-{f['name']}" for f in drift["features"]} <= set(charts), (drift, charts)
    assert all(charts[f"drift-{f['name']}"] > 0 for f in drift["features"]), charts
    assert "NaN" not in text and "undefined" not in text
    path = tmp_path / "dashboard.png"
    path.write_bytes(shot)
    assert png_size(path) == (1280, 900)
    assert len(shot) > 20_000 and len(set(shot)) > 200, "the screenshot looks blank"
    if os.environ.get("LLMSTACK_UPDATE_SCREENSHOTS") == "1":  # the README's picture; off by default (clean tree)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOT)
