"""The data pipeline: bad rows are named by file, line and field; drops are recorded with their reason; formats,
cleaning, the answer-only labels, validation splitting and mixing do what the config says."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from chatdata import pipeline as data_mod
from conftest import count_rows, ticket_rows, write_jsonl
from core.config import validate
from core.errors import DataError, ManyErrors, StackError
from training.config import DataCfg


def data_cfg(train, validation=(), test=(), **kw) -> DataCfg:
    spec = lambda p: p if isinstance(p, dict) else {"path": str(p)}  # noqa: E731
    return validate(DataCfg, {"train": [spec(p) for p in train], "validation": [spec(p) for p in validation],
                              "test": [spec(p) for p in test], **kw})


def prepare(tokenizer, train, validation=(), test=(), seed: int = 0, **kw):
    kw.setdefault("val_ratio", 0)  # no validation rows taken from train unless a test asks for it
    return data_mod.prepare(data_cfg(train, validation, test, **kw), tokenizer, seed)


def source(report, split="train"):
    return next(s for s in report["sources"] if s["split"] == split)


def labelled(ex) -> list[int]:
    return [t for t in ex.labels if t != -100]


# ---------------------------------------------------------------- file and row errors (no tokenizer needed)
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    rows = ticket_rows(3)
    path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], rows[1], '{"instruction": "x", "output": ', rows[2]])
    with pytest.raises(DataError) as err:
        data_mod.load_file(path)
    assert err.value.line == 3
    assert f"{path}:3" in str(err.value) and "malformed JSON" in str(err.value)


def test_every_malformed_line_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ticket_rows(1)[0], "not json", "[1, 2]", ticket_rows(1)[0], "{"])
    with pytest.raises(ManyErrors) as err:
        data_mod.load_file(path)
    assert sorted(e.line for e in err.value.errors) == [2, 3, 5]
    assert all(str(path) in str(e) for e in err.value.errors)
    assert "must be a JSON object" in str(err.value)


def test_blank_lines_keep_line_numbers_right(tmp_path):
    rows = ticket_rows(2)
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n\n" + json.dumps(rows[1]) + "\n")
    loaded, locs = data_mod.load_file(path)
    assert loaded == rows
    assert locs == [f"{path}:1", f"{path}:4"]


def test_missing_file_and_unsupported_type_are_named(tmp_path):
    with pytest.raises(DataError) as err:
        data_mod.load_file(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value) and "not found" in str(err.value)
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataError) as err:
        data_mod.load_file(tmp_path / "rows.txt")
    assert "rows.txt" in str(err.value) and ".txt" in str(err.value)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
                                        ("header.csv", "instruction,output\n")])
def test_empty_dataset_file_is_a_clear_error(tmp_path, tokenizer, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        prepare(tokenizer, [path])
    assert str(path) in str(err.value)
    assert "empty" in str(err.value).replace(str(path), "")  # (tmp_path itself contains the word)


def test_missing_field_names_file_line_and_field(tmp_path, tokenizer):
    rows = ticket_rows(4)
    del rows[2]["output"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare(tokenizer, [path])
    e = err.value
    assert (e.file, e.field) == (f"{path}:3", "output")
    assert str(e) == f"{path}:3: field 'output': missing field"


def test_every_invalid_row_is_reported_with_its_field(tmp_path, tokenizer):
    rows = ticket_rows(5)
    del rows[0]["output"]
    del rows[3]["instruction"]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [chat])
    with pytest.raises(ManyErrors) as err:
        prepare(tokenizer, [train], [val])
    got = {(e.file, e.field) for e in err.value.errors}
    assert got == {(f"{train}:1", "output"), (f"{train}:4", "instruction"), (f"{val}:1", "messages[1].role")}
    assert "'bot'" in str(err.value)


def test_a_wrong_type_names_only_the_bad_row(tmp_path, tokenizer):
    rows = ticket_rows(4)
    rows[1]["output"] = 5
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(StackError) as err:
        prepare(tokenizer, [path])
    errors = err.value.errors if isinstance(err.value, ManyErrors) else [err.value]
    assert [(e.file, e.field) for e in errors] == [(f"{path}:2", "output")], str(err.value)
    assert "must be a string, got int" in str(err.value)


def test_chat_row_without_assistant_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError) as err:
        prepare(tokenizer, [path])
    assert err.value.file == f"{path}:1" and "assistant" in str(err.value)


def test_unknown_columns_name_the_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        prepare(tokenizer, [path])
    assert str(path) in str(err.value) and "question" in str(err.value)


def test_all_rows_dropped_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ticket_rows(3))
    with pytest.raises(DataError) as err:
        prepare(tokenizer, [path], max_seq_len=8)
    msg = str(err.value)
    assert "no training rows left" in msg and "overlong=3" in msg and "data.train" in msg


# ---------------------------------------------------------------- length filter
@pytest.fixture
def mixed_lengths(tmp_path, tokenizer):
    """Ticket rows and their token lengths (chat template applied), measured by the pipeline itself."""
    rows = ticket_rows(10)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    full = prepare(tokenizer, [path], dedup_near=False, max_seq_len=4096)
    lengths = {ex.source: len(ex.input_ids) for ex in full.train}
    assert len(lengths) == len(rows)
    cut = sorted(lengths.values())[len(lengths) // 2]
    assert cut < max(lengths.values()), "test data needs rows of different lengths"
    return path, lengths, cut


def test_overlong_rows_are_dropped_and_reported(tokenizer, mixed_lengths):
    path, lengths, cut = mixed_lengths
    res = prepare(tokenizer, [path], dedup_near=False, max_seq_len=cut)
    too_long = {loc for loc, n in lengths.items() if n > cut}
    assert {ex.source for ex in res.train} == set(lengths) - too_long
    drops = [d for d in res.report["drops"] if d["reason"] == "overlong"]
    assert {d["location"] for d in drops} == too_long
    for d in drops:
        assert str(lengths[d["location"]]) in d["detail"] and str(cut) in d["detail"]
    src = source(res.report)
    assert src["dropped"]["overlong"] == len(too_long)
    assert src["rows_out"] == src["rows_in"] - len(too_long) == len(res.train)
    assert all(len(ex.input_ids) <= cut for ex in res.train)


def test_overlong_error_policy_names_the_row(tokenizer, mixed_lengths):
    path, lengths, cut = mixed_lengths
    with pytest.raises(StackError) as err:
        prepare(tokenizer, [path], dedup_near=False, max_seq_len=cut, overlong="error")
    errors = err.value.errors if isinstance(err.value, ManyErrors) else [err.value]
    too_long = {loc for loc, n in lengths.items() if n > cut}
    assert {e.file for e in errors} == too_long
    assert all("data.max_seq_len" in str(e) for e in errors)


def test_overlong_truncate_policy_keeps_rows_within_the_limit(tokenizer, mixed_lengths):
    path, lengths, cut = mixed_lengths
    res = prepare(tokenizer, [path], dedup_near=False, max_seq_len=cut, overlong="truncate")
    assert {ex.source for ex in res.train} == set(lengths)  # nothing dropped: every row still has answer tokens
    for ex in res.train:
        assert len(ex.input_ids) == len(ex.labels) == min(lengths[ex.source], cut)
        assert labelled(ex)


# ---------------------------------------------------------------- cleaning and deduplication
def test_duplicates_and_near_duplicates_are_dropped_with_reason_and_location(tmp_path, tokenizer):
    a, b, c = ticket_rows(3)
    wide = dict(a, input=a["input"].replace("0", "\uff10").replace("1", "\uff11").replace("e", "\uff45"))
    assert wide != a
    b_near = dict(b, input=b["input"].replace(".", "!"))
    assert b_near["input"] != b["input"]
    rows = [a, b, a, c, b_near, wide]  # lines 1..6
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    res = prepare(tokenizer, [path], val_ratio=0)
    kept = sorted(ex.source for ex in res.train)
    assert kept == [f"{path}:1", f"{path}:2", f"{path}:4"]
    drops = {d["location"]: d for d in res.report["drops"]}
    assert set(drops) == {f"{path}:3", f"{path}:5", f"{path}:6"}
    assert drops[f"{path}:3"]["reason"] == "exact_duplicate" and f"{path}:1" in drops[f"{path}:3"]["detail"]
    assert drops[f"{path}:6"]["reason"] == "exact_duplicate"  # identical once NFKC folds the full-width letters
    assert drops[f"{path}:5"]["reason"] == "near_duplicate" and f"{path}:2" in drops[f"{path}:5"]["detail"]
    assert all(d["split"] == "train" for d in drops.values())
    src = source(res.report)
    assert src["dropped"] == {"empty": 0, "exact_duplicate": 2, "near_duplicate": 1, "overlong": 0}
    assert (src["rows_in"], src["rows_out"]) == (6, 3)
    md = data_mod.report_markdown(res.report)
    for loc, d in drops.items():
        assert f"{loc} [train] {d['reason']}" in md


def test_dedup_can_be_switched_off(tmp_path, tokenizer):
    a, b = ticket_rows(2)
    path = write_jsonl(tmp_path / "train.jsonl", [a, b, a, dict(b, input=b["input"] + "!")])
    res = prepare(tokenizer, [path], val_ratio=0, dedup_exact=False, dedup_near=False)
    assert len(res.train) == 4 and res.report["drops"] == []


def test_dedup_is_within_a_split(tmp_path, tokenizer):
    rows = ticket_rows(3)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:1])
    res = prepare(tokenizer, [train], [val])
    assert len(res.train) == 3 and len(res.validation) == 1


def test_nfkc_cleaning_and_whitespace_stripping(tmp_path, tokenizer):
    row = {"instruction": "  \ufb01le the ticket", "input": "order \uff11\uff12\uff13\u00a0 ",
           "output": "\u2460 done\n"}
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    (ex,) = prepare(tokenizer, [path], val_ratio=0).train
    user, assistant = ex.messages
    assert user["content"] == "file the ticket\n\norder 123"
    assert assistant["content"] == "1 done"
    (raw,) = prepare(tokenizer, [path], val_ratio=0, unicode_normalization="none").train
    assert raw.messages[1]["content"] == "\u2460 done"  # no normalisation, only stripping
    assert "\ufb01le" in raw.messages[0]["content"]


def test_rows_empty_after_cleaning_are_dropped_as_empty(tmp_path, tokenizer):
    rows = ticket_rows(2) + [{"instruction": "Triage.", "input": "", "output": "   \n "}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    res = prepare(tokenizer, [path], val_ratio=0)
    assert len(res.train) == 2
    (drop,) = res.report["drops"]
    assert (drop["reason"], drop["location"]) == ("empty", f"{path}:3")


# ---------------------------------------------------------------- formats
def test_formats_are_detected_from_columns(tmp_path, tokenizer):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ticket_rows(2))
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Where is my parcel?"},
                      {"role": "assistant", "content": "It left the depot today."}]},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Refund?"},
                      {"role": "assistant", "content": "Approved."}]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The router restarts every night."},
                                                 {"text": "Cameras need firmware 2.1."}])
    res = prepare(tokenizer, [alpaca, chat, text], val_ratio=0)
    formats = {s["path"]: s["format"] for s in res.report["sources"]}
    assert formats == {str(alpaca): "instruction", str(chat): "chat", str(text): "text"}
    assert len(res.train) == 6
    by_src = {ex.source.rsplit(":", 1)[0]: ex for ex in res.train}
    assert by_src[str(text)].messages is None and by_src[str(text)].text
    assert by_src[str(chat)].messages[-1]["role"] == "assistant"


def test_explicit_format_and_column_mapping(tmp_path, tokenizer):
    rows = [{"question": r["instruction"] + "\n\n" + r["input"], "answer": r["output"]} for r in ticket_rows(2)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = {"path": str(path), "format": "instruction", "columns": {"instruction": "question", "output": "answer"}}
    res = prepare(tokenizer, [spec], val_ratio=0)
    assert sorted(ex.reference() for ex in res.train) == sorted(r["answer"] for r in rows)


def test_system_prompt_is_added(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ticket_rows(1))
    (ex,) = prepare(tokenizer, [path], val_ratio=0, system_prompt="You triage support tickets.").train
    assert ex.messages[0] == {"role": "system", "content": "You triage support tickets."}
    text = tokenizer.decode(ex.input_ids)
    assert "You triage support tickets." in text and "SmolLM" not in text


# ---------------------------------------------------------------- the labels mask
def test_only_the_answer_is_labelled_and_it_decodes_to_the_reference(tmp_path, tokenizer):
    rows = ticket_rows(6)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    res = prepare(tokenizer, [path], val_ratio=0)
    assert len(res.train) == len(rows)
    for ex in res.train:
        assert len(ex.labels) == len(ex.input_ids)
        idx = [i for i, t in enumerate(ex.labels) if t != -100]
        assert idx == list(range(idx[0], idx[-1] + 1)), "the answer must be one contiguous block"
        assert all(ex.labels[i] == ex.input_ids[i] for i in idx)
        assert tokenizer.decode(labelled(ex)) == ex.reference() + tokenizer.eos_token
        prompt = tokenizer.decode(ex.input_ids[:idx[0]])
        assert prompt == data_mod.render(tokenizer, ex.prompt_messages(), generation_prompt=True)
    refs = sorted(ex.reference() for ex in res.train)
    assert refs == sorted(r["output"] for r in rows)


def test_multi_turn_chat_labels_every_assistant_turn_only(tmp_path, tokenizer):
    convo = {"messages": [{"role": "user", "content": "My watch will not charge."},
                          {"role": "assistant", "content": "Which model is it?"},
                          {"role": "user", "content": "Pulse Watch 2."},
                          {"role": "assistant", "content": "Try the reset: hold both buttons for 10 s."}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [convo])
    (ex,) = prepare(tokenizer, [path], val_ratio=0).train
    spans, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != -100:
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tokenizer.decode(s) for s in spans] == [m["content"] + tokenizer.eos_token
                                                    for m in convo["messages"] if m["role"] == "assistant"]


def test_raw_text_is_labelled_everywhere_and_ends_with_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "Firmware 2.1 fixes the night restarts."}])
    (ex,) = prepare(tokenizer, [path], val_ratio=0).train
    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[:-1]) == "Firmware 2.1 fixes the night restarts."


# ---------------------------------------------------------------- splits and mixing
def test_validation_is_split_off_train_when_none_is_given(tmp_path, tokenizer):
    rows = ticket_rows(20)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    res = prepare(tokenizer, [path], val_ratio=0.25, dedup_near=False)
    assert res.report["validation_from_train"] is True
    assert len(res.validation) == round(0.25 * len(rows))
    train_src = {ex.source for ex in res.train}
    val_src = {ex.source for ex in res.validation}
    assert not train_src & val_src
    assert len(train_src | val_src) == len(rows)
    assert res.report["test_is_validation"] is True and res.test == res.validation
    again = prepare(tokenizer, [path], val_ratio=0.25, dedup_near=False)
    assert {ex.source for ex in again.validation} == val_src  # seeded
    other = prepare(tokenizer, [path], val_ratio=0.25, dedup_near=False, seed=1)
    assert {ex.source for ex in other.validation} != val_src


def test_given_validation_and_test_files_are_used_as_is(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ticket_rows(4))
    val = write_jsonl(tmp_path / "val.jsonl", ticket_rows(3, "validation"))
    test = write_jsonl(tmp_path / "test.jsonl", ticket_rows(2, "test"))
    res = prepare(tokenizer, [train], [val], [test])
    assert (len(res.train), len(res.validation), len(res.test)) == (4, 3, 2)
    assert res.report["validation_from_train"] is False and res.report["test_is_validation"] is False
    assert {s["split"]: s["rows_in"] for s in res.report["sources"]} == {
        "train": count_rows(train), "validation": count_rows(val), "test": count_rows(test)}


def test_mixing_weights_upsample_and_subsample(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ticket_rows(4))
    b = write_jsonl(tmp_path / "b.jsonl", ticket_rows(6, start=10))
    res = prepare(tokenizer, [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}], val_ratio=0,
                  dedup_near=False)
    per_row = Counter(ex.source for ex in res.train)
    from_a = {loc: n for loc, n in per_row.items() if loc.startswith(f"{a}:")}
    from_b = {loc: n for loc, n in per_row.items() if loc.startswith(f"{b}:")}
    assert len(from_a) == 4 and set(from_a.values()) == {2}
    assert len(from_b) == 3 and set(from_b.values()) == {1}
    assert {s["path"]: s["weight"] for s in res.report["sources"]} == {str(a): 2.0, str(b): 0.5}
    again = prepare(tokenizer, [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}], val_ratio=0,
                    dedup_near=False)
    assert Counter(ex.source for ex in again.train) == per_row  # the sampled half is seeded


def test_report_records_source_hashes_and_length_stats(tmp_path, tokenizer):
    import hashlib

    path = write_jsonl(tmp_path / "train.jsonl", ticket_rows(5))
    res = prepare(tokenizer, [path], val_ratio=0)
    src = source(res.report)
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    stats = res.report["splits"]["train"]
    lens = [len(ex.input_ids) for ex in res.train]
    assert (stats["n"], stats["tokens"], stats["min"], stats["max"]) == (5, sum(lens), min(lens), max(lens))
    assert stats["answer_tokens"] == sum(len(labelled(ex)) for ex in res.train)
    json.dumps(res.report)  # the report is written as JSON into every artifact
    md = data_mod.report_markdown(res.report)
    assert f"| train | {path} | instruction | 1 | 5 | 0 | 0 | 0 | 0 | 5 |" in md


def test_pipeline_does_not_mutate_its_input_config(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ticket_rows(2))
    cfg = data_cfg([path])
    before = copy.deepcopy(cfg.model_dump())
    data_mod.prepare(cfg, tokenizer, 0)
    assert cfg.model_dump() == before
