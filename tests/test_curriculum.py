"""Continued pre-training and staged curricula (training/sft/curriculum.py): stage layout, one learning-rate schedule
across the stages, per-stage metrics with the forgetting watch, and bad configs refused with the field named."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chatdata.pipeline import Example
from conftest import ROOT, read_jsonl, run_cli, run_until_killed, tiny_config_dict, write_jsonl, write_yaml
from core.config import load
from core.errors import ConfigError, StackError
from training.config import CurriculumCfg, TrainConfig
from training.sft import curriculum
from training.sft import recipe as sft


@pytest.fixture(scope="module")
def cur_data(tmp_path_factory) -> dict[str, Path]:
    """Small real rows: 6 domain documents (raw text), 8 general instructions, 4 general held-out rows."""
    folder = tmp_path_factory.mktemp("curriculum-data")
    corpus = read_jsonl(ROOT / "data" / "corpus" / "domain.jsonl")[:6]
    general = read_jsonl(ROOT / "data" / "general" / "train.jsonl")
    held = read_jsonl(ROOT / "data" / "general" / "test.jsonl")
    return {"cpt": write_jsonl(folder / "cpt.jsonl", [{"text": r["text"][:600]} for r in corpus]),
            "general": write_jsonl(folder / "general.jsonl", general[:8]),
            "general_eval": write_jsonl(folder / "general_eval.jsonl", held[:4])}


def curriculum_dict(tiny_model_dir, tiny_data, cur_data, out_dir, **cur) -> dict:
    cfg = tiny_config_dict(tiny_model_dir, tiny_data, out_dir)
    del cfg["data"]["train"]
    cfg["train"].pop("max_steps")
    cfg["train"].update(batch_size=2, logging_steps=1, save_steps=50, scheduler="cosine", warmup_ratio=0.0)
    cfg["curriculum"] = {
        "datasets": {"cpt": {"path": str(cur_data["cpt"]), "format": "text"},
                     "general": {"path": str(cur_data["general"])},
                     "domain": {"path": str(tiny_data["train"])}},
        "general_eval": [{"path": str(cur_data["general_eval"])}],
        "stages": [{"name": "inject", "mix": {"cpt": 0.5, "general": 0.5}, "rows": 6},
                   {"name": "blend", "mix": {"general": 0.25, "domain": 0.75}, "rows": 8},
                   {"name": "domain", "mix": {"domain": 1.0}, "epochs": 0.5}]} | cur
    return cfg


# ---------------------------------------------------------------- the stage layout
def _pool(prefix: str, n: int) -> list[Example]:
    return [Example(f"{prefix}:{i}", text=f"{prefix} {i}", input_ids=[i, i], labels=[i, i]) for i in range(n)]


def _plan(mixing="proportions", step_rows=4, seed=1, **stage):
    cur = CurriculumCfg(datasets={"a": {"path": "a.jsonl"}, "b": {"path": "b.jsonl"}}, mixing=mixing,
                        stages=[{"name": "s1", "mix": {"a": 0.25, "b": 0.75}} | stage if mixing == "proportions"
                                else {"name": "s1", "mix": {"a": 2.0, "b": 0.5}} | stage,
                                {"name": "s2", "mix": {"b": 1.0}}])
    pools = {curriculum.dataset_split("a"): _pool("a", 10), curriculum.dataset_split("b"): _pool("b", 30)}
    return curriculum.build(cur, pools, step_rows, seed)


def _origin(stage) -> Counter:
    return Counter(ex.source.split(":")[0] for ex in stage.rows)


def test_proportions_give_each_dataset_its_share_and_stages_fill_whole_steps():
    s1, s2 = _plan()
    assert s1.composition == {"a": 10, "b": 30}  # 25% / 75% of the 40 rows the two datasets hold
    assert _origin(s1) == {"a": 10, "b": 30}
    assert (s1.start, s1.end, s2.start, s2.end) == (0, 10, 10, 18)  # contiguous; 30 rows -> 8 steps of 4 (2 padded)
    assert s2.padded == 2 and len(s2.rows) == 32 and set(_origin(s2)) == {"b"}  # padding stays inside the stage
    assert all(len(s.rows) % 4 == 0 for s in (s1, s2))


def test_stage_rows_epochs_max_steps_and_upsampling():
    (s1, _) = _plan(rows=20)
    assert s1.composition == {"a": 5, "b": 15} and len(s1.rows) == 20
    (s1, _) = _plan(rows=8, epochs=2.5)  # 2.5 passes over 8 rows = 20 rows
    assert len(s1.rows) == 20 and s1.steps == 5
    (s1, _) = _plan(max_steps=3)
    assert s1.steps == 3 and len(s1.rows) == 12
    (s1, _) = _plan(mixing="upsample", step_rows=5)  # a x2 (20 rows: every row twice), b x0.5 (15 of 30)
    assert s1.composition == {"a": 20, "b": 15} and s1.padded == 0
    assert Counter(ex.source for ex in s1.rows if ex.source.startswith("a")) == {f"a:{i}": 2 for i in range(10)}


def test_layout_is_seeded():
    first, again, other = _plan(seed=7), _plan(seed=7), _plan(seed=8)
    assert [e.source for s in first for e in s.rows] == [e.source for s in again for e in s.rows]
    assert [e.source for s in first for e in s.rows] != [e.source for s in other for e in s.rows]


# ---------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def cur_run(tmp_path_factory, tiny_model_dir, tiny_data, cur_data):
    tmp = tmp_path_factory.mktemp("curriculum-run")
    cfg = load(TrainConfig, write_yaml(tmp / "cur.yaml", curriculum_dict(tiny_model_dir, tiny_data, cur_data,
                                                                           tmp / "out")))
    artifact = sft.run(cfg)
    return artifact, json.loads((artifact / "manifest.json").read_text())


def test_curriculum_run_reports_every_stage_beside_the_forgetting_watch(cur_run):
    artifact, manifest = cur_run
    stages = manifest["curriculum"]["stages"]
    assert [s["name"] for s in stages] == ["inject", "blend", "domain"]
    # inject: 6 rows (3 CPT documents + 3 general) = 3 steps of 2; blend: 2 general + 6 domain = 4 steps;
    # domain: half a pass over the 8 domain rows = 2 steps
    assert [s["composition"] for s in stages] == [{"cpt": 3, "general": 3}, {"general": 2, "domain": 6},
                                                  {"domain": 8}]
    assert [s["step_range"] for s in stages] == [[1, 3], [4, 7], [8, 9]]
    assert manifest["training"]["steps"] == 9
    # CPT rows are trained on every token, instruction rows on the answer only
    assert stages[0]["loss_tokens"] > stages[1]["loss_tokens"]

    rows = manifest["curriculum"]["metrics"]
    assert [r["name"] for r in rows] == ["base", "inject", "blend", "domain"]
    for r in rows:  # the domain validation set and the general held-out set, before training and after each stage
        assert r["validation_loss"] > 0 and r["general_loss"] > 0, r
        assert r["general_perplexity"] == pytest.approx(2.718281828 ** r["general_loss"], rel=1e-3)
    for r in rows[1:]:
        assert r["general_change"] == pytest.approx(r["general_loss"] - rows[0]["general_loss"], abs=1e-4)
        assert r["train_loss"] > 0
    assert manifest["training"]["validation_loss"] == rows[-1]["validation_loss"]
    assert (artifact / "curriculum.png").stat().st_size > 10_000
    assert "## Curriculum stages" in (artifact / "data_report.md").read_text()
    card = (artifact / "README.md").read_text()
    assert "## Curriculum" in card and "| blend |" in card


def test_one_learning_rate_schedule_runs_across_the_stages(cur_run):
    artifact, manifest = cur_run
    rows = manifest["curriculum"]["metrics"][1:]
    # cosine without warm-up over all 9 steps: the rate only falls, and no stage starts again at the peak
    lrs = [x for r in rows for x in (r["lr_first_logged"], r["lr_last_logged"])]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs), lrs
    assert rows[1]["lr_first_logged"] < rows[0]["lr_last_logged"]
    assert rows[0]["lr_first_logged"] == pytest.approx(manifest["training"]["effective_lr"])  # the peak, once
    assert max(r["lr_first_logged"] for r in rows[1:]) < 0.9 * manifest["training"]["effective_lr"]


def test_trainer_reads_the_stages_in_order(tiny_model_dir, tiny_data, cur_data, tmp_path):
    from modeling.model import load_model, load_tokenizer

    cfg = load(TrainConfig, write_yaml(tmp_path / "c.yaml", curriculum_dict(tiny_model_dir, tiny_data, cur_data,
                                                                              tmp_path / "out")))
    tok = load_tokenizer(str(tiny_model_dir))
    from chatdata import pipeline as data_mod

    prepared = data_mod.prepare(cfg.data, tok, 42, extra=curriculum.extra_splits(cfg.curriculum))
    stages = curriculum.attach(cfg, prepared, 2)
    trainer, _ = sft.build_trainer(cfg, load_model(str(tiny_model_dir)), tok, prepared, tmp_path, pack=False,
                                   fast=False, stages=stages)  # fast=False: no shared prefix split off
    seen = []
    for batch in trainer.get_train_dataloader():
        for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            seen.append([t for t, m in zip(row, mask) if m])
    assert seen == [ex.input_ids for ex in prepared.train]
    assert trainer.args.max_steps == stages[-1].end == 9
    assert set(trainer.eval_dataset) == {"validation", "general"}


# ---------------------------------------------------------------- bad input
def _load(tmp_path, tiny_model_dir, tiny_data, cur_data, edit=None, **cur):
    data = curriculum_dict(tiny_model_dir, tiny_data, cur_data, tmp_path / "out", **cur)
    if edit:
        edit(data)
    return load(TrainConfig, write_yaml(tmp_path / "bad.yaml", data))


def _error(tmp_path, *args, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, *args, **kw)
    return str(exc.value)


def test_a_stage_naming_a_missing_dataset_is_refused(tmp_path, tiny_model_dir, tiny_data, cur_data):
    msg = _error(tmp_path, tiny_model_dir, tiny_data, cur_data,
                 stages=[{"name": "s", "mix": {"domain": 0.5, "domian": 0.5}}])
    assert "stage 's' names dataset 'domian'" in msg and "defined: cpt, general, domain" in msg
    assert re.search(r"bad\.yaml:\d+: field 'curriculum\.stages\.0\.mix\.domian'", msg), msg


@pytest.mark.parametrize("stage, mixing, expect", [
    ({"name": "s", "mix": {"cpt": 0.7, "domain": 0.6}}, "proportions", "weights sum to 1.3"),
    ({"name": "s", "mix": {"cpt": 0.5, "domain": 0.2}}, "proportions", "must sum to 1"),
    ({"name": "s", "mix": {"cpt": 1.5, "domain": -0.5}}, "upsample", "must be positive numbers, got domain: -0.5"),
    ({"name": "s", "mix": {"cpt": 0.0, "domain": 1.0}}, "proportions", "must be positive numbers, got cpt: 0.0"),
    ({"name": "s", "mix": {}}, "proportions", "stage 's' names no dataset"),
    ({"name": "s", "mix": {"domain": 1.0}, "rows": 4}, "upsample", "rows applies to mixing: proportions"),
])
def test_weights_that_do_not_sum_sensibly_are_refused(tmp_path, tiny_model_dir, tiny_data, cur_data, stage, mixing,
                                                      expect):
    msg = _error(tmp_path, tiny_model_dir, tiny_data, cur_data, stages=[stage], mixing=mixing)
    assert expect in msg and "curriculum" in msg


@pytest.mark.parametrize("edit, expect", [
    (lambda d: d["data"].update(train=[{"path": "x.jsonl"}]), "data.train and curriculum.stages are both set"),
    (lambda d: d["data"].update(validation=[]), "need data.validation"),
    (lambda d: d["train"].update(max_steps=5), "train.max_steps does not apply to a curriculum"),
    (lambda d: d["train"].update(eval_steps=2, save_steps=2, early_stopping_patience=1), "part-way through a stage"),
    (lambda d: d.update(recipe="dpo"), "work with recipe sft"),
    (lambda d: d["curriculum"]["stages"].append({"name": "inject", "mix": {"domain": 1.0}}), "named twice"),
    (lambda d: d["curriculum"]["datasets"]["cpt"].update(weight=2.0), "not used in a curriculum"),
])
def test_conflicting_settings_are_refused(tmp_path, tiny_model_dir, tiny_data, cur_data, edit, expect):
    assert expect in _error(tmp_path, tiny_model_dir, tiny_data, cur_data, edit=edit)


def test_cli_names_the_file_and_line(tmp_path, tiny_model_dir, tiny_data, cur_data):
    data = curriculum_dict(tiny_model_dir, tiny_data, cur_data, tmp_path / "out",
                           stages=[{"name": "only", "mix": {"nope": 1.0}}])
    res = run_cli(["train", "--config", write_yaml(tmp_path / "cli.yaml", data)])
    assert res.returncode != 0
    line = next(i for i, text in enumerate((tmp_path / "cli.yaml").read_text().splitlines(), 1) if "nope" in text)
    assert f"cli.yaml:{line}: field 'curriculum.stages.0.mix.nope'" in res.stderr, res.stderr
    assert "names dataset 'nope'" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_dataset_left_empty_by_the_pipeline_names_the_stage(tmp_path, tiny_model_dir, tiny_data, cur_data):
    empty = write_jsonl(tmp_path / "blank.jsonl", [{"text": "   "}])  # nothing left after cleaning
    cfg = _load(tmp_path, tiny_model_dir, tiny_data, cur_data, edit=lambda d: d["curriculum"]["datasets"].update(
        blank={"path": str(empty), "format": "text"}), stages=[{"name": "s", "mix": {"blank": 0.5, "domain": 0.5}}])
    with pytest.raises(StackError) as exc:
        sft.run(cfg)
    msg = str(exc.value)
    assert "curriculum.stages[0] ('s') draws on 'blank'" in msg and "curriculum.datasets.blank" in msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*/manifest.json"))


# ---------------------------------------------------------------- the shipped demo
def test_shipped_general_data_and_curriculum_config(tmp_path):
    """data/general is what data/generate_general.py makes (its held-out rows never in training), and `llmstack data`
    lays out configs/curriculum.yaml's three stages."""
    subprocess.run([sys.executable, str(ROOT / "data/generate_general.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / f"data/general/{split}.jsonl").read_bytes()
    train, test = (read_jsonl(ROOT / f"data/general/{s}.jsonl") for s in ("train", "test"))
    assert len(train) == 400 and len(test) == 100 and len({r["task"] for r in test}) == 12
    assert not {(r["instruction"], r["input"]) for r in test} & {(r["instruction"], r["input"]) for r in train}
    res = run_cli(["data", "--config", ROOT / "configs/curriculum.yaml", "--output", tmp_path / "report.json"])
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(s["name"], s["steps"], s["composition"]) for s in report["curriculum"]] == [
        ("cpt", 20, {"docs": 40, "general": 40}), ("blend", 30, {"general": 36, "tickets": 84}),
        ("domain", 50, {"tickets": 200})]
    assert "## Curriculum stages" in res.stdout
    used = {s["path"]: s for s in report["sources"]}
    assert used["data/general/test.jsonl"]["rows_out"] == 100  # the forgetting watch loses no row


def test_killed_curriculum_resumes_to_the_uninterrupted_result(cur_run, tmp_path, tiny_model_dir, tiny_data,
                                                               cur_data):
    """Killed after a checkpoint inside the second stage, `llmstack train --resume` finishes with the same stage
    metrics as the run that was never interrupted (the base evaluation is reused, not recomputed)."""
    ref_artifact, ref = cur_run
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    data = curriculum_dict(tiny_model_dir, tiny_data, cur_data, "artifacts/train")
    data["train"]["save_steps"] = 5  # stage ends save too (steps 3 and 7): checkpoints 3 and 5 come before 7
    cfg_path = write_yaml(work_dir / "cur.yaml", data)
    root = work_dir / "artifacts" / "train"
    code = run_until_killed(["train", "--config", cfg_path], work_dir, lambda: bool(list(
        root.glob(".work/*/checkpoints/checkpoint-5/trainer_state.json"))), tmp_path / "killed.log")
    assert code == -signal.SIGKILL, f"the run was not killed mid-way:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    assert not list(root.glob("*/manifest.json"))
    (run_dir,) = [p for p in (root / ".work").iterdir() if p.is_dir()]
    assert (run_dir / "curriculum_base.json").is_file()

    res = run_cli(["train", "--resume"], cwd=work_dir, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((root / run_dir.name / "manifest.json").read_text())
    assert manifest["training"]["resumed_from"] in ("checkpoint-5", "checkpoint-7")
    got, want = manifest["curriculum"]["metrics"], ref["curriculum"]["metrics"]
    assert [r["name"] for r in got] == [r["name"] for r in want]
    for g, w in zip(got, want):
        for key in ("validation_loss", "general_loss", "lr_last_logged", "train_loss"):
            want_value = w.get(key)
            assert g.get(key) == (None if want_value is None else pytest.approx(want_value, rel=1e-5, abs=1.5e-4)), \
                (key, g, w)


@pytest.mark.timeout(600)
def test_two_processes_lay_out_and_step_like_one(tmp_path, tiny_model_dir, tiny_data, cur_data):
    """torchrun with 2 processes at batch 1 lays the stages out exactly as 1 process at batch 2 (the padding counts
    every process) and reaches the same stage metrics: each rank reads its share of every step in order, and the
    gradients are synchronised. (Caught: the base evaluation run before `train()` made the Trainer prepare the model
    for evaluation, without DDP, so the ranks trained apart: validation loss 10.846 against 10.857 after stage 1.)"""
    from test_distributed import _torchrun

    def config(name, batch_size):
        data = curriculum_dict(tiny_model_dir, tiny_data, cur_data, tmp_path / name)
        data["method"]["lora_dropout"] = 0.0
        data["train"].update(batch_size=batch_size, optimizer="sgd", lr=0.5, max_grad_norm=0)
        data["eval"]["after"] = False
        return write_yaml(tmp_path / f"{name}.yaml", data)

    one = run_cli(["train", "--config", config("one", 2)])
    two = _torchrun("--config", config("two", 1))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-5000:]
    m1, m2 = (json.loads((tmp_path / n / "latest" / "manifest.json").read_text()) for n in ("one", "two"))
    assert m2["training"]["distributed"]["world_size"] == 2
    assert m1["curriculum"]["stages"] == m2["curriculum"]["stages"]
    for a, b in zip(m1["curriculum"]["metrics"], m2["curriculum"]["metrics"]):
        for key in ("validation_loss", "general_loss", "train_loss"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=2e-4), (key, a, b)
