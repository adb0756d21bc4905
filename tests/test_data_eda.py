"""The exploratory data report: label fields per split, common n-grams without the shared instruction, train/test
leakage (a warning, or an error naming every leaked row), personal data counted without being copied, and
`llmstack data --output` writing the JSON and the plot."""
from __future__ import annotations

import json

import pytest

from chatdata import eda, pii
from chatdata import pipeline as data_mod
from conftest import run_cli, ticket_rows, tiny_config_dict, write_jsonl, write_yaml
from core.config import validate
from core.errors import DataError, ManyErrors
from training.config import DataCfg


def prepare(tokenizer, train, test, **kw):
    cfg = validate(DataCfg, {"train": [{"path": str(train)}], "validation": [], "test": [{"path": str(test)}],
                             "val_ratio": 0, **kw})
    return data_mod.prepare(cfg, tokenizer, 0)


def with_input(row: dict, text: str) -> dict:
    return {**row, "input": text}


def test_label_fields_are_counted_per_split_with_their_distance(tmp_path, tokenizer):
    train = ticket_rows(12)
    test = ticket_rows(6, "test")
    report = prepare(tokenizer, write_jsonl(tmp_path / "train.jsonl", train),
                     write_jsonl(tmp_path / "test.jsonl", test)).report["eda"]
    by_hand = {s: {} for s in ("train", "test")}
    for split, rows in (("train", train), ("test", test)):
        for r in rows:
            v = json.loads(r["output"])["urgency"]
            by_hand[split][v] = by_hand[split].get(v, 0) + 1
    urgency = report["fields"]["urgency"]
    assert urgency["splits"]["train"] == dict(sorted(by_hand["train"].items()))
    assert urgency["splits"]["test"] == dict(sorted(by_hand["test"].items()))
    shares = {s: {k: v / sum(c.values()) for k, v in c.items()} for s, c in by_hand.items()}
    tv = 0.5 * sum(abs(shares["train"].get(k, 0) - shares["test"].get(k, 0)) for k in set(shares["train"]) |
                   set(shares["test"]))
    assert urgency["distance"]["test"] == pytest.approx(tv, abs=1e-4)
    assert "summary" not in report["fields"]  # free text: one value per row, not a label


def test_ngrams_leave_out_the_instruction_every_row_shares():
    from chatdata.files import Example

    rows = [Example(source=f"f:{i}", messages=[{"role": "user", "content": f"Triage this ticket: {body}"},
                                               {"role": "assistant", "content": "{}"}])
            for i, body in enumerate(["my router drops wifi", "router drops wifi again", "refund for my watch",
                                      "the app crashes on start", "camera pictures are blurry"])]
    grams = dict(eda.top_ngrams(rows, 2))
    assert "triage this" not in grams and "this ticket" not in grams
    assert grams["router drops"] == 2 and grams["drops wifi"] == 2


def test_leakage_is_a_warning_listing_exact_and_near_copies(tmp_path, tokenizer, caplog):
    train = ticket_rows(10)
    long_text = " ".join(f"word{i}" for i in range(60))
    train[3] = with_input(train[3], long_text)
    test = ticket_rows(3, "test") + [train[0], with_input(train[5], long_text + " extra")]
    prepared = prepare(tokenizer, write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl",
                                                                                            test))
    leaks = prepared.report["eda"]["leakage"]
    test_file, train_file = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    assert {(x["row"], x["train_row"], x["kind"]) for x in leaks} == {
        (f"{test_file}:4", f"{train_file}:1", "exact"), (f"{test_file}:5", f"{train_file}:4", "near")}
    assert len(prepared.test) == 5  # a warning keeps every row
    assert "2 validation / test rows are also in the training split" in caplog.text
    md = data_mod.report_markdown(prepared.report)
    assert "## Leakage: 2 validation / test rows" in md and f"{test_file}:5 [test] near duplicate" in md


def test_leakage_error_names_every_leaked_row(tmp_path, tokenizer):
    train = ticket_rows(10)
    test = ticket_rows(2, "test") + [train[0], train[1]]
    with pytest.raises(ManyErrors) as err:
        prepare(tokenizer, write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test),
                leakage="error")
    assert [e.field for e in err.value.errors] == ["data.leakage", "data.leakage"]
    assert f"{tmp_path / 'test.jsonl'}:3 (test) is an exact duplicate of training row {tmp_path / 'train.jsonl'}:1" \
        in str(err.value)
    with pytest.raises(DataError):  # one leaked row: the error itself
        prepare(tokenizer, write_jsonl(tmp_path / "train.jsonl", train),
                write_jsonl(tmp_path / "test2.jsonl", [train[2]]), leakage="error")


def test_personal_data_is_counted_not_copied(tmp_path, tokenizer):
    train = ticket_rows(6)
    train[1] = with_input(train[1], "Mail me at jane.doe@example.com or call +1 415 555 0100 today.")
    train[4] = with_input(train[4], "Card 4111 1111 1111 1111 was charged twice.")
    prepared = prepare(tokenizer, write_jsonl(tmp_path / "train.jsonl", train),
                       write_jsonl(tmp_path / "test.jsonl", ticket_rows(2, "test")))
    found = prepared.report["eda"]["pii"]
    assert found["counts"]["train"] == {"email": 1, "phone": 1, "card": 1}
    assert {r["row"]: r["kinds"] for r in found["rows"]} == {f"{tmp_path / 'train.jsonl'}:2": ["email", "phone"],
                                                             f"{tmp_path / 'train.jsonl'}:5": ["card"]}
    dumped = json.dumps(prepared.report) + data_mod.report_markdown(prepared.report)
    assert "jane.doe@example.com" not in dumped and "4111" not in dumped
    assert pii.redact("jane.doe@example.com, 10.0.0.1") == "[EMAIL], [IP]"


def test_llmstack_data_writes_the_report_and_the_fields_plot(tmp_path, tiny_model_dir, tiny_data):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config_dict(tiny_model_dir, tiny_data, tmp_path / "out"))
    res = run_cli(["data", "--config", str(cfg), "--output", str(tmp_path / "report.json")])
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["eda"]["fields"]) == {"category", "product", "urgency"}
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "## Field `urgency`" in res.stdout and "## Leakage: 0" in res.stdout
