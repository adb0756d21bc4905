"""The `llmstack` command line: help for every subcommand, `data` prints the data report of the shipped config,
`eval` writes metrics for any model folder, and mistakes end with exit code 2 and one `error:` line."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from conftest import BASE_MODEL, ROOT, count_rows, need_base_model, run_cli
from llmstack.cli import build_parser


@pytest.mark.parametrize("args, needles", [
    (["--help"], ["train", "eval", "data", "model", "--verbose"]),
    (["train", "--help"], ["--config", "--force", "--resume", "overrides", "train.lr", "method.name"]),
    (["eval", "--help"], ["model", "--config", "--output", "overrides"]),
    (["data", "--help"], ["--config", "--output", "overrides", "report"]),
    (["model", "--help"], ["--models-dir", "smollm2-135m-instruct"]),
])
def test_help_exits_0_and_explains_the_options(args, needles):
    res = run_cli(args, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: llmstack")
    text = " ".join(res.stdout.split())  # argparse wraps lines
    for n in needles:
        assert n in text, f"`llmstack {' '.join(args)}` does not mention {n}"


def test_every_subcommand_has_a_help_line():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, action in sub.choices.items():
        assert action.description, f"`llmstack {name}` has no description"
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values())


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "llmstack"
    assert script.is_file() and os.access(script, os.X_OK)


def test_unknown_command_and_missing_command_exit_2():
    for args in (["fly"], []):
        res = run_cli(args, timeout=120)
        assert res.returncode == 2
        assert "usage: llmstack" in res.stderr


def test_bad_config_for_data_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  max_seq_len: lots\n")
    res = run_cli(["data", "--config", bad], cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: {bad}:2: field 'data.max_seq_len'")


def test_missing_dataset_file_exits_2_naming_it(tmp_path, tiny_model_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train:\n    - path: {tmp_path}/nope.jsonl\n")
    res = run_cli(["data", "--config", cfg], cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "nope.jsonl" in res.stderr and "not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_data_prints_the_report_of_the_shipped_config(tmp_path):
    need_base_model()
    out = tmp_path / "report.json"
    res = run_cli(["data", "--config", "configs/train.yaml", "--output", out], cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
    for split in ("train", "validation", "test"):
        (spec,) = cfg["data"][split]
        rows = count_rows(ROOT / spec["path"])
        (src,) = [s for s in report["sources"] if s["split"] == split]
        assert src["rows_in"] == rows
        assert src["rows_out"] == rows - sum(src["dropped"].values())
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith(f"| {split} | {spec['path']} |")), None)
        assert line is not None, f"no report row for {split}:\n{res.stdout}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == str(rows) and cells[-1] == str(src["rows_out"])
        assert report["splits"][split]["n"] == src["rows_out"]
    assert res.stdout.startswith("# Data report")
    assert report["max_seq_len"] == cfg["data"]["max_seq_len"]
    assert all(s["max"] <= cfg["data"]["max_seq_len"] for s in report["splits"].values())


def test_eval_writes_metrics_for_a_model_folder(tmp_path, tiny_yaml, tiny_model_dir):
    cfg = tiny_yaml(eval={"max_samples": 3, "max_new_tokens": 8})
    out = tmp_path / "metrics.json"
    res = run_cli(["eval", tiny_model_dir, "eval.batch_size=2", "--config", cfg, "--output", out], cwd=tmp_path,
                  timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["model"] == str(tiny_model_dir)
    assert 0 <= m["exact_match"] <= 1 and 0 <= m["json_valid"] <= 1
    assert all(0 <= v <= 1 for v in m["field_accuracy"].values())
    assert m["n"] == 3 and len(result["predictions"]) == 3
    assert math.isfinite(m["loss"]) and m["perplexity"] > 1 and m["answer_tokens"] > 0
    assert "exact match" in res.stdout  # the table is printed too
    assert not (tmp_path / "out").exists(), "eval must not write a training artifact"


def test_eval_accepts_overrides_after_options(tmp_path, tiny_yaml, tiny_model_dir):
    cfg = tiny_yaml(eval={"max_samples": 1, "max_new_tokens": 2})
    out = tmp_path / "metrics.json"
    res = run_cli(["eval", tiny_model_dir, "--config", cfg, "--output", out, "eval.max_samples=2"], cwd=tmp_path,
                  timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(out.read_text())["metrics"]["n"] == 2


def test_eval_of_a_folder_that_is_not_a_model_exits_2(tmp_path, tiny_yaml):
    cfg = tiny_yaml()
    (tmp_path / "empty").mkdir()
    res = run_cli(["eval", tmp_path / "empty", "--config", cfg], cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "config.json" in res.stderr


def test_model_command_reuses_the_provisioned_folder():
    need_base_model()
    if not (BASE_MODEL / "model.safetensors").is_file():
        pytest.skip("the base model weights are not provisioned; this test must not provision them")
    before = {p.name: p.stat().st_mtime_ns for p in BASE_MODEL.iterdir()}
    res = run_cli(["model", "smollm2-135m-instruct", "--models-dir", BASE_MODEL.parent], timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(BASE_MODEL.parent / "smollm2-135m-instruct")
    assert {p.name: p.stat().st_mtime_ns for p in BASE_MODEL.iterdir()} == before  # nothing rebuilt


def test_model_command_with_unknown_name_exits_2(tmp_path):
    res = run_cli(["model", "no-such-model", "--models-dir", tmp_path], cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: ") and "no-such-model" in res.stderr
