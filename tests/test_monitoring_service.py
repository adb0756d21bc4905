"""Live drift in the service, in-process on the tiny ONNX model with the real tokenizer: a reference made from
the model's own answers, in-distribution traffic that does not drift, shifted traffic that does (the /drift JSON
and the llm_drift_* gauges flip), the request log (redacted, rotated) and its export as a training dataset."""
from __future__ import annotations

import sqlite3

import pytest
from serving_fixtures import chat_rows, make_state, sample_value, tiny_drift_reference

from conftest import ROOT
from serving.api import build_app
from serving.runtime import close_state

DRIFT = ROOT / "data" / "drift"
TICKETS = ROOT / "data" / "tickets"


def _send(client, name: str, conversations, max_tokens: int = 6) -> None:
    for msgs in conversations:
        r = client.post("/v1/chat/completions", json={"model": name, "messages": msgs, "max_tokens": max_tokens,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def reference_file(tiny_onnx_dir, tokenizer, tmp_path_factory):
    return tiny_drift_reference(tiny_onnx_dir, tokenizer, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def monitored(tiny_onnx_dir, reference_file, tmp_path_factory):
    from fastapi.testclient import TestClient

    log = tmp_path_factory.mktemp("log") / "requests.sqlite"
    st = make_state(tiny_onnx_dir, monitoring={
        "drift": {"reference": str(reference_file), "window": 40, "min_rows": 30, "interval_s": 0.2},
        "request_log": {"enabled": True, "path": str(log), "max_mb": 64}})
    with TestClient(build_app(st)) as c:
        yield st, c, log
    close_state(st)


def _drift_now(st, client) -> dict:
    st.monitor.flush()
    st.monitor.compute()
    r = client.get("/drift")
    assert r.status_code == 200
    return r.json()


def test_in_distribution_traffic_does_not_drift_and_shifted_traffic_does(monitored):
    st, c, _ = monitored
    snap = c.get("/drift").json()
    assert snap["enabled"] and snap["window"]["size"] == 40 and snap["computed_at"] is None
    held_out = chat_rows(DRIFT / "in_distribution.jsonl")[100:140]  # test rows: never in the reference
    _send(c, st.model_name, held_out)
    d = _drift_now(st, c)
    assert d["window"]["rows"] == 40 and d["computed_at"] is not None
    assert d["dataset_drift"] is False, d["features"]
    assert sample_value(st.registry, "llm_dataset_drift") == 0
    assert sample_value(st.registry, "llm_drift_window_rows") == 40

    _send(c, st.model_name, chat_rows(DRIFT / "language.jsonl", 40))  # the window now holds only German tickets
    d = _drift_now(st, c)
    drifted = {e["name"] for e in d["features"] if e["drift"]}
    assert d["dataset_drift"] is True and {"prompt_novel_token_rate", "prompt_embedding_distance"} <= drifted, d
    assert sample_value(st.registry, "llm_dataset_drift") == 1
    assert sample_value(st.registry, "llm_drift_detected", feature="prompt_novel_token_rate") == 1
    e = next(e for e in d["features"] if e["name"] == "prompt_novel_token_rate")
    assert e["method"] == "ks" and e["score"] < 0.05 and e["current_rows"] == 40
    assert sample_value(st.registry, "llm_drift_score", feature="prompt_novel_token_rate",
                        method="ks") == pytest.approx(e["score"])


def test_request_log_is_redacted_and_exports_as_a_training_dataset(monitored, tmp_path):
    from chatdata import pipeline as data_mod
    from monitoring import requestlog

    st, c, log = monitored
    secret = "Please call me at +44 20 7946 0958 or mail jane.doe@example.com about order 12."
    r = c.post("/v1/chat/completions", json={"model": st.model_name, "max_tokens": 5, "temperature": 0,
                                             "messages": [{"role": "user", "content": secret}]})
    assert r.status_code == 200
    r2 = c.post("/v1/completions", json={"model": st.model_name, "prompt": "Ticket: router down", "max_tokens": 4})
    assert r2.status_code == 200
    st.monitor.flush()
    rows = {x["id"]: x for x in requestlog.read(log)}
    row = rows[r.json()["id"]]
    assert "jane.doe" not in row["prompt"] and "[EMAIL]" in row["prompt"] and "[PHONE]" in row["prompt"]
    assert row["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert row["output"] == requestlog.redact_builtin(r.json()["choices"][0]["message"]["content"])
    assert row["e2e_s"] >= row["ttft_s"] > 0 and row["model"] == st.model_name and row["status"] == "success"
    assert set(row["features"]) >= {"prompt_tokens", "output_tokens", "prompt_embedding_distance"}
    assert rows[r2.json()["id"]]["endpoint"] == "completion"

    out = tmp_path / "review.jsonl"
    n = requestlog.export(log, out)
    assert n == sum(1 for x in rows.values() if x["status"] == "success" and x["output"])
    loaded, _ = data_mod.load_file(out)
    fmt = data_mod.detect_format(set(loaded[0]), out)
    errors: list = []
    examples = [data_mod.to_example(x, fmt, f"{out}:{i + 1}", errors) for i, x in enumerate(loaded)]
    assert fmt == "chat" and not errors and all(e is not None for e in examples)
    assert examples[0].messages[-1]["role"] == "assistant"


def test_request_log_rotates_at_its_size_cap(tmp_path):
    from monitoring.requestlog import RequestLog, read

    log = RequestLog(tmp_path / "r.sqlite", max_mb=0.05, keep=2)
    big = "x" * 5000
    for i in range(60):
        log.write([{"id": f"r{i}", "ts": float(i), "prompt": big, "output": "ok", "status": "success"}])
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.1.sqlite", "r.2.sqlite", "r.sqlite"], files
    assert all(p.stat().st_size <= 0.05 * (1 << 20) + 16384 for p in tmp_path.iterdir())
    newest = [r["id"] for r in read(tmp_path / "r.sqlite")]
    assert "r59" in newest and log.rotations >= 3  # the oldest rotated file was dropped, the newest rows kept
    with sqlite3.connect(tmp_path / "r.2.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] > 0


def test_bad_redaction_hook_is_a_clear_error(tmp_path):
    from core.errors import ConfigError
    from monitoring.requestlog import RequestLog

    with pytest.raises(ConfigError, match="monitoring.request_log.redact.*cannot import"):
        RequestLog(tmp_path / "r.sqlite", redact="no_such_module:scrub")
    with pytest.raises(ConfigError, match="builtin, none or module:function"):
        RequestLog(tmp_path / "r.sqlite", redact="scrub")
    assert not (tmp_path / "r.sqlite").exists()


def test_drift_report_command_writes_html_matching_the_live_verdict(monitored, reference_file, tmp_path):
    from conftest import run_cli
    from monitoring import drift, requestlog

    st, c, log = monitored
    _send(c, st.model_name, chat_rows(DRIFT / "domain.jsonl", 35))
    st.monitor.flush()
    out = tmp_path / "report.html"
    r = run_cli(["drift", "report", "--log", str(log), "--reference", str(reference_file), "--out", str(out),
                 "--last", "35"])
    assert r.returncode == 0, r.stderr
    expected = drift.compare(drift.Reference.load(reference_file),
                             [x["features"] for x in requestlog.read(log) if x["status"] == "success"][-35:])
    assert ("DATASET DRIFT" in r.stdout) == expected["dataset_drift"] and expected["dataset_drift"]
    page = out.read_text()
    assert all(f in page for f in drift.FEATURES) and page.count("data:image/png;base64,") >= 5
    bad = run_cli(["drift", "report", "--log", str(tmp_path / "missing.sqlite"), "--reference",
                   str(reference_file)])
    assert bad.returncode == 2 and "no request log here" in bad.stderr and "missing.sqlite" in bad.stderr


def test_drift_demo_flips_on_the_real_server(tiny_onnx_dir, reference_file):
    from serving_fixtures import start_server, stop_server

    from conftest import run_cli

    proc, base, _ = start_server(tiny_onnx_dir, [f"monitoring.drift.reference={reference_file}",
                                              "monitoring.drift.window=40", "monitoring.drift.interval_s=0.5"])
    try:
        r = run_cli(["drift", "demo", "--url", base, "--sets", "in_distribution,language", "--max-tokens", "4"],
                    timeout=300)
    finally:
        stop_server(proc)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {ln.split(":")[0].strip(): ln for ln in r.stdout.splitlines() if ":" in ln and "share" in ln}
    assert " ok " in lines["in_distribution"] and "DRIFT" in lines["language"], r.stdout
    assert "prompt_novel_token_rate" in lines["language"]
