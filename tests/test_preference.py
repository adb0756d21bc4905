"""Preference tuning (training/preference/recipe.py): DPO, ORPO and KTO run end to end on the tiny model and write an artifact
with the SFT layout (loadable merged model, manifest with the preference metrics, parent link); preference accuracy
on the training pairs really rises after a few high-lr steps; bad preference data fails with file, line and field
and leaves no artifact behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (BASE_MODEL, need_base_model, read_jsonl, run_cli, ticket_rows, tiny_config_dict, write_jsonl,
                      write_yaml)
from core.config import load
from core.errors import StackError
from training.config import TrainConfig
from training.preference import metrics as preference_metrics
from training.preference import recipe as preference

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["category", "product", "urgency"]


def pair_rows(n: int, split: str = "train", start: int = 0, kind: str = "wrong_category") -> list[dict]:
    """Real ticket prompts with the correct JSON answer as chosen and a near miss as rejected: a wrong category
    (billing, or shipping where billing is right), or (kind=spam) always the category "spam"."""
    out = []
    for r in ticket_rows(n, split, start):
        ans = json.loads(r["output"])
        bad = json.dumps(dict(ans, category="billing" if ans["category"] != "billing" else "shipping"))
        out.append({"instruction": r["instruction"], "input": r["input"], "chosen": json.dumps(ans),
                    "rejected": json.dumps(dict(ans, category="spam")) if kind == "spam" else bad})
    return out


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pref-data")
    return {"train": write_jsonl(folder / "train.jsonl", pair_rows(6)),
            "test": write_jsonl(folder / "test.jsonl", pair_rows(3, "test"))}


def pref_config(model_dir, data, out_dir, recipe="dpo", **updates) -> dict:
    cfg = tiny_config_dict(model_dir, {"train": data["train"], "validation": data["train"], "test": data["test"]},
                           out_dir)
    cfg["recipe"] = recipe
    cfg["data"]["validation"] = []
    cfg["data"]["val_ratio"] = 0
    cfg["data"]["dedup_near"] = False
    cfg["train"].update(max_steps=2, save_steps=50)
    cfg["eval"].update(before=True, max_samples=2, max_new_tokens=6)
    for section, values in updates.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.__setitem__(section, values)
    return cfg


def load_cfg(tmp_path, data: dict) -> TrainConfig:
    return load(TrainConfig, write_yaml(tmp_path / "pref.yaml", data))


def assert_loadable(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("recipe,method", [("dpo", "lora"), ("dpo", "full"), ("orpo", "lora"), ("kto", "lora")])
def test_recipe_end_to_end(tmp_path, tiny_model_dir, pref_data, recipe, method):
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, pref_data, tmp_path / "out", recipe,
                                         method={"name": method}))
    path = preference.run(cfg)
    m = json.loads((path / "manifest.json").read_text())
    assert m["stage"] == "train" and m["recipe"] == recipe and m["config"]["recipe"] == recipe
    assert m["training"]["steps"] == 2 and m["training"]["final_train_loss"] is not None
    for when in ("before", "after"):
        metrics = m["metrics"][when]
        assert metrics["pairs"] == 2 and 0 <= metrics["pref_accuracy"] <= 1
        assert 0 <= metrics["rejected_like"] <= 1 and set(metrics["rejected_like_kinds"]) == set(
            preference_metrics.REJECTED_KINDS)
    assert "reward_margin" in m["metrics"]["after"] and "reward_margin" not in m["metrics"]["before"]
    assert "preference accuracy" in m["metrics_table"] and "rejected-like" in m["metrics_table"]
    kinds = {w: [p["rejected_like"] for p in read_jsonl(path / f"predictions_{w}.jsonl")] for w in ("before", "after")}
    fixed = sum(b is not None and a is None for b, a in zip(kinds["before"], kinds["after"]))
    assert m["metrics"]["after"]["answers_fixed"] == fixed and "sign_test_p" in m["metrics"]["after"]
    for when in ("before", "after"):
        assert m["metrics"][when]["format_errors"] == pytest.approx(
            sum(k in preference_metrics.FORMAT_KINDS for k in kinds[when]) / len(kinds[when]), abs=1e-4)
    expected = {"manifest.json", "config.yaml", "data_report.json", "data_report.md", "metrics.json", "README.md",
                "loss_curve.png", "train_history.json", "token_lengths.png", "predictions_before.jsonl",
                "predictions_after.jsonl", "merged"} | ({"adapter"} if method == "lora" else set())
    assert {p.name for p in path.iterdir()} == expected
    assert_loadable(path)
    assert (tmp_path / "out" / "latest").resolve() == path.resolve()
    assert m["parent"] is None  # a plain model folder, not an artifact


def test_parent_is_the_sft_artifact_and_cli(tmp_path, tiny_model_dir, pref_data):
    """A DPO run on the DPO artifact above (standing in for an SFT artifact) links it as parent; through the CLI."""
    first = preference.run(load_cfg(tmp_path, pref_config(tiny_model_dir, pref_data, tmp_path / "a",
                                                          eval={"before": False})))
    cfg = pref_config(tiny_model_dir, pref_data, tmp_path / "b", eval={"before": False})
    cfg["model"]["name_or_path"] = str(tmp_path / "a" / "latest")
    proc = run_cli(["train", "--config", write_yaml(tmp_path / "b.yaml", cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preference accuracy" in proc.stdout
    m = json.loads((tmp_path / "b" / "latest" / "manifest.json").read_text())
    assert m["parent"]["run_id"] == first.name and m["parent"]["stage"] == "train"
    assert m["base_model"]["path"].endswith("merged")


def test_preference_accuracy_rises_on_training_pairs(tmp_path, tiny_model_dir, pref_data):
    """A real effect: 8 DPO steps at a high lr on 6 pairs (rejected: the category "spam"), measured on those same
    pairs before and after: the random-weight model prefers the rejected answer on most of them at first."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6, kind="spam"))
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, {"train": pairs, "test": pairs}, tmp_path / "out",
                                         method={"name": "full"}, eval={"max_samples": 0},
                                         train={"lr": 5e-3, "max_steps": 8, "batch_size": 2, "warmup_ratio": 0},
                                         preference={"beta": 0.5, "generate": False}))
    m = json.loads((preference.run(cfg) / "manifest.json").read_text())
    b, a = m["metrics"]["before"], m["metrics"]["after"]
    assert b["pref_accuracy"] <= 0.5 and a["pref_accuracy"] >= b["pref_accuracy"] + 0.3  # measured: 0.33 -> 0.67
    assert a["logp_margin"] > b["logp_margin"] + 1.0
    assert a["reward_accuracy"] >= 0.8 and a["reward_margin"] > 0


def test_sft_weight_keeps_the_chosen_answers_likely(tmp_path, tiny_model_dir, pref_data):
    """preference.sft_weight adds TRL's NLL loss on the chosen answers to DPO: the same 6 steps end with the chosen
    answers more likely than plain DPO leaves them (plain DPO only widens the gap, and may lower both)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(6, kind="spam"))

    def run(name, weight):
        cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, {"train": pairs, "test": pairs}, tmp_path / name,
                                             method={"name": "full"}, eval={"max_samples": 0, "before": False},
                                             train={"lr": 5e-3, "max_steps": 6, "batch_size": 2, "warmup_ratio": 0},
                                             preference={"beta": 0.5, "generate": False, "sft_weight": weight}))
        return json.loads((preference.run(cfg) / "manifest.json").read_text())

    plain, anchored = run("plain", 0.0), run("anchored", 1.0)
    assert anchored["training"]["sft_weight"] == 1.0 and plain["training"]["sft_weight"] == 0.0
    assert anchored["metrics"]["after"]["logp_chosen"] > plain["metrics"]["after"]["logp_chosen"] + 1.0


def test_sft_weight_is_for_dpo_only(tmp_path, tiny_model_dir, pref_data):
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, pref_data, tmp_path / "out", "orpo",
                                         preference={"sft_weight": 1.0}))
    with pytest.raises(StackError, match="orpo has its own NLL term"):
        preference.run(cfg)
    assert not (tmp_path / "out").exists()


def test_onpolicy_pairs_from_the_models_own_mistakes(tmp_path, tiny_model_dir, tiny_data, pref_data, tokenizer):
    """`llmstack pairs` asks the model, keeps its wrong answers as rejected beside the reference, and the file trains
    with the dpo recipe. The base model (not fine-tuned) answers every ticket wrong (no bare JSON within 16 tokens):
    one pair per prompt, rejected = its own greedy answer."""
    from evaluation import quality as ev
    from modeling.model import load_model

    need_base_model()
    out = tmp_path / "pairs" / "onpolicy.jsonl"
    res = run_cli(["pairs", BASE_MODEL, "--data", tiny_data["train"], "--out", out, "--max-rows", 3,
                   "--max-new-tokens", 16])
    assert res.returncode == 0, res.stderr[-3000:]
    pairs = read_jsonl(out)
    tickets = read_jsonl(tiny_data["train"])[:3]
    assert len(pairs) == 3 and "3 prompts: 0 answered right, 3 pairs" in res.stdout
    prompts = [[{"role": "user", "content": f"{t['instruction']}\n\n{t['input']}"}] for t in tickets]
    own = ev.generate(load_model(str(BASE_MODEL)), tokenizer, prompts, 16, 4)
    assert [p["messages"] for p in pairs] == prompts
    assert [p["chosen"] for p in pairs] == [t["output"] for t in tickets]
    assert [p["rejected"] for p in pairs] == own  # the model's own greedy answers
    assert all(p["rejected_kind"] in preference_metrics.REJECTED_KINDS for p in pairs)
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, dict(pref_data, train=out), tmp_path / "dpo",
                                         eval={"before": False}))
    assert json.loads((preference.run(cfg) / "manifest.json").read_text())["training"]["steps"] == 2


def test_onpolicy_pairs_bad_input(tmp_path, tiny_model_dir):
    text = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a document"}])
    res = run_cli(["pairs", tiny_model_dir, "--data", text, "--out", tmp_path / "o.jsonl"])
    assert res.returncode != 0 and "raw text rows have no reference answer" in res.stderr
    res = run_cli(["pairs", tiny_model_dir, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "o.jsonl"])
    assert res.returncode != 0 and "dataset file not found" in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_hard_negative_pairs_reject_the_models_top_wrong_value(tmp_path, tiny_model_dir, tiny_data, tokenizer):
    """`llmstack pairs --mode hard`: a pair for every prompt; rejected = the reference with exactly one scored field
    set to another value that field takes in the dataset, and it is the variant the model scores highest (checked
    here by scoring every variant independently with the full-forward scorer)."""
    from modeling.model import load_model
    from training.preference import onpolicy
    from training.preference.data import PrefRow, _encode

    out = tmp_path / "hard.jsonl"
    res = run_cli(["pairs", tiny_model_dir, "--data", tiny_data["train"], "--out", out, "--mode", "hard",
                   "--max-rows", 3])
    assert res.returncode == 0, res.stderr[-3000:]
    pairs, tickets = read_jsonl(out), read_jsonl(tiny_data["train"])
    assert len(pairs) == 3 and "3 hard-negative pairs" in res.stdout
    values = {f: {json.loads(t["output"])[f] for t in tickets[:3]} for f in FIELDS}
    model = load_model(str(tiny_model_dir))
    for pair, ticket in zip(pairs, tickets):
        ref, rej = json.loads(ticket["output"]), json.loads(pair["rejected"])
        assert pair["chosen"] == ticket["output"]
        changed = [k for k in ref if ref[k] != rej[k]]
        assert changed == [pair["rejected_field"]] and rej[changed[0]] in values[changed[0]]
        assert list(rej) == list(ref)  # formatted like the reference: only the value changed
        assert len(pair["rejected"]) - len(ticket["output"]) == len(rej[changed[0]]) - len(ref[changed[0]])
        variants = [onpolicy.swap_field(ticket["output"], f, v) for f in FIELDS for v in sorted(values[f])
                    if v != ref[f]]
        rows = [PrefRow(source="", prompt=pair["messages"], chosen=ticket["output"], rejected=v) for v in variants]
        for r in rows:
            _encode(tokenizer, r)
        scores = preference_metrics.sequence_logps(model, tokenizer.pad_token_id,
                                                   [(r.prompt_ids, r.rejected_ids) for r in rows])
        assert pair["rejected"] == variants[max(range(len(rows)), key=scores.__getitem__)]


def test_mirrored_pairs_choose_each_label_as_often_as_they_reject_it(tmp_path, tiny_model_dir, tiny_data):
    """`--mode mirrored`: every mistake (a wrong label outscores the reference; checked against --mode hard on the
    same rows) is followed by a mirror that prefers the mistaken label over the right one on another prompt whose
    reference has it, so per field and value the chosen and rejected counts are equal."""
    from collections import Counter

    hard, mirrored = tmp_path / "hard.jsonl", tmp_path / "mirrored.jsonl"
    for mode, out in (("hard", hard), ("mirrored", mirrored)):
        res = run_cli(["pairs", tiny_model_dir, "--data", tiny_data["train"], "--out", out, "--mode", mode])
        assert res.returncode == 0, res.stderr[-3000:]
    mistakes = [p for p in read_jsonl(hard) if p["logp_margin"] < 0]
    pairs = read_jsonl(mirrored)
    assert mistakes, "the random tiny model should rank some wrong label first"
    assert pairs and len(pairs) % 2 == 0 and [p["role"] for p in pairs] == ["mistake", "mirror"] * (len(pairs) // 2)
    unmatched = len(mistakes) - len(pairs) // 2
    assert f"{unmatched} mistakes without a mirror left out" in res.stdout
    assert [p["messages"] for p in pairs[::2]] == [p["messages"] for p in mistakes
                                                   if any(p["messages"] == q["messages"] for q in pairs[::2])]
    chosen, rejected = Counter(), Counter()
    for mistake, mirror in zip(pairs[::2], pairs[1::2]):
        f = mistake["rejected_field"]
        right, wrong = json.loads(mistake["chosen"])[f], mistake["rejected_value"]
        assert mistake["logp_margin"] < 0 and mirror["rejected_field"] == f
        assert json.loads(mirror["chosen"])[f] == wrong and mirror["rejected_value"] == right
        assert mirror["messages"] != mistake["messages"]
        for p in (mistake, mirror):
            chosen[(f, json.loads(p["chosen"])[f])] += 1
            rejected[(f, p["rejected_value"])] += 1
    assert chosen == rejected
    assert len({json.dumps(p["messages"]) for p in pairs[1::2]}) == len(pairs) // 2  # each prompt mirrors once
    assert len({json.dumps([p["messages"], p["chosen"], p["rejected"]]) for p in pairs}) == len(pairs)  # no duplicates


def test_mirrored_pairs_never_repeat_a_mistake_as_a_mirror():
    """Two mistakes that mirror each other (low read as medium, medium read as low): the hardest mirror for each is
    the other mistake prompt, which would repeat its row (and the data pipeline would drop the copy, unbalancing
    the set); right prompts are taken instead."""
    from types import SimpleNamespace

    from training.preference.onpolicy import mirrored_pairs

    def item(name, true, logps):  # logps: the model's score of each urgency value; the reference is `true`
        ref = json.dumps({"urgency": true})
        return {"ex": SimpleNamespace(prompt_messages=lambda: [{"role": "user", "content": name}]), "ref": ref,
                "obj": {"urgency": true}, "ref_logp": logps[true],
                "variants": [("urgency", v, json.dumps({"urgency": v}), lp) for v, lp in logps.items() if v != true]}

    scored = [item("A", "low", {"low": -3.0, "medium": -1.0}), item("B", "medium", {"low": -1.0, "medium": -2.0}),
              item("C", "medium", {"low": -4.0, "medium": -1.0}), item("D", "low", {"low": -1.0, "medium": -5.0})]
    pairs, unmatched = mirrored_pairs(scored)
    rows = [(p["messages"][0]["content"], p["role"], json.loads(p["chosen"])["urgency"], p["rejected_value"])
            for p in pairs]
    assert unmatched == 0 and rows == [("A", "mistake", "low", "medium"), ("C", "mirror", "medium", "low"),
                                       ("B", "mistake", "medium", "low"), ("D", "mirror", "low", "medium")]


def test_answer_logps_with_a_shared_prompt_cache_match_the_full_forward(tiny_model_dir):
    from modeling.model import load_model
    from training.preference.onpolicy import answer_logps

    model = load_model(str(tiny_model_dir)).eval()
    prompt, answers = [1, 5, 9, 13], [[20, 21, 22], [30, 31, 32, 33, 34], [40]]
    full = preference_metrics.sequence_logps(model, 0, [(prompt, a) for a in answers], batch_size=3)
    assert answer_logps(model, prompt, answers) == pytest.approx(full, abs=1e-3)


@pytest.mark.parametrize("reference,field,value,want", [
    ('{"category": "billing", "urgency": "low"}', "urgency", "high", '{"category": "billing", "urgency": "high"}'),
    ('{"a":"x","b":"y"}', "a", 'say "hi"', '{"a":"say \\"hi\\"","b":"y"}'),
    ('{"a": "x \\" y", "b": "y"}', "a", "z", '{"a": "z", "b": "y"}'),
])
def test_swap_field_keeps_the_reference_format(reference, field, value, want):
    from training.preference.onpolicy import swap_field

    assert swap_field(reference, field, value) == want
    assert json.loads(swap_field(reference, field, value))[field] == value


def test_hard_negative_pairs_need_a_label_field(tmp_path, tiny_model_dir, tiny_data):
    res = run_cli(["pairs", tiny_model_dir, "--data", tiny_data["train"], "--out", tmp_path / "o.jsonl",
                   "--mode", "hard", "--fields", "colour"])
    assert res.returncode == 2 and "--fields" in res.stderr and "colour: 0" in res.stderr
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- metric definitions
@pytest.mark.parametrize("before,after", [("xx..x.", "..x..."), ("x" * 12 + "." * 7, "." * 12 + "x" * 7), ("..", ".."),
                                          ("x" * 10, "." * 10)])
def test_paired_change_counts_fixed_and_broken_answers_with_a_sign_test(before, after):
    from scipy.stats import binomtest

    rows = lambda marks: [{"rejected_like": "wrong_value" if c == "x" else None} for c in marks]  # noqa: E731
    got = preference_metrics.paired_change(rows(before), rows(after))
    fixed = sum(b == "x" and a == "." for b, a in zip(before, after))
    broken = sum(b == "." and a == "x" for b, a in zip(before, after))
    assert (got["answers_fixed"], got["answers_broken"]) == (fixed, broken)
    want = binomtest(fixed, fixed + broken).pvalue if fixed + broken else 1.0
    assert got["sign_test_p"] == pytest.approx(want, abs=1e-4)
    assert (got["format_fixed"], got["format_broken"]) == (0, 0)  # every mistake here is a wrong label


def test_format_errors_are_counted_apart_from_wrong_labels():
    """invalid JSON -> wrong label is a format fix (not an answer fix); right -> prose is a format break."""
    kinds = [("invalid_json", "wrong_value"), ("extra_text", None), ("missing_field", "missing_field"),
             (None, "invalid_json"), ("wrong_value", "extra_text"), ("invalid_json", "wrong_value")]
    got = preference_metrics.paired_change([{"rejected_like": b} for b, _ in kinds],
                                           [{"rejected_like": a} for _, a in kinds])
    assert (got["answers_fixed"], got["answers_broken"]) == (1, 1)
    assert (got["format_fixed"], got["format_broken"]) == (3, 2)
    ref = '{"category": "billing", "product": "orbit_app", "urgency": "low"}'
    preds = [ref, "no json", ref.replace("low", "high"), 'Sure: ' + ref]
    assert preference_metrics.answer_metrics(preds, [ref] * 4, FIELDS)["format_errors"] == 0.5


@pytest.mark.parametrize("prediction,kind", [
    ('{"category": "billing", "product": "orbit_app", "urgency": "low"}', None),
    ('{"category": "billing", "product": "orbit_app"', "invalid_json"),
    ('Sure! {"category": "billing", "product": "orbit_app", "urgency": "low"}', "extra_text"),
    ('{"category": "billing", "product": "orbit_app"}', "missing_field"),
    ('{"category": "account", "product": "orbit_app", "urgency": "low"}', "wrong_value"),
])
def test_rejected_kind(prediction, kind):
    ref = '{"category": "billing", "product": "orbit_app", "urgency": "low", "summary": "x"}'
    assert preference_metrics.rejected_kind(prediction, ref, FIELDS) == kind


def test_sequence_logps_match_the_full_forward(tiny_model_dir):
    from modeling.model import load_model

    model = load_model(str(tiny_model_dir)).eval()
    rows = [([1, 5, 9, 13], [20, 21, 22]), ([1, 7], [30, 31, 32, 33, 34])]
    got = preference_metrics.sequence_logps(model, 0, rows, batch_size=2)
    for (p, a), value in zip(rows, got):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        assert value == pytest.approx(want, abs=1e-3)


def test_pair_metrics():
    m = preference_metrics.pair_metrics([-1.0, -5.0], [-2.0, -3.0], {"chosen_logps": [-1.0, -6.0],
                                                                     "rejected_logps": [-1.0, -3.0]}, beta=0.5)
    assert m["pref_accuracy"] == 0.5 and m["logp_margin"] == -0.5
    assert m["reward_margin"] == pytest.approx(0.5 * ((0 + 1) + (1 - 0)) / 2) and m["reward_accuracy"] == 1.0


# ---------------------------------------------------------------- bad input
BAD = [
    ("missing side", lambda r: {k: v for k, v in r.items() if k != "rejected"}, 2, "rejected", "missing field"),
    ("equal sides", lambda r: dict(r, rejected=r["chosen"] + "  "), 3, "rejected", "same answer"),
    ("empty chosen", lambda r: dict(r, chosen=" "), 1, "chosen", "empty string"),
    ("no prompt", lambda r: {"chosen": r["chosen"], "rejected": r["rejected"]}, 2, "prompt", "missing field"),
]


@pytest.mark.parametrize("name,corrupt,line,field,text", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_line_field(tmp_path, tiny_model_dir, pref_data, name, corrupt, line, field, text):
    rows = pair_rows(3)
    rows[line - 1] = corrupt(rows[line - 1])
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, dict(pref_data, train=bad), tmp_path / "out"))
    with pytest.raises(StackError) as exc:
        preference.run(cfg)
    msg = str(exc.value)
    assert f"{bad}:{line}" in msg and f"field '{field}'" in msg and text in msg
    assert not (tmp_path / "out").exists()  # rows are checked before any folder is made


def test_failure_while_training_leaves_nothing(tmp_path, tiny_model_dir, pref_data, monkeypatch):
    """A crash after the run started (here: in the trainer) leaves neither an artifact nor its work folder."""
    def boom(*a, **k):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(preference, "build_trainer", boom)
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, pref_data, tmp_path / "out", eval={"before": False}))
    with pytest.raises(RuntimeError, match="killed mid-run"):
        preference.run(cfg)
    out = tmp_path / "out"
    assert not [p for p in out.rglob("*") if p.is_file()] and not (out / "latest").exists()


def test_empty_file_and_chat_dataset_without_pairs(tmp_path, tiny_model_dir, pref_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    for data, expect in ((dict(pref_data, train=empty), (str(empty), "field 'data.train'", "empty")),
                         (dict(pref_data, train=chat), (str(chat), "field 'chosen'", "recipe dpo needs preference"))):
        cfg = pref_config(tiny_model_dir, data, tmp_path / "out")
        proc = run_cli(["train", "--config", write_yaml(tmp_path / "c.yaml", cfg)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert all(e in proc.stderr for e in expect), proc.stderr[-2000:]
        assert not (tmp_path / "out").exists()


def test_kto_unpaired_rows_and_bad_label(tmp_path, tiny_model_dir, pref_data):
    rows = [{"instruction": r["instruction"], "input": r["input"], "completion": r["chosen"], "label": True}
            for r in pair_rows(3)] + [{"prompt": "Say hi", "completion": "no", "label": "yes"}]
    bad = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, dict(pref_data, train=bad), tmp_path / "out", "kto"))
    with pytest.raises(StackError, match=rf"{bad}:4: field 'label': must be true or false"):
        preference.run(cfg)
    # the same rows are refused by dpo: they are not pairs
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, dict(pref_data, train=bad), tmp_path / "out", "dpo"))
    with pytest.raises(StackError, match="recipe dpo needs preference rows with chosen / rejected"):
        preference.run(cfg)


def test_loss_type_checked(tmp_path, tiny_model_dir, pref_data):
    cfg = load_cfg(tmp_path, pref_config(tiny_model_dir, pref_data, tmp_path / "out", "kto",
                                         preference={"loss_type": "sigmoid"}))
    with pytest.raises(StackError, match="kto has no loss_type 'sigmoid'"):
        preference.run(cfg)


def test_shipped_dataset_and_config():
    """data/preference is what data/generate_preference.py makes, and configs/dpo.yaml loads."""
    train, test = read_jsonl(ROOT / "data/preference/train.jsonl"), read_jsonl(ROOT / "data/preference/test.jsonl")
    assert len(train) == 400 and len(test) == 100
    assert all(r["chosen"] != r["rejected"] and json.loads(r["chosen"]) for r in train + test)
    assert {r["rejected_kind"] for r in test} == {"wrong_category", "wrong_urgency", "missing_field", "invalid_json",
                                                  "extra_prose"}
    train_inputs = {r["input"] for r in read_jsonl(ROOT / "data/tickets/train.jsonl")}
    assert not any(r["input"] in train_inputs for r in test)  # held-out prompts
    cfg = load(TrainConfig, ROOT / "configs/dpo.yaml")
    assert cfg.recipe == "dpo" and cfg.data.test[0].path == "data/preference/test.jsonl"
