"""`llmstack harness` (lm-eval on our local tasks: model folder, ONNX variant, served endpoint) and `llmstack report`
(side by side), on the tiny models, offline."""
from __future__ import annotations

import json

import httpx
import pytest
from serving_fixtures import free_port, metric_sum, start_server, stop_server

from conftest import read_jsonl, run_cli

SHIPPED = ["tickets_category_mc", "tickets_triage", "tickets_urgency_mc"]
TRIAGE_METRICS = {"exact_match", "json_valid", "acc_category", "acc_product", "acc_urgency"}


# ---------------------------------------------------------------- the task definitions
def test_triage_scoring_matches_eval_definitions():
    from evaluation.harness.tasks.utils import triage_results

    doc = {"output": json.dumps({"category": "billing", "product": "orbit_app", "urgency": "high", "summary": "x"})}
    right = triage_results(doc, ['{"category": "Billing", "product": "orbit_app", "urgency": "high", "summary": "y"}'])
    assert right == {"json_valid": 1.0, "exact_match": 1.0, "acc_category": 1.0, "acc_product": 1.0,
                     "acc_urgency": 1.0}
    one_off = triage_results(doc, ['{"category": "billing", "product": "pulse_watch", "urgency": "high"}'])
    assert one_off["exact_match"] == 0.0 and one_off["acc_product"] == 0.0 and one_off["acc_category"] == 1.0
    assert triage_results(doc, ["not json at all"]) == {"json_valid": 0.0, "exact_match": 0.0, "acc_category": 0.0,
                                                          "acc_product": 0.0, "acc_urgency": 0.0}


def test_choice_sets_come_from_the_gold_answers(tiny_data):
    from evaluation.harness.tasks.utils import CATEGORIES, URGENCIES, category_choices, urgency_choices

    rows = read_jsonl(tiny_data["test"])
    cat, urg = category_choices(str(tiny_data["test"]))["test"], urgency_choices(str(tiny_data["test"]))["test"]
    assert len(cat) == len(urg) == len(rows) == 4
    for doc, u, row in zip(cat, urg, rows):
        gold = json.loads(row["output"])
        assert doc["choices"] == CATEGORIES and CATEGORIES[doc["gold"]] == gold["category"]
        assert URGENCIES[u["gold"]] == gold["urgency"] and doc["ticket"] == row["input"]


# ---------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def hf_run(tiny_model_dir, tiny_data, tmp_path_factory):
    from evaluation.harness import run as harness
    out = tmp_path_factory.mktemp("harness-hf")
    return harness.run(model=str(tiny_model_dir), data=str(tiny_data["test"]), out=str(out), batch_size=4,
                       threads=1), out


def test_harness_on_the_tiny_hf_folder(hf_run, tiny_model_dir):
    summary, out = hf_run
    assert summary["kind"] == "pytorch" and summary["model"] == str(tiny_model_dir)
    assert sorted(summary["tasks"]) == SHIPPED
    for task, r in summary["tasks"].items():
        assert r["n"] == 4, task  # every row of the 4-row test file, no --limit
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values()), r
    assert set(summary["tasks"]["tickets_triage"]["metrics"]) == TRIAGE_METRICS
    assert summary["tasks"]["tickets_triage"]["output_type"] == "generate_until"
    assert set(summary["tasks"]["tickets_category_mc"]["metrics"]) == {"acc", "acc_norm"}
    assert summary["tasks"]["tickets_category_mc"]["output_type"] == "multiple_choice"
    # the aggregate is the mean of the per-document scores written beside it
    samples = read_jsonl(out / "samples_tickets_triage.jsonl")
    assert len(samples) == 4
    for m in TRIAGE_METRICS:
        assert summary["tasks"]["tickets_triage"]["metrics"][m] == pytest.approx(
            sum(s["metrics"][m] for s in samples) / 4, abs=1e-4)
    assert json.loads((out / "results.json").read_text())["tasks"] == summary["tasks"]
    assert "| tickets_triage | generate_until | 4 | exact_match |" in (out / "results.md").read_text()


def test_harness_on_an_onnx_variant_matches_pytorch(hf_run, tiny_onnx_dir, tiny_data):
    """The ONNX export of the same weights ranks the choices like transformers does (our ONNX Runtime path)."""
    from evaluation.harness import run as harness
    onnx = harness.run(model=str(tiny_onnx_dir), tasks=["tickets_category_mc", "tickets_urgency_mc"], limit=3,
                       data=str(tiny_data["test"]), batch_size=4, threads=1)
    assert onnx["kind"] == "onnx" and sorted(onnx["tasks"]) == ["tickets_category_mc", "tickets_urgency_mc"]
    samples_hf = {t: read_jsonl(hf_run[1] / f"samples_{t}.jsonl")[:3] for t in onnx["tasks"]}
    for task, r in onnx["tasks"].items():
        assert r["n"] == 3
        expected = sum(s["metrics"]["acc"] for s in samples_hf[task]) / 3
        assert r["metrics"]["acc"] == pytest.approx(expected, abs=1e-4), task


# ---------------------------------------------------------------- the served endpoint
def test_harness_through_the_served_endpoint(tiny_onnx_dir, tmp_path):
    from core.errors import ConfigError
    from evaluation.harness import run as harness

    proc, base, log = start_server(tiny_onnx_dir)
    try:
        before = metric_sum(httpx.get(base + "/metrics").text, "llm_requests_total", model="tiny")
        res = harness.run(endpoint=base, limit=3, out=str(tmp_path / "ep"))  # /v1 appended
        assert res["endpoint"] == base + "/v1" and res["served_model"] == "tiny"
        assert list(res["tasks"]) == ["tickets_triage"]  # the generate_until tasks only, by default
        assert res["tasks"]["tickets_triage"]["n"] == 3
        assert set(res["tasks"]["tickets_triage"]["metrics"]) == TRIAGE_METRICS
        assert all(0.0 <= v <= 1.0 for v in res["tasks"]["tickets_triage"]["metrics"].values())
        assert len(read_jsonl(tmp_path / "ep" / "samples_tickets_triage.jsonl")) == 3
        metrics = httpx.get(base + "/metrics").text
        assert metric_sum(metrics, "llm_requests_total", model="tiny") - before == 3  # one chat request per document
        assert metric_sum(metrics, "llm_requests_total", model="tiny", status="success") - before == 3

        # a loglikelihood task is refused before any request is sent, and says why and what to do instead
        with pytest.raises(ConfigError) as exc:
            harness.run(endpoint=base + "/v1", tasks=["tickets_category_mc"])
        assert "tickets_category_mc: multiple_choice tasks score per-token log-probabilities" in str(exc.value)
        assert "logprobs/echo with 400" in str(exc.value) and "--model" in str(exc.value)
        assert metric_sum(httpx.get(base + "/metrics").text, "llm_requests_total", model="tiny") - before == 3
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- bad input
def test_harness_bad_input(tmp_path, tiny_model_dir):
    from core.errors import StackError
    from evaluation.harness import run as harness

    def message(**kw) -> str:
        with pytest.raises(StackError) as exc:
            harness.run(**kw)
        return str(exc.value)

    msg = message(model=str(tiny_model_dir), tasks=["tickets_triage", "hellaswag_nope"])
    assert "unknown task 'hellaswag_nope'" in msg and "shipped tasks: " + ", ".join(SHIPPED) in msg
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'}: not a model folder" in message(model=str(tmp_path / "empty"))
    assert f"{tmp_path / 'missing'}: model not found" in message(model=str(tmp_path / "missing"))
    port = free_port()
    msg = message(endpoint=f"http://127.0.0.1:{port}/v1")
    assert f"endpoint http://127.0.0.1:{port}/v1 does not answer" in msg and "llmstack serve" in msg
    assert "--limit must be a positive number of documents per task, got 0" in message(model=str(tiny_model_dir),
                                                                                        limit=0)
    assert f"{tmp_path / 'no.jsonl'}: field '--data': task data file not found" in message(model=str(tiny_model_dir),
                                                                           data=str(tmp_path / "no.jsonl"))

    # what the user sees on the command line: one line and exit code 2
    r = run_cli(["harness", "--model", tmp_path / "empty"])
    assert r.returncode == 2 and r.stderr.startswith(f"error: {tmp_path / 'empty'}: not a model folder")
    for bad in ("0", "-3"):
        r = run_cli(["harness", "--model", tiny_model_dir, "--limit", bad])
        assert r.returncode == 2 and f"--limit: must be a positive number of documents, got {bad}" in r.stderr
    r = run_cli(["harness", "--model", tiny_model_dir, "--endpoint", "http://127.0.0.1:1/v1"])
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_harness_help_names_every_option():
    r = run_cli(["harness", "--help"])
    assert r.returncode == 0
    for opt in ("--model", "--endpoint", "--tasks", "--limit", "--data", "--out", "--batch-size", "--threads",
                "--timeout", *SHIPPED, "refuses logprobs"):
        assert opt in r.stdout, opt


# ---------------------------------------------------------------- the side-by-side report
def test_report_lists_every_model_with_every_metric(tiny_model_dir, tiny_onnx_dir, tiny_yaml, tmp_path):
    from evaluation import report as eval_report

    cfg = tiny_yaml()
    rep = eval_report.run([f"hf={tiny_model_dir}", f"onnx={tiny_onnx_dir}"], config=str(cfg), limit=2,
                          tasks=["tickets_triage", "tickets_category_mc"], out=str(tmp_path / "rep"), threads=1)
    out = tmp_path / "rep"
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "report.png"}
    assert list(rep["models"]) == ["hf", "onnx"]
    assert rep["models"]["onnx"]["runtime"] == "onnxruntime" and rep["models"]["hf"]["runtime"] == "transformers"
    expected = {"answer_loss", "perplexity", "exact_match", "json_valid", "bleu", "rougeL", "size_mb",
                *(f"{k}:{f}" for k in ("accuracy", "f1") for f in ("category", "product", "urgency")),
                *(f"harness:tickets_triage:{m}" for m in TRIAGE_METRICS),
                "harness:tickets_category_mc:acc", "harness:tickets_category_mc:acc_norm"}
    for name, m in rep["models"].items():
        assert expected <= set(m["metrics"]), (name, expected - set(m["metrics"]))
        assert m["n_rows"] == 2 and m["harness_n"] == {"tickets_triage": 2, "tickets_category_mc": 2}
    # same weights: the ONNX Runtime perplexity agrees with transformers'
    assert rep["models"]["onnx"]["metrics"]["perplexity"] == pytest.approx(
        rep["models"]["hf"]["metrics"]["perplexity"], rel=1e-3)
    md = (out / "report.md").read_text()
    assert "| metric | hf | onnx |" in md
    for k in expected:
        assert f"| {k} |" in md, k
    assert json.loads((out / "report.json").read_text())["metrics"] == rep["metrics"]


def test_report_bad_input(tmp_path, tiny_model_dir):
    r = run_cli(["report", "--models", f"a={tiny_model_dir}", f"a={tiny_model_dir}", f"b={tmp_path / 'nope'}",
                 "--out", tmp_path / "r"])
    assert r.returncode == 2
    assert "model name 'a' given twice" in r.stderr and f"b: {tmp_path / 'nope'}: model not found" in r.stderr
    r = run_cli(["report", "--models", f"a={tiny_model_dir}", "--limit", "0"])
    assert r.returncode == 2 and "--limit: must be a positive number" in r.stderr
