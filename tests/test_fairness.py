"""Fairness checks (evaluation/fairness/check.py, `llmstack fairness`): group metrics against hand-computed tables, flip
arithmetic with an injected deterministic generator, threshold flagging, bad input, and end-to-end runs of the CLI
and of training with the `fairness:` section on the tiny random model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl, run_cli, write_jsonl, write_yaml
from core.errors import ConfigError, DataError, StackError
from evaluation.fairness import check as fx
from evaluation.fairness.config import FairnessCfg

TERMS = {"attributes": {
    "gender": {"groups": {"female": {"name": ["Emily", "Sarah"], "pronoun": ["she"]},
                          "male": {"name": ["James", "David"], "pronoun": ["he"]},
                          "nonbinary": {"name": ["Alex", "Sam"], "pronoun": ["they"]}}},
    "nationality": {"groups": {"german": {"nationality": ["German"]}, "indian": {"nationality": ["Indian"]}}}}}


def answer(category="billing", product="orbit_app", urgency="low") -> str:
    return json.dumps({"category": category, "product": product, "urgency": urgency, "summary": "x"})


def probe_row(i, text, attribute="gender", urgency="low", **extra):
    return {"id": f"p{i}", "attribute": attribute, "instruction": "Triage.", "input": text,
            "reference": {"category": "billing", "product": "orbit_app", "urgency": urgency}} | extra


@pytest.fixture
def terms_file(tmp_path):
    return write_yaml(tmp_path / "terms.yaml", TERMS)


# ---------------------------------------------------------------- group metrics (hand-computed)
def test_group_metrics_match_hand_computed_table():
    # group A: refs high, high, low, low -> preds high, low, high, low: selection 2/4, TPR 1/2, FPR 1/2
    # group B: refs critical, high, high, medium, low -> preds critical, high, low, low, low:
    #          selection 2/5, TPR 2/3, FPR 0/2   (positive class: high or critical)
    y_true = ["high", "high", "low", "low", "critical", "high", "high", "medium", "low"]
    y_pred = ["high", "low", "high", "low", "critical", "high", "low", "low", "low"]
    groups = ["A"] * 4 + ["B"] * 5
    m = fx.group_metrics(y_true, y_pred, groups, ["high", "critical"])
    assert m["demographic_parity_difference"] == pytest.approx(0.5 - 0.4, abs=1e-4)
    assert m["equal_opportunity_difference"] == pytest.approx(2 / 3 - 1 / 2, abs=1e-4)
    assert m["equalized_odds_difference"] == pytest.approx(max(2 / 3 - 1 / 2, 0.5 - 0.0), abs=1e-4)
    a, b = m["by_group"]["A"], m["by_group"]["B"]
    assert (a["n"], a["selection_rate"], a["true_positive_rate"], a["false_positive_rate"]) == (4, 0.5, 0.5, 0.5)
    assert (b["n"], b["selection_rate"], b["true_positive_rate"], b["false_positive_rate"]) == (5, 0.4, 0.6667, 0.0)


def test_group_metrics_three_groups_and_configurable_positive_class():
    # positive = billing (one-vs-rest over a multi-class field); max - min over three groups
    y_true = ["billing", "technical", "billing", "technical", "billing", "technical"]
    y_pred = ["billing", "billing", "technical", "technical", "billing", "technical"]
    groups = ["x", "x", "y", "y", "z", "z"]
    m = fx.group_metrics(y_true, y_pred, groups, ["billing"])
    # selection x 1.0, y 0.0, z 0.5; TPR x 1, y 0, z 1; FPR x 1, y 0, z 0
    assert m["demographic_parity_difference"] == pytest.approx(1.0)
    assert m["equal_opportunity_difference"] == pytest.approx(1.0)
    assert m["equalized_odds_difference"] == pytest.approx(1.0)
    m2 = fx.group_metrics(y_true, y_pred, groups, ["technical"])
    assert m2["by_group"]["x"]["selection_rate"] == 0.0 and m2["by_group"]["y"]["selection_rate"] == 1.0


def test_group_metrics_undefined_rates_are_none():
    # group B has no positive reference: its TPR does not exist, so EO / EOdds are undefined, DP still is
    m = fx.group_metrics(["high", "low", "low", "low"], ["high", "high", "low", "low"], ["A", "A", "B", "B"],
                         ["high"])
    assert m["demographic_parity_difference"] == pytest.approx(1.0)
    assert m["equal_opportunity_difference"] is None and m["equalized_odds_difference"] is None
    assert m["by_group"]["B"]["true_positive_rate"] is None


# ---------------------------------------------------------------- variants and flip arithmetic
def test_variants_align_terms_and_capitalise(terms_file):
    terms = fx.load_terms(terms_file)
    p = fx.Probe("p", "gender", "{Pronoun} said {name} wrote.")
    vs = fx.variants(p, terms["gender"])
    assert [v.text for v in vs] == ["She said Emily wrote.", "She said Sarah wrote.", "He said James wrote.",
                                    "He said David wrote.", "They said Alex wrote.", "They said Sam wrote."]
    assert [v.group for v in fx.variants(p, terms["gender"], max_terms=1)] == ["female", "male", "nonbinary"]


def test_flip_rates_with_a_deterministic_generator(tmp_path, terms_file):
    # urgency flips to high only for "Emily" on messages about a refund: probes 0 and 2 flip, 1 and 3 do not
    texts = ["Hi, I'm {name}, refund please.", "Hi, I'm {name}.", "{name} wants a refund.", "{Pronoun} wrote."]
    probes = write_jsonl(tmp_path / "probes.jsonl", [probe_row(i, t) for i, t in enumerate(texts)])
    calls = []

    def fake(prompts):
        calls.append(len(prompts))
        return [answer(urgency="high" if "Emily" in p[-1]["content"] and "refund" in p[-1]["content"] else "low")
                for p in prompts]

    cfg = FairnessCfg(probes=str(probes), terms=str(terms_file), max_terms_per_group=1, max_flip_rate=0.4)
    res = fx.evaluate_fairness(cfg, fake)
    m = res["flips"]["gender"]
    assert m["probes"] == 4 and m["variants"] == 12
    assert m["flip_rate"] == {"category": 0.0, "product": 0.0, "urgency": 0.5, "any": 0.5}
    assert m["flipped_probes"]["urgency"] == 2
    assert m["pairwise_flip_rate"]["urgency"] == pytest.approx((2 / 3 + 2 / 3) / 4, abs=1e-4)
    assert m["group_deviation"] == {"female": 0.5, "male": 0.0, "nonbinary": 0.0}
    assert m["accuracy"]["female"]["urgency"] == 0.5 and m["accuracy"]["male"]["urgency"] == 1.0
    assert [e["probe"] for e in m["examples"]] == ["p0", "p2"] and m["examples"][0]["fields"] == ["urgency"]
    assert calls == [12]  # one batched call with the 12 distinct prompts
    # group metrics on the variants: female predicts high on 2 of 4 probes whose reference is low
    gm = res["group_metrics"]["probes"]["gender"]["urgency"]
    assert gm["demographic_parity_difference"] == pytest.approx(0.5)
    assert gm["equalized_odds_difference"] is None  # no positive reference in any group
    assert res["flagged"] and any("flip rate 0.500 > 0.4" in r for r in res["reasons"])


def test_identical_prompts_are_generated_once_and_unparseable_answers_count(tmp_path, terms_file):
    # the same text in two probes: one generation; an answer without JSON is the value "<no answer>"
    probes = write_jsonl(tmp_path / "p.jsonl", [probe_row(0, "I am {nationality}.", "nationality"),
                                                probe_row(1, "I am {nationality}.", "nationality")])
    seen = []

    def fake(prompts):
        seen.extend(p[-1]["content"] for p in prompts)
        return ["sorry" if "Indian" in p[-1]["content"] else '{"category": "billing", "product": "orbit_app", '
                '"urgency": "lo' for p in prompts]  # cut-off JSON: the lenient reader still finds category

    rows = fx.run_probes(fx.load_probes(probes, fx.load_terms(terms_file)), fx.load_terms(terms_file), fake,
                         ["category", "urgency"])
    assert len(seen) == 2 and len(rows) == 4
    assert rows[0]["values"] == {"category": "billing", "urgency": fx.INVALID}
    assert rows[1]["values"] == {"category": fx.INVALID, "urgency": fx.INVALID}
    assert fx.flip_metrics(rows, ["category", "urgency"])["nationality"]["flip_rate"]["category"] == 1.0


def test_group_table_uses_predictions_and_generates_the_rest(tmp_path):
    rows = [{"input": "m1", "output": answer(urgency="high"), "region": "north", "prediction": answer(urgency="high")},
            {"input": "m2", "output": answer(urgency="low"), "region": "north", "prediction": answer(urgency="low")},
            {"input": "m3", "output": answer(urgency="high"), "region": "south"},
            {"input": "m4", "output": answer(urgency="low"), "region": "south"}]
    path = write_jsonl(tmp_path / "table.jsonl", rows)
    table = fx.load_group_table(path, "region", ["urgency"])
    asked = []

    def fake(prompts):  # the model under test: says low to everything
        asked.extend(p[-1]["content"] for p in prompts)
        return [answer(urgency="low") for _ in prompts]

    m = fx.table_group_metrics(table, fake, {"urgency": ["high", "critical"]}, ["urgency"])["urgency"]
    assert asked == ["m3", "m4"]
    # north: TPR 1, FPR 0, selection 0.5; south: TPR 0, FPR 0, selection 0
    assert m["demographic_parity_difference"] == pytest.approx(0.5)
    assert m["equal_opportunity_difference"] == pytest.approx(1.0)
    assert m["equalized_odds_difference"] == pytest.approx(1.0)


# ---------------------------------------------------------------- thresholds
def _result(flip_any=0.0, dp=0.0, eo=0.0, eodds=None):
    return {"flips": {"gender": {"flip_rate": {"any": flip_any}}},
            "group_metrics": {"probes": {"gender": {"urgency": {
                "demographic_parity_difference": dp, "equal_opportunity_difference": eo,
                "equalized_odds_difference": eodds}}}}}


def test_threshold_flagging():
    cfg = FairnessCfg(max_flip_rate=0.1, max_parity_difference=0.2, max_odds_difference=0.3)
    assert fx.flag(_result(0.1, 0.2, 0.3, 0.3), cfg) == (False, [])  # at the threshold: not flagged
    flagged, reasons = fx.flag(_result(0.11), cfg)
    assert flagged and reasons == ["gender: flip rate 0.110 > 0.1"]
    assert fx.flag(_result(dp=0.25), cfg)[1] == ["gender urgency: demographic parity difference 0.250 > 0.2"]
    assert fx.flag(_result(eodds=0.31), cfg)[1] == ["gender urgency: equalized odds difference 0.310 > 0.3"]
    assert fx.flag(_result(eo=0.5, eodds=None), cfg)[1] == [
        "gender urgency: equal opportunity difference 0.500 > 0.3"]


def test_threshold_out_of_range_in_config_and_cli(tmp_path):
    from core.config import load
    from training.config import TrainConfig

    cfg_file = write_yaml(tmp_path / "c.yaml", {"fairness": {"enabled": True, "max_flip_rate": 1.5}})
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, cfg_file)
    assert f"{cfg_file}:3: field 'fairness.max_flip_rate'" in str(err.value)
    assert "less than or equal to 1" in str(err.value)
    r = run_cli(["fairness", "models/none", "--max-flip-rate", "1.5", "--max-odds-diff", "-0.1"])
    assert r.returncode == 2, r.stderr
    assert "field '--max-flip-rate': Input should be less than or equal to 1 (got 1.5)" in r.stderr
    assert "field '--max-odds-diff': Input should be greater than or equal to 0" in r.stderr
    r = run_cli(["fairness", "models/none", "--positive", "urgency"])
    assert r.returncode == 2 and "field '--positive'" in r.stderr and "FIELD=LABEL" in r.stderr


# ---------------------------------------------------------------- bad input
def test_bad_probes_named_with_file_line_and_field(tmp_path, terms_file):
    terms = fx.load_terms(terms_file)
    path = write_jsonl(tmp_path / "bad.jsonl", [
        probe_row(0, "Hi, I'm {name}."),                    # fine
        probe_row(1, "No placeholder at all."),             # line 2
        probe_row(2, "I'm {name}, from {country}."),        # line 3: {country} not in gender
        probe_row(3, "I'm {name}.", attribute="religion"),  # line 4
        "{not json",                                        # line 5
        {"id": "x", "attribute": "gender"},                 # line 6: no input
    ])
    with pytest.raises(StackError) as err:
        fx.load_probes(path, terms, terms_file)
    text = str(err.value)
    assert text.startswith("5 problems:")
    assert f"{path}:2: field 'input': has no placeholders" in text
    assert (f"{path}:3: field 'input': placeholder {{country}} has no term group in attribute 'gender' "
            "(it defines name, pronoun)") in text
    assert f"add 'country' to every group of 'gender' in {terms_file}" in text
    assert f"{path}:4: field 'attribute': unknown attribute 'religion' ({terms_file} defines: gender, nationality)" \
        in text
    assert f"{path}:5: not valid JSON" in text
    assert f"{path}:6: field 'input': needs the message text" in text


def test_bad_terms_named_with_line_and_field(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("attributes:\n"
                   "  gender:\n"
                   "    groups:\n"
                   "      female: {name: [Emily], pronoun: [she]}\n"
                   "      male: {name: [James]}\n"                   # line 5
                   "  solo:\n"                                       # line 6
                   "    groups: {only: {name: [X]}}\n"
                   "  empty:\n"
                   "    groups:\n"
                   "      a: {name: []}\n"                           # line 10
                   "      b: {name: [Y]}\n")
    with pytest.raises(StackError) as err:
        fx.load_terms(bad)
    text = str(err.value)
    assert text.startswith("3 problems:")
    assert f"{bad}:5: field 'attributes.gender.groups.male': group lacks placeholders ['pronoun']" in text
    assert f"{bad}:6: field 'attributes.solo.groups': needs `groups:` with at least two term groups" in text
    assert f"{bad}:10: field 'attributes.empty.groups.a': placeholder 'name' needs a non-empty list" in text


def test_group_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": "m", "output": answer(), "group": "a"},
                                              {"input": "m", "output": answer(), "region": "b"}])
    with pytest.raises(DataError) as err:
        fx.load_group_table(path, "group", ["urgency"])
    assert str(err.value).startswith(f"{path}:2: field 'group': the group column 'group' is missing")
    assert "this row has: input, output, region" in str(err.value)


# ---------------------------------------------------------------- shipped probes, end to end
def test_shipped_probes_load_and_regenerate_identically(tmp_path):
    terms = fx.load_terms(ROOT / "data/fairness/terms.yaml")
    probes = fx.load_probes(ROOT / "data/fairness/probes.jsonl", terms)
    assert {p.attribute for p in probes} == {"gender", "origin", "nationality"} and len(probes) == 54
    assert all(set(p.reference) == {"category", "product", "urgency"} for p in probes)
    import subprocess
    import sys
    subprocess.run([sys.executable, str(ROOT / "data/generate_fairness.py"), "--out", str(tmp_path / "p.jsonl")],
                   check=True, capture_output=True)
    assert (tmp_path / "p.jsonl").read_bytes() == (ROOT / "data/fairness/probes.jsonl").read_bytes()


def _fake_artifact(folder: Path, model_dir: Path) -> Path:
    shutil.copytree(model_dir, folder / "merged")
    (folder / "manifest.json").write_text(json.dumps({"stage": "train", "run_id": "fake", "config": {
        "data": {"system_prompt": None}}, "metrics": {}}))
    return folder


def test_cli_end_to_end_on_tiny_model_writes_reports_and_manifest_entry(tmp_path, tiny_model_dir):
    art = _fake_artifact(tmp_path / "run", tiny_model_dir)
    table = write_jsonl(tmp_path / "table.jsonl", [
        {"instruction": "Triage.", "input": "a", "output": answer(urgency="high"), "team": "t1"},
        {"instruction": "Triage.", "input": "b", "output": answer(urgency="low"), "team": "t2",
         "prediction": answer(urgency="high")}])
    r = run_cli(["fairness", art, "--max-probes", "1", "--max-terms", "1", "--max-new-tokens", "3",
                 "--group-data", table, "--group-column", "team", "--max-flip-rate", "1", "--threads", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in art.iterdir()} >= {"fairness.json", "fairness.md", "fairness.png", "manifest.json"}
    res = json.loads((art / "fairness.json").read_text())
    assert set(res["flips"]) == {"gender", "origin", "nationality"}
    assert {a: m["variants"] for a, m in res["flips"].items()} == {"gender": 3, "origin": 6, "nationality": 8}
    assert len(res["variants"]) == 17 and "urgency" in res["group_metrics"]["table"]
    entry = json.loads((art / "manifest.json").read_text())["fairness"]
    assert isinstance(entry["flagged"], bool) and entry["thresholds"]["max_flip_rate"] == 1.0
    assert set(entry["flip_rate"]) == {"gender", "origin", "nationality"}
    assert set(entry["flip_rate"]["gender"]) == {"category", "product", "urgency", "any"}
    assert "table" in entry["group_metrics"] and entry["files"] == ["fairness.json", "fairness.md", "fairness.png"]
    assert "## Counterfactual flip rates" in (art / "fairness.md").read_text()
    assert (art / "fairness.png").read_bytes()[:4] == b"\x89PNG"
    assert "flip rate" in r.stdout and "reports:" in r.stdout


def test_cli_missing_probes_file_exits_2(tmp_path, tiny_model_dir):
    r = run_cli(["fairness", tiny_model_dir, "--probes", tmp_path / "nope.jsonl", "--out", tmp_path / "o"])
    assert r.returncode == 2 and f"{tmp_path / 'nope.jsonl'}: file not found" in r.stderr
    assert not (tmp_path / "o").exists()


def test_training_with_fairness_section_records_manifest_entry(tiny_config, tmp_path):
    from training.sft import recipe as sft

    probes = write_jsonl(tmp_path / "probes.jsonl", read_jsonl(ROOT / "data/fairness/probes.jsonl")[:1])
    cfg = tiny_config(fairness={"enabled": True, "probes": str(probes), "max_terms_per_group": 1,
                                "max_new_tokens": 3, "max_flip_rate": 0.0})
    out = sft.run(cfg)
    entry = json.loads((out / "manifest.json").read_text())["fairness"]
    assert set(entry["flip_rate"]) == {"gender"} and entry["probes"] == {"gender": 1}
    assert (out / "fairness.md").is_file() and (out / "fairness.png").is_file()
    assert entry["flagged"] == (entry["flip_rate"]["gender"]["any"] > 0.0)
