"""Every training method runs end to end on the tiny model and writes a complete, truthful artifact: the expected
files, a manifest with lineage and measurements, trained weights that differ from the initial ones, and (for methods
that merge) a merged model that computes what base + adapter computes."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import read_jsonl, tiny_config_dict, write_yaml
from core.config import load
from core.errors import ArtifactError
from training import methods
from training.config import METHODS, PROMPT_LEARNING, TrainConfig
from training.sft import recipe as sft

PEFT = [m for m in METHODS if m not in ("full", "freeze")]
COMMON_FILES = {"manifest.json", "config.yaml", "data_report.json", "data_report.md", "metrics.json", "README.md",
                "loss_curve.png", "train_history.json", "token_lengths.png", "predictions_after.jsonl",
                "drift_reference.json", "data", "data_fields.png"}
MERGED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
PNG = b"\x89PNG\r\n\x1a\n"
PROMPT_KEY = "prompt_embeddings"


def load_base(tiny_model_dir):
    from modeling.model import load_model

    return load_model(str(tiny_model_dir)).eval()


def trained_model(run, tiny_model_dir):
    """The trained model as a user would load it from the artifact: base + adapter, or the merged folder."""
    if run.method in PEFT:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(tiny_model_dir), str(run.path / "adapter")).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run.path / "merged").eval()


@pytest.fixture(scope="module", params=METHODS)
def run(request, tmp_path_factory, tiny_model_dir, tiny_data):
    """One short training run per method (3 steps), with a copy of the trainable parameters taken right after the
    method was applied, i.e. before the first optimizer step."""
    method = request.param
    folder = tmp_path_factory.mktemp(f"recipe-{method}")
    cfg_dict = tiny_config_dict(tiny_model_dir, tiny_data, folder / "artifacts")
    cfg_dict["method"]["name"] = method
    cfg_dict["eval"]["before"] = method == "lora"  # the before/after table once; elsewhere save the time
    cfg = load(TrainConfig, write_yaml(folder / "config.yaml", cfg_dict))

    initial: dict[str, torch.Tensor] = {}
    apply = methods.apply

    def spy(model, m, total):
        out = apply(model, m, total)
        initial.update({n: p.detach().clone() for n, p in out.named_parameters() if p.requires_grad})
        if method in PROMPT_LEARNING:  # what peft saves for these: the virtual-token embeddings the encoder yields
            with torch.no_grad():
                initial[PROMPT_KEY] = out.get_prompt_embedding_to_save("default").detach().clone()
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods, "apply", spy)
        path = sft.run(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    return SimpleNamespace(method=method, cfg=cfg, path=path, root=Path(cfg.output.dir), initial=initial,
                           manifest=manifest)


def test_artifact_has_the_expected_files(run):
    expected = set(COMMON_FILES)
    if run.method in PEFT:
        expected.add("adapter")
    if methods.mergeable(run.method):
        expected.add("merged")
    if run.cfg.eval.before:
        expected.add("predictions_before.jsonl")
    assert {p.name for p in run.path.iterdir()} == expected
    if run.method in PEFT:
        adapter = {p.name for p in (run.path / "adapter").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter
    if methods.mergeable(run.method):
        assert MERGED_FILES <= {p.name for p in (run.path / "merged").iterdir()}
        assert not list((run.path / "merged").glob("adapter_*")), "the merged model must be a plain model"
    for png in ("loss_curve.png", "token_lengths.png"):
        assert (run.path / png).read_bytes()[:8] == PNG and (run.path / png).stat().st_size > 1000


def test_run_leaves_only_the_artifact_and_latest(run):
    assert os.readlink(run.root / "latest") == run.path.name  # a relative symlink, not a copy
    assert (run.root / "latest").resolve() == run.path.resolve()
    assert not list(run.root.glob(".tmp-*"))
    assert not (run.root / ".work" / run.path.name).exists(), "resume checkpoints are removed after success"


def test_manifest_records_lineage(run, tiny_model_dir, tiny_data):
    m = run.manifest
    assert m["stage"] == "train" and m["run_id"] == run.path.name
    assert m["base_model"]["path"] == str(tiny_model_dir)
    assert m["base_model"]["name"] == run.cfg.model.name_or_path
    assert m["fingerprint"]
    by_split = {d["split"]: d for d in m["datasets"]}
    assert set(by_split) == {"train", "validation", "test"}
    for split, d in by_split.items():
        assert d["path"] == str(tiny_data[split])
        assert d["sha256"] == hashlib.sha256(tiny_data[split].read_bytes()).hexdigest()
        assert d["rows_in"] == len(read_jsonl(tiny_data[split]))
    for pkg in ("torch", "transformers", "peft"):
        assert m["packages"][pkg] == metadata.version(pkg)
    assert m["config"] == run.cfg.model_dump(mode="json")
    assert m["config"]["output"]["run_id"] == run.path.name
    # the saved config reproduces the run
    assert load(TrainConfig, run.path / "config.yaml").model_dump(mode="json") == m["config"]
    assert json.loads((run.path / "data_report.json").read_text())["sources"] == m["datasets"]


def test_artifact_carries_the_splits_it_trained_and_evaluated_on(run, tiny_data):
    """data/<split>.jsonl: the pipeline's rows (what compression distils and measures on), in order, as chat messages."""
    from chatdata import splits
    from modeling.model import load_tokenizer

    saved = splits.load(run.path / "data", load_tokenizer(run.cfg.model.name_or_path))
    test_rows = read_jsonl(tiny_data["test"])
    assert [e.source for e in saved.test] == [f"{tiny_data['test']}:{i}" for i in range(1, len(test_rows) + 1)]
    assert [e.reference() for e in saved.test] == [r["output"] for r in test_rows]
    assert len(saved.train) == len(read_jsonl(tiny_data["train"])) and len(saved.validation) == 4
    assert all(e.input_ids and any(t != -100 for t in e.labels) for e in saved.train)


def test_manifest_records_training_measurements(run):
    t = run.manifest["training"]
    assert t["steps"] == run.cfg.train.max_steps
    assert t["tokens"] > 0 and t["tokens_per_s"] > 0 and t["peak_rss_mb"] > 0
    assert math.isfinite(t["final_train_loss"]) and t["final_train_loss"] > 0
    assert math.isfinite(t["validation_loss"])
    assert t["resumed_from"] is None
    phases = run.manifest["timings"]
    assert list(phases) == ["data", "load_and_eval_before", "train", "validation", "merge_and_eval_after",
                            "drift_reference", "save"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= run.manifest["wall_seconds"] + 1
    trainable = sum(p.numel() for n, p in run.initial.items() if n != PROMPT_KEY)
    assert t["parameters"]["trainable"] == trainable > 0
    assert t["parameters"]["trainable"] <= t["parameters"]["total"]
    assert t["packing"] == (run.method not in PROMPT_LEARNING)
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["training"] == t
    assert metrics["after"] == run.manifest["metrics"]["after"]


def test_evaluation_after_training_is_recorded(run):
    after = run.manifest["metrics"]["after"]
    assert math.isfinite(after["loss"]) and after["perplexity"] > 1
    assert after["n"] == run.cfg.eval.max_samples
    assert 0 <= after["exact_match"] <= 1 and 0 <= after["json_valid"] <= 1
    assert set(after["field_accuracy"]) == set(run.cfg.eval.json_fields)
    preds = read_jsonl(run.path / "predictions_after.jsonl")
    assert len(preds) == run.cfg.eval.max_samples
    refs = [r["output"] for r in read_jsonl(run.cfg.data.test[0].path)]
    assert all(p["reference"] in refs and isinstance(p["prediction"], str) for p in preds)
    assert "answer loss" in run.manifest["metrics_table"]
    card = (run.path / "README.md").read_text()
    assert run.path.name in card and run.method in card and run.manifest["metrics_table"] in card
    if run.cfg.eval.before:
        before = run.manifest["metrics"]["before"]
        assert math.isfinite(before["loss"]) and before["n"] == after["n"]
        assert "| metric | before | after | change |" in run.manifest["metrics_table"]
    else:
        assert run.manifest["metrics"]["before"] is None


def test_trainable_parameters_changed(run, tiny_model_dir):
    if run.method in PROMPT_LEARNING:
        # peft stores the virtual-token embeddings (for p-tuning: the prompt encoder's output), not the encoder
        from safetensors.torch import load_file

        saved = load_file(run.path / "adapter" / "adapter_model.safetensors")
        assert set(saved) == {PROMPT_KEY}
        assert saved[PROMPT_KEY].shape == run.initial[PROMPT_KEY].shape
        assert not torch.equal(saved[PROMPT_KEY], run.initial[PROMPT_KEY]), "the virtual tokens did not change"
        return
    model = trained_model(run, tiny_model_dir)
    final = dict(model.named_parameters())
    missing = [n for n in run.initial if n not in final]
    assert not missing, f"trained parameters not in the artifact: {missing[:5]}"
    unchanged = [n for n, p0 in run.initial.items() if torch.equal(final[n].detach(), p0)]
    assert not unchanged, f"{len(unchanged)} of {len(run.initial)} trainable tensors did not change: {unchanged[:5]}"


def test_artifact_reproduces_the_evaluated_generations(run, tiny_model_dir, tokenizer):
    """Loading the artifact the way a user would gives the model that produced predictions_after.jsonl."""
    from chatdata.pipeline import Example
    from evaluation import quality as ev
    from modeling.model import model_folder

    if methods.mergeable(run.method):
        from modeling.model import load_model

        model = load_model(model_folder(str(run.path))).eval()
    else:
        model = trained_model(run, tiny_model_dir)
    preds = read_jsonl(run.path / "predictions_after.jsonl")
    test_rows = {f"{run.cfg.data.test[0].path}:{i}": r for i, r in enumerate(read_jsonl(run.cfg.data.test[0].path), 1)}
    prompts = []
    for p in preds:
        r = test_rows[p["source"]]
        assert p["reference"] == r["output"]
        prompts.append(Example(p["source"], messages=[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                                                      {"role": "assistant", "content": r["output"]}]).prompt_messages())
    again = ev.generate(model, tokenizer, prompts, run.cfg.eval.max_new_tokens, run.cfg.eval.batch_size)
    assert again == [p["prediction"] for p in preds]


@pytest.mark.parametrize("run", ["freeze"], indirect=True)
def test_freeze_keeps_frozen_layers_identical(run, tiny_model_dir):
    base = dict(load_base(tiny_model_dir).named_parameters())
    final = dict(trained_model(run, tiny_model_dir).named_parameters())
    trainable = set(run.initial)
    n_layers = len(load_base(tiny_model_dir).get_decoder().layers)
    top = {f"model.layers.{i}." for i in range(n_layers - run.cfg.method.freeze_trainable_layers, n_layers)}
    assert trainable == {n for n in base if any(n.startswith(t) for t in top)}
    for name, p in base.items():
        if name not in trainable:
            assert torch.equal(final[name], p), f"frozen {name} changed"


@pytest.fixture(scope="module")
def probe(tokenizer, tiny_data):
    rows = read_jsonl(tiny_data["test"])[:2]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                                             tokenize=False, add_generation_prompt=True) for r in rows]
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("run", [m for m in PEFT if methods.mergeable(m)], indirect=True)
def test_merged_model_computes_what_base_plus_adapter_computes(run, tiny_model_dir, probe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_base(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(**probe).logits
        adapted = PeftModel.from_pretrained(base, str(run.path / "adapter")).eval()
        peft_logits = adapted(**probe).logits
        merged = AutoModelForCausalLM.from_pretrained(run.path / "merged").eval()
        merged_logits = merged(**probe).logits
    assert (peft_logits - base_logits).abs().max() > 1e-6, "the adapter has no effect; the comparison is vacuous"
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)


def test_merged_folder_is_a_self_contained_chat_model(run):
    if not methods.mergeable(run.method):
        from modeling.model import model_folder

        with pytest.raises(ArtifactError, match="no merged model"):
            model_folder(str(run.path))
        return
    from modeling.model import load_tokenizer, model_folder

    assert model_folder(str(run.path)) == str(run.path / "merged")
    tok = load_tokenizer(str(run.path / "merged"))
    assert tok.eos_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n")


# ---------------------------------------------------------------- already built / --force
def test_same_config_is_already_built_and_force_trains_again(tiny_config, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="llmstack")
    out = tmp_path / "artifacts"
    first = sft.run(tiny_config(out_dir=out))
    runs = lambda: sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "latest")  # noqa
    assert runs() == [first.name]
    capsys.readouterr()
    caplog.clear()

    again = sft.run(tiny_config(out_dir=out))
    assert again == first
    assert "already built" in caplog.text and str(first) in caplog.text
    assert "answer loss" in capsys.readouterr().out  # the stored before/after table is shown again
    assert runs() == [first.name]
    assert not list(out.glob(".work/*")), "an already-built config must not start a run"

    forced = sft.run(tiny_config(out_dir=out), force=True)
    assert forced != first and sorted(runs()) == sorted([first.name, forced.name])
    assert os.readlink(out / "latest") == forced.name
    first_manifest = json.loads((first / "manifest.json").read_text())
    forced_manifest = json.loads((forced / "manifest.json").read_text())
    assert forced_manifest["fingerprint"] == first_manifest["fingerprint"]

    changed = sft.run(tiny_config(["train.lr=5e-4"], out_dir=out))
    assert changed not in (first, forced), "a different config must not count as already built"
    assert json.loads((changed / "manifest.json").read_text())["fingerprint"] != first_manifest["fingerprint"]


def test_gradient_accumulation_matches_the_larger_batch(tiny_config, tmp_path):
    """batch 1 x 2 accumulation steps must train exactly like batch 2: the loss is normalised by the answer tokens
    of the whole accumulated step, not averaged per micro-batch."""
    from safetensors.torch import load_file

    results = []
    for bs, ga in ((2, 1), (1, 2)):
        cfg = tiny_config([f"train.batch_size={bs}", f"train.grad_accum={ga}", "train.lr=1e-2", "method.lora_dropout=0",
                           "eval.after=false"], name=f"ga{ga}.yaml", out_dir=tmp_path / f"ga{ga}")
        path = sft.run(cfg)
        manifest = json.loads((path / "manifest.json").read_text())
        results.append((manifest["training"], load_file(path / "adapter" / "adapter_model.safetensors")))
    (t1, w1), (t2, w2) = results
    assert t1["effective_batch"] == t2["effective_batch"] == 2
    assert t1["tokens"] == t2["tokens"]
    assert t2["final_train_loss"] == pytest.approx(t1["final_train_loss"], abs=2e-4)
    assert max(v.abs().max().item() for v in w1.values()) > 1e-3  # the weights moved measurably
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-5, msg=name)


def test_existing_run_id_is_refused(tiny_config, tmp_path):
    out = tmp_path / "artifacts"
    (out / "fixed").mkdir(parents=True)
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists") as err:
        sft.run(tiny_config(["output.run_id=fixed"], out_dir=out))
    assert err.value.field == "output.run_id"


def test_final_validation_can_be_turned_off(tiny_config, tmp_path):
    """train.final_validation=false skips the end-of-training validation pass: no validation loss is claimed."""
    cfg = tiny_config(["train.final_validation=false", "eval.after=false"], out_dir=tmp_path / "a")
    m = json.loads((sft.run(cfg) / "manifest.json").read_text())
    assert m["training"]["validation_loss"] is None and m["metrics"]["validation_loss"] is None
    assert m["training"]["steps"] == cfg.train.max_steps
