"""Config loading: shipped configs are valid, every mistake is reported with file, line and field, overrides work,
`--help` documents every option and poor settings are warned about."""
from __future__ import annotations

import typing
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from conftest import ROOT, run_cli, write_yaml
from core.config import config_hash, describe, dump_yaml, load, validate
from core.errors import ConfigError, ManyErrors, StackError
from training.config import METHODS, TrainConfig, warn_poor_settings

SHIPPED_ALL = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.yml"))
COMPRESS = [p for p in SHIPPED_ALL if p.stem.startswith("compress")]  # validated in test_compress_config below
SERVE = [p for p in SHIPPED_ALL if p.stem.startswith("serve")]  # validated in test_shipped_serve_config below
TUNE = [p for p in SHIPPED_ALL if p.stem.startswith("tune")]  # validated in tests/test_tune.py
RETRAIN = [p for p in SHIPPED_ALL if p.stem.startswith("retrain")]  # validated in test_shipped_retrain_config below
SHIPPED = [p for p in SHIPPED_ALL if p not in COMPRESS + SERVE + TUNE + RETRAIN]


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle` (so tests never hard-code line numbers)."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in the test YAML")


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- shipped configs
def test_there_are_shipped_configs():
    assert SHIPPED, "configs/ has no YAML file"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # shipped configs use paths relative to the repository root
    cfg = load(TrainConfig, path)
    raw = yaml.safe_load(path.read_text())
    # what the file says is what the model holds (nothing silently dropped or renamed)
    for section, values in raw.items():
        if not isinstance(values, dict):  # a top-level setting (recipe: dpo), not a section
            assert getattr(cfg, section) == values, section
            continue
        _holds(getattr(cfg, section), values, section)
    for split in ("train", "validation", "test"):
        for spec in getattr(cfg.data, split):
            assert (ROOT / spec.path).is_file(), f"{path.name}: data.{split} file {spec.path} does not exist"
    cur = cfg.curriculum
    for spec in [*cur.datasets.values(), *(cur.general_eval if cur.stages else [])]:
        assert (ROOT / spec.path).is_file(), f"{path.name}: curriculum file {spec.path} does not exist"
    assert cfg.method.name in METHODS
    assert cfg.poor_settings() == [], f"the shipped {path.name} triggers its own poor-settings warnings"


@pytest.mark.parametrize("path", RETRAIN, ids=lambda p: p.name)
def test_shipped_retrain_config(path, monkeypatch):
    """configs/retrain.yaml validates, holds what it says, and its training overrides apply to the demo's training
    config (a typo there would only show after the traffic was selected)."""
    from llmstack.retrain.config import RetrainConfig

    monkeypatch.chdir(ROOT)
    cfg = load(RetrainConfig, path)
    for section, values in yaml.safe_load(path.read_text()).items():
        _holds(getattr(cfg, section), values, section)
    assert (ROOT / cfg.compress.config).is_file()
    train = load(TrainConfig, ROOT / "configs" / "train.yaml", cfg.training.overrides)
    assert train.train.max_steps == 60 and not train.data.dedup_near


def _holds(obj, value, where: str) -> None:
    """The loaded config `obj` holds what the file says (`value`), key by key: sections and models by attribute,
    mappings by key, lists item by item."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _holds(obj[key] if isinstance(obj, dict) else getattr(obj, key), sub, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(obj, list):
        assert len(obj) == len(value), where
        for i, (o, v) in enumerate(zip(obj, value)):
            _holds(o, v, f"{where}[{i}]")
    else:
        assert obj == value, where


def _load_as_written(model, path: Path):
    """Load a shipped config and check every key of its mapping sections (nested ones too) holds what the file
    says."""
    cfg = load(model, path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        if isinstance(values, dict):
            _holds(getattr(cfg, section), values, section)
    return cfg, raw


@pytest.mark.parametrize("path", COMPRESS, ids=lambda p: p.name)
def test_shipped_compress_config_loads_and_validates(path):
    from compression.config import CompressConfig

    cfg, raw = _load_as_written(CompressConfig, path)
    assert [v.name for v in cfg.variants] == [v["name"] for v in raw["variants"]]


@pytest.mark.parametrize("path", SERVE, ids=lambda p: p.name)
def test_shipped_serve_config_loads_and_validates(path):
    from serving.config import ServeConfig

    cfg, _ = _load_as_written(ServeConfig, path)
    assert cfg.auth.open_routes and "/v1/chat/completions" not in cfg.auth.open_routes


def test_every_shipped_config_is_checked():
    assert COMPRESS and SHIPPED and SERVE and TUNE and RETRAIN
    assert set(COMPRESS) | set(SHIPPED) | set(SERVE) | set(TUNE) | set(RETRAIN) == set(SHIPPED_ALL)


# ---------------------------------------------------------------- errors name file, line and field
def test_unknown_key_names_key_file_and_line(tmp_path):
    text = "train:\n  lr: 1.0e-4\n  batchsize: 4\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    msg = str(err.value)
    assert f"{path}:{line_of(text, 'batchsize')}" in msg
    assert "train.batchsize" in msg
    assert "unknown key" in msg
    assert err.value.field == "train.batchsize"
    assert err.value.line == line_of(text, "batchsize")


def test_unknown_section_names_section_and_line(tmp_path):
    text = "model:\n  name_or_path: x\n\ntrian:\n  lr: 1.0e-4\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    assert f"{path}:{line_of(text, 'trian')}" in str(err.value)
    assert "'trian'" in str(err.value)


def test_wrong_type_names_field_line_and_value(tmp_path):
    text = "method:\n  name: lora\ntrain:\n  batch_size: eight\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    msg = str(err.value)
    assert f"{path}:{line_of(text, 'batch_size')}" in msg
    assert "train.batch_size" in msg
    assert "eight" in msg  # the offending value is shown


def test_out_of_range_and_bad_choice_are_errors(tmp_path):
    text = "train:\n  lr: -1\nmethod:\n  name: qlora\n"
    path = write(tmp_path, text)
    with pytest.raises(ManyErrors) as err:
        load(TrainConfig, path)
    msg = str(err.value)
    assert f"{path}:{line_of(text, 'lr:')}: field 'train.lr'" in msg
    assert f"{path}:{line_of(text, 'name:')}: field 'method.name'" in msg
    assert "qlora" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    text = "train:\n  lr: fast\n  batchsize: 4\ndata:\n  max_seq_len: 2\n"
    path = write(tmp_path, text)
    with pytest.raises(ManyErrors) as err:
        load(TrainConfig, path)
    fields = {e.field for e in err.value.errors}
    assert fields == {"train.lr", "train.batchsize", "data.max_seq_len"}
    for e in err.value.errors:
        assert str(path) in str(e) and e.line is not None


def test_missing_required_field_in_a_list_item_names_the_item_line(tmp_path):
    text = "data:\n  train:\n    - path: a.jsonl\n    - format: chat\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    assert err.value.field == "data.train.1.path"
    assert err.value.line == line_of(text, "format: chat")
    assert "required" in str(err.value).lower()


def test_invalid_yaml_syntax_names_the_line(tmp_path):
    text = "train:\n  lr: 1.0e-4\n  batch_size: [1, 2\nmethod:\n  name: lora\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    assert "invalid YAML" in str(err.value)
    assert str(path) in str(err.value)
    assert err.value.line is not None and err.value.line >= line_of(text, "batch_size")


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- train\n- lr\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(TrainConfig, path)


def test_missing_config_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    assert str(path) in str(err.value) and "not found" in str(err.value)


def test_cross_field_rules_name_both_fields(tmp_path):
    path = write(tmp_path, "train:\n  early_stopping_patience: 3\n")
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    assert "train.early_stopping_patience" in str(err.value) and "train.eval_steps" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, None, ["method.name=adalora", "method.lora_r=16", "method.adalora_init_r=4"])
    assert "method.adalora_init_r" in str(err.value) and "method.lora_r" in str(err.value)


def test_early_stopping_with_misaligned_save_steps_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, None, ["train.early_stopping_patience=3", "train.eval_steps=10"])
    assert "train.save_steps" in str(err.value) and "train.eval_steps" in str(err.value)


# ---------------------------------------------------------------- command-line overrides
def test_override_applies_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n  batch_size: 4\n")
    cfg = load(TrainConfig, path, ["train.lr=1e-4", "method.target_modules=[q_proj,v_proj]", "eval.before=false"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 4  # untouched keys keep the file's value
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval.before is False


@pytest.mark.parametrize("override, field", [("train.lrr=1", "train.lrr"), ("train.lr=abc", "train.lr"),
                                             ("method.name=qlora", "method.name")])
def test_bad_override_names_the_command_line(tmp_path, override, field):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\nmethod:\n  name: lora\n")
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path, [override])
    msg = str(err.value)
    assert msg.startswith("command line"), msg
    assert field in msg
    assert str(path) not in msg  # the file is not blamed for the command line's mistake


def test_override_with_misspelled_section_names_the_command_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path, ["trian.lr=1e-4"])
    assert str(err.value).startswith("command line"), str(err.value)


def test_override_without_equals_sign_is_named():
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, None, ["train.lr"])
    assert "train.lr" in str(err.value) and "section.key=value" in str(err.value)


def test_override_into_a_list_is_refused_with_a_message(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - path: a.jsonl\n")
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path, ["data.train.0.path=x.jsonl"])
    assert "data.train.0.path" in str(err.value) and "not a section" in str(err.value)


# ---------------------------------------------------------------- round trips and hashes
def test_dumped_config_loads_back_identical(tmp_path):
    cfg = load(TrainConfig, None, ["train.lr=3e-4", "method.name=dora", "data.system_prompt=Be brief."])
    path = write(tmp_path, dump_yaml(cfg))
    assert load(TrainConfig, path) == cfg


def test_config_hash_follows_settings_but_not_excluded_keys():
    a = load(TrainConfig, None, [])
    b = load(TrainConfig, None, ["train.lr=1e-5"])
    c = load(TrainConfig, None, ["output.run_id=other"])
    assert config_hash(a) == config_hash(load(TrainConfig, None, []))
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert config_hash(a, {"output.run_id"}) == config_hash(c, {"output.run_id"})


# ---------------------------------------------------------------- --help documents every option
def _options(model: type[BaseModel], prefix: str = ""):
    """(dotted path, field, list-item model or None) for every leaf option, recursively."""
    for name, field in model.model_fields.items():
        tp = field.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from _options(tp, f"{prefix}{name}.")
            continue
        yield f"{prefix}{name}", field
        if typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                for sub, f in _options(item, f"{prefix}{name}[]."):
                    yield sub, f


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def train_help() -> str:
    res = run_cli(["train", "--help"], timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_train_help_documents_every_config_field(train_help):
    lines = train_help.splitlines()
    flat = _norm(train_help)
    options = list(_options(TrainConfig))
    assert len(options) > 40
    missing, undocumented = [], []
    list_items: dict[str, list[str]] = {}  # list-of-section fields: documented once per item type (data.train[])
    for path, field in options:
        if "[]." in path:
            list_items.setdefault(path.split("[].")[0], []).append(path)
            continue
        if not any(line.strip().startswith(f"{path} (") for line in lines):
            missing.append(path)
        elif not field.description or _norm(field.description) not in flat:
            undocumented.append(path)
    assert not missing, f"options missing from `llmstack train --help`: {missing}"
    assert not undocumented, f"options without their explanation in --help: {undocumented}"
    # data.train / data.validation / data.test share one item type; its fields are documented under one of them
    documented = [paths for paths in list_items.values()
                  if all(any(line.strip().startswith(f"{p} (") for line in lines) for p in paths)]
    assert documented, f"dataset entry fields are not documented: {list_items}"


def test_train_help_shows_defaults_and_required(train_help):
    for path, field in _options(TrainConfig):
        line = next((ln for ln in train_help.splitlines() if ln.strip().startswith(f"{path} (")), None)
        if line is None:
            continue  # covered by the test above
        assert ("required" in line) if field.is_required() else ("default" in line), line


def test_describe_mentions_every_method():
    text = describe(TrainConfig)
    for m in METHODS:
        assert m in text


# ---------------------------------------------------------------- poor settings
@pytest.mark.parametrize("overrides, needle", [
    (["method.name=full", "train.lr=1e-3"], "full fine-tuning with lr=0.001"),
    (["method.name=freeze", "train.lr=5e-4"], "freeze fine-tuning"),
    (["method.name=lora", "method.lora_r=8", "method.lora_alpha=256"], "lora_alpha=256"),
    (["method.name=lora", "train.lr=1e-2"], "very high for lora"),
    (["train.warmup_ratio=0.5"], "warmup_ratio=0.5"),
    (["train.optimizer=sgd", "train.lr=1e-4"], "SGD"),
])
def test_poor_settings_are_warned(overrides, needle):
    cfg = load(TrainConfig, None, overrides)
    with pytest.warns(UserWarning) as rec:
        msgs = warn_poor_settings(cfg)
    assert any(needle in m for m in msgs), msgs
    assert any(needle in str(w.message) for w in rec)


def test_scaled_lr_is_what_is_judged():
    cfg = load(TrainConfig, None, ["method.name=full", "train.lr=5e-5", "train.scale_lr=true", "train.batch_size=32",
                                   "train.grad_accum=4", "train.scale_lr_base_batch=8"])
    assert cfg.effective_lr() == pytest.approx(5e-5 * 4)
    assert any("full fine-tuning" in m for m in cfg.poor_settings())


def test_sensible_settings_are_not_warned():
    cfg = load(TrainConfig, None, ["method.name=full", "train.lr=2e-5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_poor_settings(cfg) == []


# ---------------------------------------------------------------- the CLI on a bad config
def test_cli_bad_config_exits_2_with_one_line_error(tmp_path):
    text = "train:\n  lr: 1.0e-4\n  batchsize: 4\n"
    path = write(tmp_path, text, "bad.yaml")
    res = run_cli(["train", "--config", path], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert err[0].startswith("error: ")
    assert f"{path}:{line_of(text, 'batchsize')}" in err[0] and "train.batchsize" in err[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing was started


def test_cli_bad_override_exits_2_and_names_command_line(tmp_path):
    path = write_yaml(tmp_path / "ok.yaml", {"train": {"lr": 1e-4}})
    res = run_cli(["train", "--config", path, "train.batch_size=-1"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: command line: field 'train.batch_size'"), res.stderr


def test_cli_shows_poor_settings_warning(tmp_path):
    # full fine-tuning at lr 1e-3 is warned about; the made-up model name then stops the run before any loading
    path = write_yaml(tmp_path / "full.yaml", {"model": {"name_or_path": "no-such-model"}, "method": {"name": "full"},
                                               "train": {"lr": 1e-3, "threads": 1}})
    res = run_cli(["train", "--config", path], cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and "no-such-model" in res.stderr, res.stderr
    assert "lr=0.001" in res.stderr and "full fine-tuning" in res.stderr, res.stderr


def test_stack_error_formats_location():
    e = StackError("bad thing", file="f.jsonl", line=3, field="output", hint="fix it")
    assert str(e) == "f.jsonl:3: field 'output': bad thing (fix it)"
    assert str(StackError("plain")) == "plain"


def test_validate_without_file_still_names_the_field():
    with pytest.raises(ConfigError) as err:
        validate(TrainConfig, {"train": {"lr": "x"}})
    assert "train.lr" in str(err.value)
