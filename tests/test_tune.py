"""`llmstack tune`: grid / random / TPE searches on the tiny model cover exactly what they should, stay in bounds and
within their trial count and wall time, prune an obviously bad trial, write a results table that lists every trial,
and save a best.yaml that loads as a TrainConfig with the best trial's values; bad tune configs fail with the file,
line and field, before anything is written."""
from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, tiny_config_dict, write_yaml
from core.config import load
from core.errors import StackError
from training.config import TrainConfig
from training.sft import recipe as sft
from training.tune import config as tune_config
from training.tune import search as tune

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def make_tune(tmp_path, tiny_model_dir, tiny_data):
    """Factory: a base tiny train config plus a tune config (dict updates merged in) under tmp_path; returns the
    tune config's path."""

    def make(space: dict, base_train: dict | None = None, name: str = "tune.yaml", **sections) -> Path:
        base = tiny_config_dict(tiny_model_dir, tiny_data, tmp_path / "train-out")
        base["train"].update(base_train or {})
        write_yaml(tmp_path / "base.yaml", base)
        data = {"base": str(tmp_path / "base.yaml"), "space": space,
                "budget": {"n_trials": 3}, "output": {"dir": str(tmp_path / "tune"), "run_id": "t1"}}
        for key, value in sections.items():
            data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
        return write_yaml(tmp_path / name, data)

    return make


def search(path: Path) -> Path:
    cfg, base = tune.load_tune(path)
    return tune.run(cfg, base)


def rows(out: Path) -> list[dict]:
    return json.loads((out / "trials.json").read_text())


def test_grid_covers_exactly_the_grid_and_best_yaml_reproduces_the_best_trial(make_tune):
    path = make_tune({"train.lr": {"type": "categorical", "choices": [1e-3, 5e-3]},
                      "method.lora_r": {"type": "int", "low": 2, "high": 4, "step": 2}},
                     sampler={"name": "grid"}, budget={"n_trials": None}, pruning={"pruner": "none"})
    out = search(path)
    trials = rows(out)
    seen = sorted((r["train.lr"], r["method.lora_r"]) for r in trials)
    assert seen == sorted(itertools.product([1e-3, 5e-3], [2, 4])), "every grid point once, nothing else"
    assert [r["state"] for r in trials] == ["complete"] * 4
    # the results table lists every trial with its state, in all three formats
    md = (out / "trials.md").read_text()
    for r in trials:
        assert any(line.startswith(f"| {r['trial']} | complete |") for line in md.splitlines())
    with open(out / "trials.csv") as f:
        assert [(int(r["trial"]), r["state"]) for r in csv.DictReader(f)] == [(r["trial"], "complete") for r in trials]
    assert (out / "tune.png").read_bytes()[:8] == PNG
    assert (out / "study.db").is_file()
    # best: the lowest validation loss; best.yaml is the base config with its values, a ready TrainConfig
    best = min(trials, key=lambda r: r["value"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tune" and manifest["best"]["trial"] == best["trial"]
    assert manifest["trials"] == {"complete": 4} and manifest["finished"]
    cfg = load(TrainConfig, out / "best.yaml")
    assert cfg.train.lr == best["train.lr"] and cfg.method.lora_r == best["method.lora_r"]
    base = load(TrainConfig, path.parent / "base.yaml")
    assert cfg.output.dir == base.output.dir and cfg.output.run_id is None
    assert cfg.model_dump(exclude={"train": {"lr"}, "method": {"lora_r"}}) == \
        base.model_dump(exclude={"train": {"lr"}, "method": {"lora_r"}})
    # the trial's own manifest agrees: its value is its validation loss, with these parameters
    trial_manifest = json.loads((out / best["artifact"] / "manifest.json").read_text())
    assert trial_manifest["metrics"]["validation_loss"] == pytest.approx(best["value"])
    assert trial_manifest["config"]["train"]["lr"] == cfg.train.lr
    assert trial_manifest["config"]["method"]["lora_r"] == cfg.method.lora_r
    # only the best trial keeps its merged model
    assert sorted(p.parent.name for p in (out / "trials").glob("trial-*/merged")) == [Path(best["artifact"]).name]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_stay_in_bounds_and_run_n_trials(make_tune, sampler):
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "method.lora_r": {"type": "int", "low": 2, "high": 6},
             "method.lora_alpha": {"type": "categorical", "choices": [4, 8]},
             "train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2}}
    out = search(make_tune(space, base_train={"max_steps": 2}, sampler={"name": sampler, "n_startup_trials": 1},
                           budget={"n_trials": 4}, pruning={"pruner": "none"}))
    trials = rows(out)
    assert len(trials) == 4 and all(r["state"] == "complete" for r in trials)
    for r in trials:
        assert 1e-4 <= r["train.lr"] <= 1e-2
        assert 2 <= r["method.lora_r"] <= 6 and isinstance(r["method.lora_r"], int)
        assert r["method.lora_alpha"] in (4, 8)
        assert 0.0 <= r["train.warmup_ratio"] <= 0.2
    assert len({r["train.lr"] for r in trials}) == 4, "the sampler draws new values per trial"


def test_timeout_bounds_the_wall_time(make_tune):
    """A trial far longer than the budget is stopped at the deadline, and no other trial starts."""
    path = make_tune({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                     base_train={"max_steps": 5000}, sampler={"name": "random"},
                     budget={"n_trials": 20, "timeout_s": 6}, pruning={"pruner": "none"})
    t0 = time.time()
    out = search(path)
    elapsed = time.time() - t0
    assert elapsed < 6 + 20, f"the search took {elapsed:.0f} s with a 6 s budget"
    trials = rows(out)
    assert len(trials) == 1
    assert trials[0]["state"] == "pruned" and trials[0]["note"].startswith("time budget")
    assert not (out / "best.yaml").exists(), "no trial completed"
    assert not list((out / "trials" / ".work").glob("*")), "the stopped trial's work folder is removed"


def test_median_pruner_stops_an_obviously_bad_trial(make_tune):
    """Two good trials (lr 1e-2) first, then lr 1e-8, which barely moves: its validation loss at the first eval step
    is above the median of the others' at that step, so it stops there."""
    path = make_tune({"train.lr": {"type": "float", "low": 1e-9, "high": 1e-1, "log": True}},
                     base_train={"max_steps": 6}, sampler={"name": "random"}, budget={"n_trials": 3},
                     enqueue=[{"train.lr": 1e-2}, {"train.lr": 2e-2}, {"train.lr": 1e-8}],
                     pruning={"pruner": "median", "eval_steps": 2, "n_startup_trials": 2, "n_warmup_steps": 0})
    out = search(path)
    trials = rows(out)
    assert [r["train.lr"] for r in trials] == [1e-2, 2e-2, 1e-8]
    assert [r["state"] for r in trials] == ["complete", "complete", "pruned"], trials
    bad = trials[2]
    assert bad["last_step"] == 2 and bad["note"].startswith("pruned at step 2")
    assert bad["value"] is None, "a pruned trial has no objective value in the table"
    assert bad["last_validation_loss"] > max(t["validation_losses"]["2"] for t in trials[:2])
    assert set(trials[0]["validation_losses"]) == {"2", "4", "6"}, "the loss is reported at every eval step"
    assert "| 2 | pruned |" in (out / "trials.md").read_text()
    assert not (out / "trials" / "trial-002").exists(), "a pruned trial writes no artifact"


def test_interrupted_search_resumes(make_tune, monkeypatch):
    path = make_tune({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                     base_train={"max_steps": 2}, sampler={"name": "random"}, budget={"n_trials": 3},
                     pruning={"pruner": "none"})
    cfg, base = tune.load_tune(path)
    real, calls = sft.run, []

    def killed_on_second(c, **kw):
        calls.append(c.output.run_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(c, **kw)

    monkeypatch.setattr(sft, "run", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        tune.run(cfg, base)
    monkeypatch.setattr(sft, "run", real)
    res = run_cli(["tune", "--config", path, "--resume", "t1"], timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    out = path.parent / "tune" / "t1"
    states = [r["state"] for r in rows(out)]
    assert states.count("complete") == 3, states  # 1 before the interruption, 2 after: budget.n_trials in all
    assert states.count("fail") == 1, "the trial the interruption killed is recorded as failed"
    # the best config is ready to train as it is
    res = run_cli(["train", "--config", out / "best.yaml"], timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    trained = json.loads((path.parent / "train-out" / "latest" / "manifest.json").read_text())
    best = json.loads((out / "manifest.json").read_text())["best"]
    assert trained["config"]["train"]["lr"] == best["params"]["train.lr"]


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


LR = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}


@pytest.mark.parametrize("space, sections, key_line, field, needles", [
    ({"train.lrr": LR}, {}, "train.lrr:", "space.train.lrr",
     ["unknown parameter 'train.lrr'", "did you mean train.lr"]),
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, {}, "low: 0.01", "space.train.lr.low",
     ["low (0.01) must be below high (0.001)"]),
    ({"method.lora_r": {"type": "categorical", "choices": []}}, {}, "choices: []", "space.method.lora_r.choices",
     ["non-empty `choices`"]),
    ({"train.warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2}}, {"sampler": {"name": "grid"}},
     "train.warmup_ratio:", "space.train.warmup_ratio.step", ["grid sampler needs a `step`"]),
    ({"train.lr": LR}, {"budget": {"n_trials": None}}, "budget:", "budget",
     ["neither budget.n_trials nor budget.timeout_s"]),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2}}, {}, "train.lr:", "space.train.lr",
     ["0.0 is not a valid train.lr", "greater than 0"]),
])
def test_bad_tune_config_names_file_line_and_field(make_tune, space, sections, key_line, field, needles):
    path = make_tune(space, **sections)
    with pytest.raises(StackError) as info:
        tune.load_tune(path)
    msg = str(info.value)
    assert f"{path}:{_line_of(path, key_line)}" in msg, msg
    assert f"field '{field}'" in msg, msg
    for n in needles:
        assert n in msg, msg
    assert not (path.parent / "tune").exists(), "nothing is written for a bad config"


def test_cli_bad_input_is_one_error_line_and_exit_2(make_tune):
    path = make_tune({"train.lrr": LR, "method.lora_r": {"type": "int", "low": 8, "high": 8}})
    res = run_cli(["tune", "--config", path], timeout=120)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: 2 problems") and "unknown parameter 'train.lrr'" in err
    assert "low (8) must be below high (8)" in err
    assert "Traceback" not in err
    assert not (path.parent / "tune").exists()


def test_tune_help_explains_every_option():
    res = run_cli(["tune", "--help"], timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for needle in ["--config", "--resume", "overrides", "space", "sampler.name", "objective.metric",
                   "budget.n_trials", "budget.timeout_s", "pruning.pruner", "pruning.eval_steps", "trials.keep_merged",
                   "output.dir", "best.yaml"]:
        assert needle in text, needle


def test_shipped_tune_config_loads(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, base = tune.load_tune("configs/tune.yaml")
    assert cfg.space and base.train.max_steps > 0
    for name in cfg.space:
        assert name in tune_config._leaf_fields(TrainConfig)


def test_resume_refuses_changes_other_than_the_budget(make_tune):
    path = make_tune({"train.lr": LR})
    res = run_cli(["tune", "--config", path, "--resume", "t1", "sampler.name=grid"], timeout=120)
    assert res.returncode == 2 and "only budget.* overrides are allowed (got sampler.name=grid)" in res.stderr
    res = run_cli(["tune", "--config", path, "--resume", "nope", "budget.n_trials=9"], timeout=120)
    assert res.returncode == 2 and "no such search to resume" in res.stderr, res.stderr
