"""Retraining from served traffic end to end on the tiny model (`llmstack retrain`): a request log with German
(drifted) tickets → a reviewed export → a candidate whose lineage names the served model and whose data report shows
both sources → old vs new on the same rows → a decision recorded in MLflow → with --promote the running
`llmstack serve` answering from the candidate; drifted selection, the rule, and bad input."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest
from conftest import PY, ROOT, cli_env, read_jsonl, write_jsonl, write_yaml
from serving_fixtures import chat_rows, make_state, start_server, stop_server, tiny_drift_reference

from core import artifacts

DRIFT = ROOT / "data" / "drift"
KEY = "retrain-test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, tiny_data, tokenizer):
    """A tiny training artifact as `make train` makes one; its drift reference re-made from the demo's 700 training
    prompts and 100 validation prompts (the tiny run's 8 and 4 are too few to call a request an outlier)."""
    from conftest import tiny_config_dict

    from core.config import validate
    from training.config import TrainConfig
    from training.sft import recipe as sft

    out = tmp_path_factory.mktemp("served")
    cfg = validate(TrainConfig, tiny_config_dict(tiny_model_dir, tiny_data, out / "train") | {"drift": {"enabled": False}})
    folder = sft.run(cfg)
    tiny_drift_reference(folder / "merged", tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def request_log(served, tmp_path_factory):
    """The service's request log after 12 English and 24 German tickets (answers from the served model)."""
    from fastapi.testclient import TestClient

    from serving.api import build_app
    from serving.runtime import close_state

    path = tmp_path_factory.mktemp("log") / "requests.sqlite"
    st = make_state(served, monitoring={"request_log": {"enabled": True, "path": str(path)}})
    english = chat_rows(DRIFT / "in_distribution.jsonl", 12)
    german = chat_rows(DRIFT / "language.jsonl", 24)
    with TestClient(build_app(st)) as c:
        for msgs in english + german:
            r = c.post("/v1/chat/completions", json={"model": st.model_name, "messages": msgs, "max_tokens": 6,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
    st.monitor.flush()
    close_state(st)
    return path


def reviewed(request_log, folder) -> tuple:
    """What a reviewer does with `llmstack log export`: German rows corrected to the generator's reference answers,
    one English row corrected by hand, the rest rejected or left pending (the tiny model's answers are noise)."""
    export = folder / "export.jsonl"
    out = _cli(["log", "export", "--log", str(request_log), "--out", str(export)])
    assert out.returncode == 0, out.stderr
    answers = {f"{r['instruction']}\n\n{r['input']}": r["output"] for r in read_jsonl(DRIFT / "language_labeled.jsonl")}
    rows = read_jsonl(export)
    assert len(rows) == 36 and all(r["review"] == "pending" for r in rows)
    english = 0
    for r in rows:
        prompt = r["messages"][0]["content"]
        if prompt in answers:
            r["messages"][-1]["content"], r["review"] = answers[prompt], "corrected"
        else:
            english += 1
            r["review"] = "corrected" if english == 1 else "rejected" if english < 12 else "pending"
            if english == 1:
                r["messages"][-1]["content"] = ('{"category": "technical", "product": "nimbus_router", "urgency": '
                                                '"medium", "summary": "Router problem."}')
    return write_jsonl(folder / "review.jsonl", rows), answers


def retrain_yaml(folder, served, review, **updates) -> str:
    data = {"served": str(served), "output_dir": str(folder / "retrain"),
            "traffic": {"select": "review", "review": str(review), "min_rows": 5, "holdout": 0.3},
            "training": {"output_dir": str(folder / "retrain-train"),
                         "overrides": ["train.max_steps=2", "train.threads=1", "data.dedup_near=false",
                                       "eval.max_samples=2"]},
            "evaluate": {"max_rows": 4}, "promotion": {"max_heldout_drop": 1.0, "min_drifted_gain": -1.0}}
    for k, v in updates.items():
        data[k] = data.get(k, {}) | v if isinstance(v, dict) else v
    return str(write_yaml(folder / "retrain.yaml", data))


def _cli(args, **env):
    return subprocess.run([PY, "-m", "llmstack", *args], cwd=ROOT, env=cli_env(**env), capture_output=True,
                          text=True, timeout=900)


def test_retrain_from_reviewed_traffic_and_promote_into_the_running_service(served, request_log, tmp_path):
    from mlflow import MlflowClient

    review, _ = reviewed(request_log, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"LLMSTACK_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "LLMSTACK_API_KEY": KEY}
    proc, base, _ = start_server(served, ["registry.enabled=false"], LLMSTACK_API_KEY=KEY)
    try:
        cfg = retrain_yaml(tmp_path, served, review, service={"url": base})
        out = _cli(["retrain", "--config", cfg, "--promote"], **env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "Decision: **promote**" in out.stdout and "now answers from" in out.stdout

        record = tmp_path / "retrain" / "latest"
        m = artifacts.read_manifest(record)
        assert m["stage"] == "retrain" and m["decision"]["promote"] and m["promoted"]["swapped"]
        # 24 corrected German rows + 1 corrected English row; 30% held out to score the drifted traffic
        assert m["traffic"]["review_counts"] == {"accepted": 0, "corrected": 25, "rejected": 10, "pending": 1}
        assert m["traffic"]["train_rows"] + m["traffic"]["holdout_rows"] == 25 and m["traffic"]["holdout_rows"] == 8
        rows_dir = ROOT / m["traffic"]["folder"]
        held = read_jsonl(rows_dir / "drifted_holdout.jsonl")
        trained = {r["messages"][0]["content"] for r in read_jsonl(rows_dir / "traffic_train.jsonl")}
        assert not trained & {r["messages"][0]["content"] for r in held}  # scored rows never trained on
        for name, n in (("held_out", 4), ("drifted", 4)):
            for who in ("served", "candidate"):
                score = m["evaluation"][name][who]
                assert score["n"] == n and 0 <= score["exact_match"] <= 1 and 0 <= score["json_valid"] <= 1
        assert "| held-out | 4 |" in (record / "report.md").read_text()

        # lineage: the candidate continues the served training artifact, with both data sources in its report
        cand = artifacts.read_manifest(ROOT / m["candidate"]["training"])  # relative to the repository, or absolute
        assert cand["parent"]["path"] == str(served) and cand["parent"]["run_id"] == served.name
        sources = {s["path"]: s for s in cand["datasets"] if s["split"] == "train"}
        assert set(sources) == {str(rows_dir / "traffic_train.jsonl"), str(served / "data" / "train.jsonl")}
        assert sources[str(rows_dir / "traffic_train.jsonl")]["rows_out"] == 17
        assert "traffic_train.jsonl" in (ROOT / m["candidate"]["training"] / "data_report.md").read_text()
        assert m["parent"]["training"].endswith(served.name)

        # the decision in MLflow, with the rule and both models' scores
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("llmstack-retrain")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.data.tags["llmstack.decision"] == "promote"
        assert run.data.params["promotion.max_heldout_drop"] == "1.0"
        assert run.data.metrics["metrics.held_out.served"] == m["metrics"]["held_out"]["served"]

        # the running service answers from the candidate; clients keep the name they had
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hallo"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == m["promoted"]["model"] != "tiny"
    finally:
        stop_server(proc)


def test_the_rule_keeps_the_served_model_without_a_gain(served, request_log, tmp_path):
    from llmstack.retrain.config import RetrainConfig
    from llmstack.retrain.recipe import decide

    cfg = RetrainConfig(promotion={"max_heldout_drop": 0.02, "min_drifted_gain": 0.0}, traffic={"holdout": 0.2})
    scores = lambda h0, h1, d0, d1: {"held_out": {"served": {"exact_match": h0}, "candidate": {"exact_match": h1}},  # noqa: E731
                                     "drifted": {"served": {"exact_match": d0}, "candidate": {"exact_match": d1}}}
    assert decide(scores(0.89, 0.88, 0.20, 0.60), cfg)["promote"]          # -1 point held-out, +40 drifted
    no = decide(scores(0.89, 0.85, 0.20, 0.60), cfg)                         # -4 points held-out
    assert not no["promote"] and not no["checks"]["no_heldout_regression"] and "beyond" in no["reasons"][0]
    assert not decide(scores(0.89, 0.89, 0.20, 0.20), cfg)["promote"]       # no gain on the drifted rows


def test_drifted_selection_takes_the_german_tickets(served, request_log, tmp_path):
    from core.config import validate
    from llmstack.retrain.config import RetrainConfig
    from llmstack.retrain.recipe import locate_served, select_traffic

    cfg = validate(RetrainConfig, {"served": str(served), "traffic": {"select": "drifted", "min_rows": 5,
                                                                      "request_log": str(request_log)}})
    picked = select_traffic(cfg, locate_served(str(served)), tmp_path)
    rows = read_jsonl(tmp_path / "traffic_train.jsonl") + read_jsonl(tmp_path / "drifted_holdout.jsonl")
    german = [r for r in rows if "Grüße" in r["messages"][0]["content"] or "Gruß" in r["messages"][0]["content"]
              or "Danke im Voraus" in r["messages"][0]["content"]]
    assert picked["train_rows"] + picked["holdout_rows"] == len(rows) >= 20
    assert len(german) >= 0.9 * len(rows)  # the English tickets are in distribution
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)  # the served model's own answers


def test_bad_input_is_named(served, request_log, tmp_path):
    review, _ = reviewed(request_log, tmp_path)
    lines = review.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "x"}], "review": "maybe"})
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.loads(x) for x in lines])
    out = _cli(["retrain", "--config", retrain_yaml(tmp_path, served, bad)])
    assert out.returncode == 2 and "bad.jsonl" in out.stderr and "line 3" in out.stderr and "'review'" in out.stderr
    out = _cli(["retrain", "--config", retrain_yaml(tmp_path, served, review, traffic={"min_rows": 100})])
    assert out.returncode == 2 and "traffic.min_rows=100" in out.stderr
    out = _cli(["retrain", "--config", retrain_yaml(tmp_path, served, review), "traffic.select=review",
                "traffic.review=null"])
    assert out.returncode == 2 and "traffic.review names no file" in out.stderr
    out = _cli(["retrain", "--config", retrain_yaml(tmp_path, served, review, evaluate={"drifted": str(review)})])
    assert out.returncode == 2 and "also selected for training" in out.stderr and "evaluate.drifted" in out.stderr
    assert not list((tmp_path / "retrain").rglob("*.json*"))  # nothing half-written
