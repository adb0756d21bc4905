"""Drift statistics and the reference profile: Evidently's default test choice, the tests themselves against scipy
on known distributions, the reference file (round trip, errors, discovery through artifacts), and on the real demo
data with the real tokenizer: in-distribution windows rarely drift, each shipped shift is detected."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import ROOT, read_jsonl
from core.errors import ArtifactError
from monitoring import drift

DRIFT_DATA = ROOT / "data" / "drift"


def test_method_choice_follows_evidently_defaults():
    many = list(range(50))
    assert drift.choose_method("numeric", many) == "ks"
    assert drift.choose_method("numeric", [1, 2, 3, 1, 2, 3]) == "chisquare"  # <= 5 distinct values
    assert drift.choose_method("numeric", [0, 1] * 10) == "z"
    assert drift.choose_method("categorical", ["stop", "length", "abort"]) == "chisquare"
    assert drift.choose_method("categorical", ["stop", "length"]) == "z"
    big = list(np.linspace(0, 1, 1001))
    assert drift.choose_method("numeric", big) == "wasserstein"
    assert drift.choose_method("categorical", ["a", "b", "c"] * 400) == "jensenshannon"
    assert drift.choose_method("numeric", many, "psi") == "psi"
    assert drift.threshold("ks") == 0.05 and drift.threshold("wasserstein") == 0.1


@pytest.mark.parametrize("method", ["ks", "wasserstein", "psi"])
def test_numeric_tests_separate_same_from_shifted(method):
    from scipy import stats
    ref = np.random.default_rng(0).normal(0, 1, 800).tolist()
    same = stats.norm.ppf((np.arange(200) + 0.5) / 200)  # the same distribution without sampling noise
    shifted = (same + 0.8).tolist()
    same = same.tolist()
    t = drift.threshold(method)
    s_same = drift.score(method, ref, same, "numeric")
    s_shift = drift.score(method, ref, shifted, "numeric")
    if method == "ks":
        assert s_same >= t > s_shift
    else:
        assert s_same < t <= s_shift


def test_categorical_tests():
    ref = ["stop"] * 90 + ["length"] * 10
    assert drift.score("z", ref, ["stop"] * 27 + ["length"] * 3, "categorical") > 0.05
    assert drift.score("z", ref, ["stop"] * 10 + ["length"] * 20, "categorical") < 0.05
    three = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    assert drift.score("chisquare", three, ["a"] * 25 + ["b"] * 15 + ["c"] * 10, "categorical") > 0.5
    assert drift.score("chisquare", three, ["a"] * 10 + ["b"] * 10 + ["c"] * 30, "categorical") < 0.05
    # a category the reference never had is drift, not a crash
    assert drift.score("chisquare", three, ["a"] * 20 + ["d"] * 20, "categorical") == 0.0
    assert drift.score("jensenshannon", three, three, "categorical") < 0.01


def test_compare_reports_dataset_drift_by_share_and_skips_thin_features():
    rng = np.random.default_rng(1)
    ref = drift.Reference(drift.Basis(frozenset(), np.zeros(drift.DIM)), {
        "prompt_tokens": rng.normal(100, 10, 300).round().tolist(),
        "output_tokens": rng.normal(40, 5, 300).round().tolist(),
        "prompt_novel_token_rate": rng.uniform(0, 0.05, 300).tolist(),
        "prompt_embedding_distance": rng.uniform(0.1, 0.3, 300).tolist(),
        "output_logprob_mean": [],  # e.g. a backend that reports none
        "finish_reason": ["stop"] * 290 + ["length"] * 10})
    rows = [{"prompt_tokens": float(round(x)), "output_tokens": float(round(y)), "prompt_novel_token_rate": z,
             "prompt_embedding_distance": w, "finish_reason": "stop"}
            for x, y, z, w in zip(rng.normal(300, 10, 50), rng.normal(40, 5, 50), rng.uniform(0, 0.05, 50),
                                  rng.uniform(0.5, 0.7, 50))]
    res = drift.compare(ref, rows, min_rows=30)
    by = {e["name"]: e for e in res["features"]}
    assert by["prompt_tokens"]["drift"] and by["prompt_embedding_distance"]["drift"]
    assert not by["output_tokens"]["drift"] and not by["prompt_novel_token_rate"]["drift"]
    assert by["output_logprob_mean"]["drift"] is None and "skipped" in by["output_logprob_mean"]
    assert res["tested_features"] == 5 and res["drifted_features"] == 2 and not res["dataset_drift"]
    assert drift.compare(ref, rows, share=0.4)["dataset_drift"]
    assert all(e["drift"] is None for e in drift.compare(ref, rows[:10], min_rows=30)["features"])


def test_embedding_is_stable_and_normalised():
    a = drift.embed("The router keeps dropping the connection")
    assert np.isclose(np.linalg.norm(a), 1.0)
    assert np.array_equal(a, drift.embed("the ROUTER keeps dropping the connection"))  # same in every process
    assert float(a @ drift.embed("Mein Router verliert ständig die Verbindung")) < float(
        a @ drift.embed("My router keeps dropping its connection"))
    assert not drift.embed("!!! ???").any()


def test_reference_round_trip_and_clear_errors(tmp_path):
    fit = [("hello world", [1, 2, 3]), ("router broken", [2, 4])]
    ref = drift.build_reference(fit, [("hello router", [1, 4, 9]), ("world", [3])],
                                [{"n_tokens": 10, "logprob_sum": -5.0, "finish": "stop"},
                                 {"n_tokens": 0, "logprob_sum": None, "finish": "length"}], {"note": "x"})
    assert ref.values["prompt_novel_token_rate"] == [round(1 / 3, 6), 0.0]
    assert ref.values["output_logprob_mean"] == [-0.5]  # no tokens: no confidence value, not a zero
    path = ref.save(tmp_path)
    back = drift.Reference.load(tmp_path)
    assert back.values == ref.values and back.basis.vocab == ref.basis.vocab and back.meta["note"] == "x"
    with pytest.raises(ArtifactError, match="no drift reference"):
        drift.Reference.load(tmp_path / "nowhere")
    path.write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        drift.Reference.load(path)
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        drift.Reference.load(path)
    with pytest.raises(ValueError, match="at least 2 reference prompts"):
        drift.build_reference(fit, fit[:1], [])


def test_reference_is_found_through_the_artifact_chain(tmp_path):
    train = tmp_path / "train" / "run1"
    (train / "merged").mkdir(parents=True)
    (train / "manifest.json").write_text(json.dumps({"stage": "train"}))
    variant = tmp_path / "compress" / "run2" / "onnx-int8"
    variant.mkdir(parents=True)
    (variant / "manifest.json").write_text(json.dumps({"stage": "compress", "parent": {"path": str(train)}}))
    assert drift.find_reference(variant) is None
    (train / drift.FILE).write_text("{}")
    assert drift.find_reference(variant) == train / drift.FILE  # via the manifest's parent link
    assert drift.find_reference(train / "merged") == train / drift.FILE
    # the artifacts moved (a container mounts them at /app/artifacts): the absolute link is found by stage/run_id
    moved = tmp_path / "mounted" / "artifacts"
    moved.parent.mkdir()
    (variant.parent / "manifest.json").write_text(json.dumps(
        {"stage": "compress", "parent": {"path": str(train), "stage": "train", "run_id": "run1"}}))
    tmp_path.joinpath("train").rename(moved.parent / "train-moved")
    (moved / "train").mkdir(parents=True)
    (moved.parent / "train-moved" / "run1").rename(moved / "train" / "run1")
    tmp_path.joinpath("compress").rename(moved / "compress")
    (moved / "compress" / "run2" / "onnx-int8" / "manifest.json").unlink()  # the run's manifest carries the link
    assert drift.find_reference(moved / "compress" / "run2" / "onnx-int8") == moved / "train" / "run1" / drift.FILE
    (moved / "compress" / "run2" / drift.FILE).write_text("{}")  # compression copies it into its run folder
    assert drift.find_reference(moved / "compress" / "run2" / "onnx-int8") == moved / "compress" / "run2" / drift.FILE


# ---------------------------------------------------------------- the real demo data, the real tokenizer
def _chat(tokenizer, row: dict) -> tuple[str, list[int]]:
    msgs = row["messages"] if "messages" in row else [{"role": "user", "content": f"{row['instruction']}\n\n"
                                                                                   f"{row['input']}"}]
    return drift.chat_prompt(tokenizer, msgs)


@pytest.fixture(scope="module")
def demo_reference(tokenizer):
    tickets = ROOT / "data" / "tickets"
    fit = [_chat(tokenizer, r) for r in read_jsonl(tickets / "train.jsonl")]
    held = [_chat(tokenizer, r) for r in read_jsonl(tickets / "validation.jsonl")]
    return drift.build_reference(fit, held, [])


def _features(tokenizer, ref, name: str) -> list[dict]:
    return [drift.prompt_features(*_chat(tokenizer, r), ref.basis) for r in read_jsonl(DRIFT_DATA / f"{name}.jsonl")]


def test_in_distribution_windows_rarely_drift(tokenizer, demo_reference):
    pool = _features(tokenizer, demo_reference, "in_distribution")[100:]  # the test split's 100 later rows
    rng = random.Random(0)
    windows, dataset, per = 200, 0, {}
    for _ in range(windows):
        res = drift.compare(demo_reference, [rng.choice(pool) for _ in range(60)])
        dataset += res["dataset_drift"]
        for e in res["features"]:
            per[e["name"]] = per.get(e["name"], 0) + bool(e["drift"])
    assert dataset / windows <= 0.05, (dataset, per)
    assert all(v / windows <= 0.10 for v in per.values()), per  # each test runs at p < 0.05


@pytest.mark.parametrize("shift", ["language", "domain", "long"])
def test_each_shipped_shift_is_detected(tokenizer, demo_reference, shift):
    res = drift.compare(demo_reference, _features(tokenizer, demo_reference, shift)[:60])
    drifted = {e["name"] for e in res["features"] if e["drift"]}
    expected = {"language": "prompt_novel_token_rate", "domain": "prompt_embedding_distance",
                "long": "prompt_tokens"}[shift]
    assert expected in drifted and res["dataset_drift"], res


def test_shipped_drift_sets_are_what_the_generator_writes(tmp_path):
    import subprocess
    import sys
    subprocess.run([sys.executable, str(ROOT / "data" / "generate_drift_sets.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for f in DRIFT_DATA.glob("*.jsonl"):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
