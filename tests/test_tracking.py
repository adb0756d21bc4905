"""Experiment tracking (tracking/): a finished run is logged to MLflow and read back with the real MLflow client
(parameters, per-step loss, the manifest's metrics, reports and plots, lineage tags); a broken tracking server is a
warning and the run still completes."""
from __future__ import annotations

import json
import logging

import pytest
from conftest import run_cli, write_yaml

from core import artifacts


@pytest.fixture
def tracked(monkeypatch, tmp_path):
    """Tracking on (conftest turns it off for the other tests), into a fresh SQLite store."""
    monkeypatch.setenv("LLMSTACK_TRACKING", "on")
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # also for the CLI subprocesses (never the repository's store)
    return uri


def test_a_training_run_is_logged_and_reads_back(tracked, tiny_config):
    from mlflow import MlflowClient

    from training.sft import recipe

    cfg = tiny_config([f"tracking.uri={tracked}", "train.max_steps=4", "train.logging_steps=1"])
    art = recipe.run(cfg)
    manifest = json.loads((art / artifacts.MANIFEST).read_text())
    client = MlflowClient(tracking_uri=tracked)
    exp = client.get_experiment_by_name("llmstack-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == manifest["run_id"]
    assert run.data.tags["llmstack.run_id"] == manifest["run_id"] and run.data.tags["llmstack.stage"] == "train"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["method.name"] == cfg.method.name
    loss = client.get_metric_history(run.info.run_id, "step.loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]                      # the loss curve, per step
    assert loss[-1].value == pytest.approx(manifest["training"]["final_train_loss"], rel=1e-3)
    after = manifest["metrics"]["after"]
    assert run.data.metrics["metrics.after.json_valid"] == pytest.approx(after["json_valid"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "data_report.md", "manifest.json", "loss_curve.png", "train_history.json"} <= names

    again = run_cli(["track", str(art)])                               # an existing artifact, logged on demand
    assert again.returncode == 0, again.stderr
    second = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id != run.info.run_id]
    assert len(second) == 1 and second[0].data.tags["llmstack.run_id"] == manifest["run_id"]
    assert [m.value for m in client.get_metric_history(second[0].info.run_id, "step.loss")] == \
        [m.value for m in loss]                                        # the loss curve from train_history.json
    bad = run_cli(["track", str(art / "merged")])
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr


def test_a_broken_tracking_server_is_a_warning_and_the_run_completes(tracked, tiny_config, monkeypatch, caplog):
    from training.sft import recipe

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = tiny_config(["tracking.uri=http://127.0.0.1:9"])           # nothing listens there
    with caplog.at_level(logging.WARNING):
        art = recipe.run(cfg)
    assert (art / artifacts.MANIFEST).is_file() and (art / "merged" / "config.json").is_file()
    assert any("MLflow tracking failed" in r.getMessage() for r in caplog.records)


def test_a_compress_manifest_logs_each_variants_measurements(tracked, tmp_path):
    from mlflow import MlflowClient

    from tracking.config import TrackingCfg
    from tracking.runs import record

    folder = tmp_path / "compress-run"
    folder.mkdir()
    variants = {"onnx-int8": {"summary": {"size_mb": 137.2, "decode_tokens_per_s": 40.4, "task_score": 0.89},
                              "gate": {"score": 0.89, "drop": 0.0, "fit": True}},
                "onnx-int4": {"summary": {"size_mb": 110.0, "decode_tokens_per_s": None, "task_score": 0.87},
                              "gate": {"score": 0.87, "drop": 0.02, "fit": True}}}
    artifacts.write_json(folder / artifacts.MANIFEST, {"stage": "compress", "run_id": "c1", "parent":
                                                        {"run_id": "t1"}, "config": {"gate": {"max_drop": 0.02}},
                                                        "variants": variants})
    (folder / "report.md").write_text("# report\n")
    rid = record(folder, TrackingCfg(uri=tracked))
    run = MlflowClient(tracking_uri=tracked).get_run(rid)
    m = run.data.metrics
    assert m["variant.onnx-int8.summary.size_mb"] == 137.2 and m["variant.onnx-int4.gate.drop"] == 0.02
    assert "variant.onnx-int4.summary.decode_tokens_per_s" not in m   # not measured: not logged as a number
    assert run.data.tags["llmstack.parent_run_id"] == "t1" and run.data.params["gate.max_drop"] == "0.02"
    assert record(folder, TrackingCfg(uri=tracked, enabled=False)) is None


def test_tracking_is_off_with_the_environment_switch(tmp_path, monkeypatch):
    from tracking.config import TrackingCfg
    from tracking.runs import record

    monkeypatch.setenv("LLMSTACK_TRACKING", "off")
    write_yaml(tmp_path / "x.yaml", {})
    assert record(tmp_path, TrackingCfg(uri=f"sqlite:///{tmp_path / 'never.db'}")) is None
    assert not (tmp_path / "never.db").exists()


def test_serve_registers_what_it_serves_and_serves_models_uris(tracked, tiny_model_dir, tmp_path):
    """llmstack serve registers the served folder (version + lineage tags) and sets @production; serving
    models:/llmstack@production serves that folder again and reuses its version; an unknown alias is refused."""
    import httpx
    from mlflow import MlflowClient
    from serving_fixtures import start_server, stop_server

    env = {"LLMSTACK_TRACKING": "on", "MLFLOW_TRACKING_URI": tracked}
    proc, base, _ = start_server(tiny_model_dir, log_path=tmp_path / "a.log", **env)
    stop_server(proc)
    client = MlflowClient(tracking_uri=tracked, registry_uri=tracked)
    prod = client.get_model_version_by_alias("llmstack", "production")
    assert prod.source == str(tiny_model_dir.resolve()) and prod.tags["llmstack.path"] == prod.source

    proc, base, _ = start_server("models:/llmstack@production", log_path=tmp_path / "b.log", **env)
    try:
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        stop_server(proc)
    assert [v.version for v in client.search_model_versions("name='llmstack'")] == [prod.version]  # reused
    bad = run_cli(["serve", "--model", "models:/llmstack@staging"], timeout=120)
    assert bad.returncode == 2 and "model.path" in bad.stderr and "models:/llmstack@staging" in bad.stderr


def test_preference_and_tune_runs_are_logged_too(tracked, tmp_path, tiny_model_dir, tiny_data):
    """A DPO run lands in llmstack-train with its recipe and per-step loss; a 2-trial study in llmstack-tune, each
    trial's training run in llmstack-train."""
    from conftest import read_jsonl, tiny_config_dict, write_jsonl
    from mlflow import MlflowClient

    from core.config import load
    from training.config import TrainConfig
    from training.preference import recipe as preference
    from training.tune import search as tune

    rows = read_jsonl(tiny_data["train"])[:4]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
         "rejected": r["output"].replace('"urgency": "', '"urgency": "x')} for r in rows])
    cfg = tiny_config_dict(tiny_model_dir, {"train": pairs, "validation": pairs, "test": pairs}, tmp_path / "dpo")
    cfg.update(recipe="dpo")
    cfg["data"].update(validation=[], val_ratio=0, dedup_near=False)
    cfg["train"].update(max_steps=2, save_steps=50)
    dpo = preference.run(load(TrainConfig, write_yaml(tmp_path / "dpo.yaml", cfg)))
    client = MlflowClient(tracking_uri=tracked)
    (run,) = client.search_runs([client.get_experiment_by_name("llmstack-train").experiment_id])
    assert run.data.params["recipe"] == "dpo" and run.data.tags["llmstack.artifact"].endswith(dpo.name)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step.loss")] == [1, 2]

    base = tiny_config_dict(tiny_model_dir, tiny_data, tmp_path / "trials")
    write_yaml(tmp_path / "base.yaml", base)
    study = write_yaml(tmp_path / "tune.yaml", {
        "base": str(tmp_path / "base.yaml"), "space": {"train.lr": {"type": "categorical", "choices": [1e-3, 5e-3]}},
        "sampler": {"name": "grid"}, "budget": {"n_trials": None}, "pruning": {"pruner": "none"},
        "output": {"dir": str(tmp_path / "tune"), "run_id": "t1"}})
    tune.run(*tune.load_tune(study))
    (study_run,) = client.search_runs([client.get_experiment_by_name("llmstack-tune").experiment_id])
    assert study_run.data.tags["llmstack.run_id"] == "t1"
    trials = client.search_runs([client.get_experiment_by_name("llmstack-train").experiment_id])
    assert sorted(r.data.params["train.lr"] for r in trials if r.info.run_id != run.info.run_id) == ["0.001", "0.005"]
