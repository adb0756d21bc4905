"""A killed training run leaves no complete-looking artifact, and `llmstack train --resume` finishes it with the same
result as a run that was never interrupted.

`--resume` looks for interrupted runs under artifacts/train relative to the working directory, so these tests run the
CLI inside a temporary directory with `output.dir: artifacts/train` (absolute model and data paths).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import run_cli, run_until_killed, tiny_config_dict, write_yaml
from core.config import load
from training.config import TrainConfig
from training.sft import recipe as sft

STEPS, SAVE = 8, 2


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def loss_history(trainer_state: Path) -> list[dict]:
    state = json.loads(trainer_state.read_text())
    return [{k: h[k] for k in ("step", "loss", "learning_rate", "grad_norm")} for h in state["log_history"]
            if "loss" in h]


def adapter_weights(artifact: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(artifact / "adapter" / "adapter_model.safetensors")


def assert_same_training(got: list[dict], want: list[dict]):
    assert [h["step"] for h in got] == [h["step"] for h in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        # the Trainer logs losses rounded to 4 decimals; allow one unit of rounding in the last digit
        assert g["loss"] == pytest.approx(w["loss"], abs=1.5e-4), (g, w)
        assert g["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-6), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4, abs=1e-6), (g, w)


def resumable_config(tiny_model_dir, tiny_data, out_dir) -> dict:
    cfg = tiny_config_dict(tiny_model_dir, tiny_data, out_dir)
    cfg["train"].update(max_steps=STEPS, save_steps=SAVE, logging_steps=1)
    cfg["eval"]["before"] = True
    cfg["output"]["keep_checkpoints"] = True  # the trainer_state.json of the last checkpoint holds the loss history
    return cfg


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, tiny_data):
    # ---- the reference: the same config, never interrupted
    ref_cfg = load(TrainConfig, write_yaml(tmp_path / "ref.yaml",
                                           resumable_config(tiny_model_dir, tiny_data, tmp_path / "ref")))
    ref = sft.run(ref_cfg)
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    ref_history = loss_history(tmp_path / "ref" / ".work" / ref.name / "checkpoints" / f"checkpoint-{STEPS}"
                               / "trainer_state.json")

    # ---- start the run in a subprocess and SIGKILL it once the first checkpoint is complete
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    cfg_path = write_yaml(work_dir / "train.yaml", resumable_config(tiny_model_dir, tiny_data, "artifacts/train"))
    root = work_dir / "artifacts" / "train"
    done = []

    def checkpointed() -> bool:  # trainer_state.json is the last file the Trainer writes into a checkpoint
        done[:] = list(root.glob(".work/*/checkpoints/checkpoint-*/trainer_state.json"))
        return bool(done)

    code = run_until_killed(["train", "--config", cfg_path], work_dir, checkpointed, tmp_path / "killed.log")
    log_text = (tmp_path / "killed.log").read_text()
    assert done, f"no checkpoint appeared within 300 s (exit code {code}):\n{log_text[-3000:]}"
    assert code == -signal.SIGKILL, f"the run finished before it could be killed:\n{log_text[-3000:]}"

    (run_dir,) = [p for p in (root / ".work").iterdir() if p.is_dir()]
    run_id = run_dir.name
    # ---- nothing complete-looking was left behind
    assert not (root / run_id).exists(), "a killed run must not leave an artifact folder"
    assert not list(root.glob("*/manifest.json"))
    assert not os.path.lexists(root / "latest")
    complete = [p.parent for p in (run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")]
    newest = max(complete, key=checkpoint_step)
    assert checkpoint_step(newest) < STEPS

    # ---- resume
    res = run_cli(["train", "--resume"], cwd=work_dir, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    artifact = root / run_id
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert os.readlink(root / "latest") == run_id
    t = manifest["training"]
    assert t["resumed_from"] == newest.name
    assert t["steps"] == ref_manifest["training"]["steps"] == STEPS

    # ---- same result as the uninterrupted run (CPU, same seed, one thread: deterministic)
    history = loss_history(run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json")
    assert_same_training(history, ref_history)
    assert t["final_train_loss"] == pytest.approx(ref_manifest["training"]["final_train_loss"], abs=1.5e-4)
    assert t["validation_loss"] == pytest.approx(ref_manifest["training"]["validation_loss"], rel=1e-5)
    got, want = adapter_weights(artifact), adapter_weights(ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert manifest["metrics"]["before"] == ref_manifest["metrics"]["before"]  # cached, not recomputed
    assert manifest["metrics"]["after"]["loss"] == pytest.approx(ref_manifest["metrics"]["after"]["loss"], rel=1e-5)
    assert manifest["datasets"] == ref_manifest["datasets"]


def test_resume_without_an_interrupted_run_says_so(tmp_path):
    res = run_cli(["train", "--resume"], cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "no interrupted run" in res.stderr


def test_resume_refuses_overrides(tmp_path):
    res = run_cli(["train", "--resume", "x", "train.lr=1e-4"], cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and "overrides are not allowed" in res.stderr


def _interrupt_after_completion(root: Path, artifact: Path) -> Path:
    """Turn a finished run (kept checkpoints) back into the state a kill before the artifact rename leaves."""
    shutil.rmtree(artifact)
    os.unlink(root / "latest")
    return root / ".work" / artifact.name


def test_resume_skips_a_checkpoint_whose_saving_was_interrupted(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resumable_config(tiny_model_dir, tiny_data, "artifacts/train")
    cfg["train"].update(max_steps=4, save_steps=2)
    cfg["eval"].update(before=False)
    ref = sft.run(load(TrainConfig, write_yaml(tmp_path / "train.yaml", cfg)))
    root = tmp_path / "artifacts" / "train"
    want = adapter_weights(ref)
    work = _interrupt_after_completion(root, ref)
    # a kill while checkpoint-4 was being written: the weights are there, optimizer / RNG / trainer state are not
    last = work / "checkpoints" / "checkpoint-4"
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (last / name).unlink()
    again = sft.run(resume=True)
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["training"]["resumed_from"] == "checkpoint-2"
    got = adapter_weights(again)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_resume_finds_runs_under_the_configured_output_dir(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    out = tmp_path / "elsewhere"
    cfg = resumable_config(tiny_model_dir, tiny_data, out)
    cfg["train"].update(max_steps=2, save_steps=2)
    cfg["eval"].update(before=False)
    path = write_yaml(tmp_path / "train.yaml", cfg)
    ref = sft.run(load(TrainConfig, path))
    _interrupt_after_completion(out, ref)
    res = run_cli(["train", "--config", path, "--resume"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / ref.name / "manifest.json").is_file()
