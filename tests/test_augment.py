"""Augmentation (chatdata/augment/, `llmstack augment`, data.augment in training) and reweighing (chatdata/reweigh.py):
each operation on a fixed seed, the quality filter's drops and reasons, lineage, test rows never augmented, a
paraphrase through the project's own OpenAI-compatible server, and the Kamiran-Calders weights."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_jsonl, run_cli, ticket_rows, write_jsonl, write_yaml

from chatdata.augment import augment
from chatdata.augment.config import DEFAULT_PARAPHRASE, AugmentCfg, AugmentFilter
from chatdata.augment.quality import Filter
from chatdata.augment.rows import derive, free_text, message, template
from chatdata.config import DataCfg, DatasetSpec
from chatdata.files import Example
from core.errors import ConfigError, DataError, StackError

INSTRUCTION = "Triage the ticket. Reply with only JSON: category, urgency, summary."


def chat(source: str, text: str, answer: dict) -> Example:
    return Example(source=source, messages=[{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
                                            {"role": "assistant", "content": json.dumps(answer)}])


def tickets(n: int = 12) -> list[Example]:
    from chatdata import pipeline
    rows = pipeline.read_rows(DatasetSpec(path="data/tickets/train.jsonl"), DataCfg())
    return rows[:n]


def cfg(*ops, **filter_) -> AugmentCfg:
    return AugmentCfg.model_validate({"operations": list(ops), "filter": filter_})


# ---------------------------------------------------------------- operations
@pytest.mark.parametrize("op", ["char_noise", "word_noise", "casing"])
def test_noise_is_seeded_keeps_the_template_and_the_answer_and_protects_answer_words(op):
    rows = tickets()
    a = augment(rows, cfg({"op": op, "rate": 1, "seed": 3}, dedup=False, same_language=False), near_threshold=0.9)
    b = augment(rows, cfg({"op": op, "rate": 1, "seed": 3}, dedup=False, same_language=False), near_threshold=0.9)
    c = augment(rows, cfg({"op": op, "rate": 1, "seed": 4}, dedup=False, same_language=False), near_threshold=0.9)
    assert [message(x) for x in a.rows] == [message(x) for x in b.rows]  # same seed, same rows
    assert [message(x) for x in a.rows] != [message(x) for x in c.rows]
    assert a.rows, "every row got a copy, and a copy that changes nothing is dropped"
    by_source = {ex.source: ex for ex in rows}
    shared = template(rows)
    assert any(p.startswith("Triage the ticket") for p in shared)  # the shared instruction is the template
    for new in a.rows:
        parent = by_source[new.parent]
        assert new.operation.startswith(op) and new.source.startswith(parent.source + f"+{op}")
        assert new.reference() == parent.reference()                  # labels kept
        assert message(new).split("\n\n")[0] == message(parent).split("\n\n")[0]  # the instruction untouched
        assert free_text(new, shared) != free_text(parent, shared)
        words_in_answer = set(re.findall(r"\S+", parent.reference())) & set(re.findall(r"\S+", message(parent)))
        for w in words_in_answer:                                      # e.g. an error code the summary repeats
            assert re.findall(r"\S+", message(new)).count(w) >= re.findall(r"\S+", message(parent)).count(w), w


def test_rate_draws_copies_per_row():
    rows = tickets(40)
    half = augment(rows, cfg({"op": "char_noise", "rate": 0.5}, dedup=False, same_language=False, max_per_original=5),
                   near_threshold=0.9)
    two = augment(rows, cfg({"op": "char_noise", "rate": 2}, dedup=False, same_language=False, max_per_original=5),
                  near_threshold=0.9)
    made_half, made_two = half.report["operations"][0]["made"], two.report["operations"][0]["made"]
    assert 10 <= made_half <= 30 and made_two == 80
    assert max(Counter(ex.parent for ex in two.rows).values()) == 2


def test_slots_replace_one_value_in_prompt_and_answer_alike():
    texts = ["The update fails with error ERR-{} on my router, every single time I try it.",
             "My camera shows ERR-{} after the last firmware update and will not record anything.",
             "Since this morning the app crashes at start with ERR-{} on both of my phones."]
    rows = [chat(f"f:{i}", t.format(c), {"category": "technical", "summary": f"Update fails with ERR-{c}."})
            for i, (t, c) in enumerate(zip(texts, (19, 42, 7)))]
    out = augment(rows, cfg({"op": "slots", "slots": {"code": r"ERR-\d+"}, "rate": 1}, same_language=False),
                  near_threshold=0.95)
    assert len(out.rows) == 3
    for new in out.rows:
        old_code = re.search(r"ERR-\d+", message(next(r for r in rows if r.source == new.parent))).group(0)
        new_code = re.search(r"ERR-\d+", message(new)).group(0)
        assert new_code != old_code and new_code in {"ERR-19", "ERR-42", "ERR-7"}
        assert json.loads(new.reference())["summary"] == f"Update fails with {new_code}."
        assert json.loads(new.reference())["category"] == "technical"


def test_synonyms_name_the_same_thing_another_way_and_keep_the_answer(tmp_path):
    forms = write_yaml(tmp_path / "forms.yaml", {"router": ["Nimbus R2", "Nimbus R2 router", "NR-200"],
                                                 "camera": ["Aurora Cam", "AC-4K"]})
    rows = [chat("f:0", "My Nimbus R2 router keeps dropping wifi every evening since the update.",
                 {"product": "router"}),
            chat("f:1", "the nr-200 will not start after a power cut yesterday, lights stay off.", {"product": "router"}),
            chat("f:2", "Nothing about products in this message, only a question about my invoice.", {"product": ""})]
    out = augment(rows, cfg({"op": "synonyms", "synonyms": str(forms)}, same_language=False, near_dup_threshold=0.98),
                  near_threshold=0.9)
    assert out.report["operations"][0]["not_applicable"] == 1 and len(out.rows) == 2
    first, second = out.rows
    assert first.operation == "synonyms:router" and first.reference() == rows[0].reference()
    assert re.search(r"My (Nimbus R2|NR-200) keeps", message(first))          # the longest form was replaced whole
    assert re.search(r"the (nimbus r2|nimbus r2 router) will", message(second))  # a lower-case form stays lower-case
    bad = write_yaml(tmp_path / "bad.yaml", {"router": ["only one"]})
    with pytest.raises(ConfigError) as err:
        augment(rows, cfg({"op": "synonyms", "synonyms": str(bad)}), near_threshold=0.9)
    assert err.value.field == "router" and err.value.line == 1


def test_slots_without_patterns_is_a_config_error_naming_the_field():
    with pytest.raises(StackError) as err:
        from core.config import validate
        validate(DataCfg, {"augment": {"operations": [{"op": "slots"}]}})
    assert "augment.operations.0" in str(err.value) and "slots" in str(err.value)


def terms_file(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "terms.yaml", {"attributes": {"gender": {"groups": {
        "female": {"name": ["Emma", "Julia"], "pronoun": ["she"], "possessive": ["her"]},
        "male": {"name": ["Tom", "Noah"], "pronoun": ["he"], "possessive": ["his"]}}}}})


def test_counterfactual_swaps_aligned_terms_and_keeps_labels(tmp_path):
    rows = [chat("f:1", "My router is down. She asked me to write: Julia needs her router today. Thanks, Julia",
                 {"category": "technical", "urgency": "high", "summary": "Julia's router is down."}),
            chat("f:2", "Nobody is named here. The router is down.", {"category": "technical", "urgency": "low",
                                                                        "summary": "Router down."})]
    out = augment(rows, cfg({"op": "counterfactual", "terms": str(terms_file(tmp_path))}, same_language=False),
                  near_threshold=0.95)
    assert len(out.rows) == 1 and out.report["operations"][0]["not_applicable"] == 1
    new = out.rows[0]
    assert free_text(new, template(rows)) == \
        "My router is down. He asked me to write: Noah needs his router today. Thanks, Noah"
    assert new.operation == "counterfactual:gender:female->male"
    answer = json.loads(new.reference())
    assert answer == {"category": "technical", "urgency": "high", "summary": "Noah's router is down."}


# ---------------------------------------------------------------- the filter
def test_filter_drops_with_the_reason(tmp_path):
    rows = [chat(f"f:{i}", t, {"category": "billing"}) for i, t in enumerate([
        "I was charged twice for my order this month, please refund the second charge.",
        "My invoice shows the wrong address and I need a corrected copy for my accountant."])]
    shared = template(rows)
    same = derive(rows[0], shared, lambda p: p, "x", 1)
    short = derive(rows[0], shared, lambda p: "refund", "x", 2)
    german = derive(rows[1], shared, lambda p: "Meine Rechnung zeigt die falsche Adresse und ich brauche eine "
                    "korrigierte Kopie.", "x", 3)
    dup = derive(rows[1], shared, lambda p: rows[0].messages[0]["content"].split("\n\n")[1], "x", 4)
    near = derive(rows[0], shared, lambda p: p.replace("please", "pls"), "x", 5)
    ok1 = derive(rows[0], shared, lambda p: "I got charged two times this month for one order; refund one.", "x", 6)
    ok2 = derive(rows[0], shared, lambda p: "Two charges for a single order this month. Please refund one of them.",
                 "x", 7)
    keep = Filter(AugmentFilter(max_per_original=1), rows, shared, 0.5, [], None)
    kept = keep([same, short, german, dup, near, ok1, ok2])
    reasons = {d["row"].split("#")[1]: d["reason"] for d in keep.drops}
    assert reasons == {"1": "unchanged", "2": "length", "3": "language", "4": "exact_duplicate",
                       "5": "near_duplicate", "7": "cap"}
    assert kept == [ok1]
    assert all(d["parent"] in {"f:0", "f:1"} and d["operation"] == "x" for d in keep.drops)


def test_label_check_drops_rows_whose_labels_the_model_no_longer_gives():
    rows = [chat("f:0", "Charged twice this month for the same order, refund please.",
                 {"category": "billing", "urgency": "high"}),
            chat("f:1", "How do I change my email address on the account page?",
                 {"category": "account", "urgency": "low"})]
    shared = template(rows)
    new = [derive(r, shared, lambda p: p.upper(), "casing", 1) for r in rows]
    seen = []

    def model(prompts):  # answers as a classifier would: the first row keeps its labels, the second does not
        seen.extend(prompts)
        return ['{"category": "billing", "urgency": "high"}', 'Sure! {"category": "billing", "urgency": "low"}']
    keep = Filter(AugmentFilter(same_language=False), rows, shared, 0.9, ["category", "urgency"], model)
    assert keep(new) == [new[0]]
    assert seen == [n.prompt_messages() for n in new]  # the model saw the new prompts
    assert keep.drops == [{"row": new[1].source, "parent": "f:1", "operation": "casing", "reason": "label_changed",
                           "detail": "category: 'account' -> 'billing'"}]


# ---------------------------------------------------------------- in the pipeline, on the command line
def test_pipeline_augments_the_training_split_only_and_keeps_lineage(tmp_path, tokenizer):
    from chatdata import pipeline, splits

    data = {"train": [{"path": "data/tickets/train.jsonl", "weight": 0.03}],
            "validation": [{"path": "data/tickets/validation.jsonl", "weight": 0.1}],
            "test": [{"path": "data/tickets/test.jsonl"}]}
    plain = pipeline.prepare(DataCfg.model_validate(data), tokenizer, seed=1)
    aug = pipeline.prepare(DataCfg.model_validate(data | {"augment": {"operations": [
        {"op": "char_noise", "rate": 1}, {"op": "casing", "rate": 1, "seed": 2}]}}), tokenizer, seed=1)
    assert [e.flat_text() for e in aug.validation] == [e.flat_text() for e in plain.validation]
    assert [e.flat_text() for e in aug.test] == [e.flat_text() for e in plain.test]
    originals = aug.train[:len(plain.train)]
    new = aug.train[len(plain.train):]
    assert [e.flat_text() for e in originals] == [e.flat_text() for e in plain.train]
    rep = aug.report["augment"]
    assert len(new) == rep["rows_added"] > 0 and all(e.input_ids and e.parent for e in new)
    for op in rep["operations"]:  # every made row is kept or dropped with a reason
        assert op["made"] == op["kept"] + sum(op["dropped"].values())
    assert {x["row"] for x in rep["lineage"]} == {e.source for e in new}
    assert "## Augmentation" in pipeline.report_markdown(aug.report)
    assert not any(e.parent for e in aug.test + aug.validation)
    splits.save(aug, tmp_path / "data")
    saved = read_jsonl(tmp_path / "data" / "train.jsonl")
    assert [(r.get("parent"), r.get("operation")) for r in saved[len(originals):]] == \
        [(e.parent, e.operation) for e in new]
    back = splits.load(tmp_path / "data", tokenizer)
    assert [(e.parent, e.operation) for e in back.train] == [(e.parent, e.operation) for e in aug.train]


def test_llmstack_augment_writes_rows_and_report_and_names_bad_settings(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ticket_rows(6))
    out = tmp_path / "out.jsonl"
    r = run_cli(["augment", str(src), "-o", str(out), "data.augment.operations=[{op: word_noise, rate: 1}]"])
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert len(rows) == 6 + report["rows_added"] and report["rows_added"] > 0
    assert all("parent" not in x for x in rows[:6]) and all(x["parent"].startswith(str(src)) for x in rows[6:])
    assert "## Augmentation" in out.with_suffix(".report.md").read_text()
    bad = run_cli(["augment", str(src), "-o", str(tmp_path / "bad.jsonl"),
                   "data.augment.operations=[{op: char_noise, rate: -1}]"])
    assert bad.returncode == 2 and "data.augment.operations.0.rate" in bad.stderr
    assert not (tmp_path / "bad.jsonl").exists()
    none = run_cli(["augment", str(src), "-o", str(tmp_path / "none.jsonl")])
    assert none.returncode == 2 and "data.augment.operations" in none.stderr


def test_paraphrase_round_trips_through_the_projects_own_server(tiny_model_dir, tmp_path):
    """The paraphrase operation against `llmstack serve` on the tiny model (an OpenAI-compatible endpoint): each new
    row's message is what the server answers to the rewrite prompt, greedy."""
    import openai
    from serving_fixtures import start_server, stop_server

    rows = tickets(3)
    proc, base, _ = start_server(tiny_model_dir, log_path=tmp_path / "serve.log")
    try:
        gen = {"model": "tiny", "endpoint": f"{base}/v1", "temperature": 0, "max_new_tokens": 12}
        out = augment(rows, cfg({"op": "paraphrase", "generator": gen}, dedup=False, same_language=False,
                                min_length_ratio=0, max_length_ratio=100), near_threshold=0.9)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        shared = template(rows)
        made = {x.parent: x for x in out.rows}
        assert out.report["operations"][0]["made"] == 3 and made
        for ex in rows:
            want = client.chat.completions.create(model="tiny", temperature=0, max_tokens=12, messages=[
                {"role": "user", "content": f"{DEFAULT_PARAPHRASE}\n\n{free_text(ex, shared)}"}]).choices[0]
            if ex.source in made:  # (a reply equal to the message itself is dropped as unchanged)
                assert free_text(made[ex.source], shared) == want.message.content.strip()
                assert made[ex.source].reference() == ex.reference()
        regen = augment(rows, cfg({"op": "paraphrase", "generator": gen, "answer_model": gen}, dedup=False,
                                  same_language=False, min_length_ratio=0, max_length_ratio=100), near_threshold=0.9)
        for new in regen.rows:  # the answer regenerated for the new prompt, by the answer model (greedy)
            want = client.chat.completions.create(model="tiny", temperature=0, max_tokens=12,
                                                  messages=new.prompt_messages()).choices[0].message.content
            assert new.reference() == want
        bad = {"model": "tiny", "endpoint": "http://127.0.0.1:9/v1", "max_new_tokens": 4}
        with pytest.raises(DataError) as err:
            augment(rows, cfg({"op": "paraphrase", "generator": bad}), near_threshold=0.9)
        assert err.value.field == "data.augment.operations.0.generator.endpoint"
    finally:
        stop_server(proc)


# ---------------------------------------------------------------- reweighing
def test_reweighing_makes_group_and_label_independent(tmp_path):
    from chatdata.config import ReweighCfg
    from chatdata.reweigh import reweigh

    layout = {("Emma", "high"): 6, ("Emma", "low"): 2, ("Tom", "high"): 1, ("Tom", "low"): 5, (None, "low"): 3,
              (None, "high"): 1}  # every cell filled: then the weighted joint is exactly the product of marginals
    rows = [chat(f"f:{i}", f"The router is down. Thanks, {who}" if who else "The router is down.",
                 {"category": "technical", "urgency": label})
            for i, ((who, label), n) in enumerate((k, n) for k, n in layout.items() for _ in range(n))]
    rows.append(Example(source="t:1", text="raw text has no label"))
    report = reweigh(rows, ReweighCfg(terms=str(terms_file(tmp_path)), label_field="urgency"))
    n = sum(layout.values())
    group = {"Emma": "female", "Tom": "male", None: "none"}
    n_g = Counter(group[w] for (w, _), k in layout.items() for _ in range(k))
    n_y = Counter(y for (_, y), k in layout.items() for _ in range(k))
    for ex in rows[:-1]:
        who = re.search(r"Thanks, (\w+)", message(ex))
        g, y = group[who.group(1) if who else None], json.loads(ex.reference())["urgency"]
        n_gy = sum(k for (w, lab), k in layout.items() if group[w] == g and lab == y)
        assert ex.weight == pytest.approx(n_g[g] * n_y[y] / (n * n_gy))  # Kamiran & Calders
    assert rows[-1].weight == 1.0 and report["unlabelled"] == 1
    # after weighting, P_w(group, label) = P_w(group) * P_w(label) for every cell
    total = sum(ex.weight for ex in rows[:-1])
    cell, pg, py = Counter(), Counter(), Counter()
    for ex in rows[:-1]:
        who = re.search(r"Thanks, (\w+)", message(ex))
        g, y = group[who.group(1) if who else None], json.loads(ex.reference())["urgency"]
        cell[(g, y)] += ex.weight / total
        pg[g] += ex.weight / total
        py[y] += ex.weight / total
    for (g, y), p in cell.items():
        assert p == pytest.approx(pg[g] * py[y])
    with pytest.raises(ConfigError) as err:
        reweigh(rows, ReweighCfg(terms=str(terms_file(tmp_path)), label_field="nope"))
    assert err.value.field == "data.reweigh.label_field"


def test_a_training_run_records_lineage_and_trains_with_the_weights(tiny_config, tiny_data, tmp_path, monkeypatch):
    """llmstack train with data.augment and data.reweigh on the tiny model: the artifact's data/train.jsonl and
    manifest name every new row's parent and operation, the manifest has the weights table, and every training batch
    reaches the loss with its rows' weights."""
    from training.sft import recipe, trainer

    names = {m.group(1) for r in read_jsonl(tiny_data["train"]) for m in re.finditer(r"\n(\w+) \w+$", r["input"])}
    assert len(names) >= 2, names
    terms = write_yaml(tmp_path / "t.yaml", {"attributes": {"gender": {"groups": {
        "a": {"name": sorted(names)[::2]}, "b": {"name": sorted(names)[1::2]}}}}})
    seen = []
    real = trainer.answer_loss

    def spy(model, batch, fast=True):
        seen.append(batch.get("loss_weights"))
        return real(model, batch, fast=fast)
    monkeypatch.setattr(trainer, "answer_loss", spy)
    cfg = tiny_config(data={"augment": {"operations": [{"op": "char_noise", "rate": 1}]},
                            "reweigh": {"enabled": True, "terms": str(terms), "label_field": "urgency"}})
    art = recipe.run(cfg)
    manifest = json.loads((art / "manifest.json").read_text())
    lineage = manifest["augmentation"]["lineage"]
    saved = read_jsonl(art / "data" / "train.jsonl")
    assert len(saved) == 8 + len(lineage) and lineage
    assert [{"row": r["source"], "parent": r["parent"], "operation": r["operation"]} for r in saved[8:]] == lineage
    assert manifest["reweighing"]["label_field"] == "urgency" and manifest["reweighing"]["cells"]
    weights = {r.get("weight", 1.0) for r in saved}
    assert len(weights) > 1, "reweighing gave the rows different weights"
    train_batches = [w for w in seen if w is not None]
    assert train_batches and len(train_batches) >= cfg.train.max_steps
    assert {round(float(x), 4) for w in train_batches for x in w.unique()} - {0.0} <= {round(x, 4) for x in weights}
    assert "## Augmentation" in (art / "data_report.md").read_text()
    assert "## Reweighing" in (art / "data_report.md").read_text()


@pytest.mark.parametrize("config, section", [("configs/curriculum.yaml", "data.augment"),
                                             ("configs/dpo.yaml", "data.reweigh")])
def test_recipes_that_do_not_augment_refuse_the_settings_instead_of_ignoring_them(config, section, tokenizer):
    from core.config import load
    from training.config import TrainConfig
    from training.preference import data as preference_data
    from training.sft import curriculum

    override = "data.augment.operations=[{op: casing}]" if section == "data.augment" else "data.reweigh.enabled=true"
    cfg = load(TrainConfig, config, [override])
    prepare = curriculum.prepare_data if "curriculum" in config else preference_data.prepare
    with pytest.raises(ConfigError) as err:
        prepare(cfg, tokenizer)
    assert err.value.field == section


def test_a_row_mixed_in_twice_is_augmented_once_and_weighed_once(tmp_path, tokenizer):
    """data.train weight 2 repeats each row (the same object twice): one set of new rows, one weight per row."""
    from chatdata import pipeline

    rows = write_jsonl(tmp_path / "t.jsonl", ticket_rows(10))
    names = {m.group(1) for r in read_jsonl(rows) for m in re.finditer(r"\n(\w+) \w+$", r["input"])}
    terms = write_yaml(tmp_path / "t.yaml", {"attributes": {"gender": {"groups": {
        "a": {"name": sorted(names)[::2]}, "b": {"name": sorted(names)[1::2]}}}}})
    cfg = DataCfg.model_validate({"train": [{"path": str(rows), "weight": 2}], "validation": [], "val_ratio": 0,
                                  "test": [{"path": "data/tickets/test.jsonl"}],
                                  "augment": {"operations": [{"op": "char_noise", "rate": 1}]},
                                  "reweigh": {"enabled": True, "terms": str(terms), "label_field": "urgency"}})
    out = pipeline.prepare(cfg, tokenizer, seed=1)
    rep = out.report["augment"]
    assert rep["rows_original"] == 10 and rep["operations"][0]["made"] == 10
    assert Counter(ex.parent for ex in out.train if ex.parent) == Counter({p: 1 for p in {
        ex.parent for ex in out.train if ex.parent}})
    weights = {cell["weight"] for cell in out.report["reweigh"]["cells"]}
    assert {round(ex.weight, 4) for ex in out.train} <= weights
