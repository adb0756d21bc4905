"""What every training recipe (SFT: training/sft/recipe.py, preference tuning: training/preference/recipe.py)
shares around the Trainer: the run fingerprint that says "already built", finding an interrupted run and its last
complete checkpoint for `--resume`, and writing the artifact (adapter + merged model, data report, plots,
predictions, manifest header, model card, metrics, drift reference)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from chatdata import eda
from chatdata import pipeline as data_mod
from core import artifacts
from core.config import config_hash, dump_yaml, validate
from core.errors import ArtifactError, ConfigError
from core.log import log
from evaluation import quality as ev
from modeling.model import BUILTIN, load_model, load_tokenizer, resolve
from training import report
from training.config import TrainConfig


def fingerprint(cfg: TrainConfig, prepared, base_path: str, world_size: int = 1) -> str:
    base = Path(base_path)
    weights = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    model_id = [(p.name, p.stat().st_size) for p in weights] or base_path
    datasets = sorted((s["path"], s["sha256"]) for s in prepared.report["sources"])
    ignore = {"output.run_id", "output.keep_checkpoints", "train.threads", "train.ddp_backend",
              "train.ddp_find_unused_parameters", "fairness", "tracking"}  # checks and tracking do not change the model
    parts = [config_hash(cfg, ignore), datasets, model_id]
    if world_size > 1:  # the effective batch is batch_size x grad_accum x world_size (1 process: as before)
        parts.append({"world_size": world_size})
    key = json.dumps(parts, default=str)
    return __import__("hashlib").sha256(key.encode()).hexdigest()[:16]


def interrupted(root: Path) -> list[Path]:
    work = root / ".work"
    runs = [d for d in work.iterdir() if d.is_dir() and not (root / d.name).exists()] if work.is_dir() else []
    return sorted(runs, key=lambda d: d.stat().st_mtime)


# what a complete checkpoint holds (any one of each group's files or folders); the Trainer writes trainer_state.json
# last. FSDP writes pytorch_model_fsdp_0/ + optimizer_0/ (sharded state dict) or pytorch_model_fsdp.bin +
# optimizer.bin (full); DeepSpeed writes global_step<N>/ and then `latest`, which names it.
CHECKPOINT_FILES = {"weights": ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                                "pytorch_model_fsdp_0", "pytorch_model_fsdp.bin", "latest"),
                    "optimizer": ("optimizer.pt", "optimizer.bin", "optimizer_0", "latest"),
                    "trainer state": ("trainer_state.json",)}


def new_work(root: Path, cfg: TrainConfig) -> tuple[str, Path]:
    """This run's id (output.run_id, else a new one) and its work folder, created; a run id in use is refused."""
    run_id = cfg.output.run_id or artifacts.new_run_id()
    work = root / ".work" / run_id
    if (root / run_id).exists() or work.exists():
        raise ConfigError(f"run {run_id} already exists", field="output.run_id")
    cfg.output.run_id = run_id
    work.mkdir(parents=True)
    return run_id, work


def reuse_built(root: Path, built: Path, table) -> Path:
    """An artifact with this run's fingerprint exists: say so, print its before/after table (`table(before,
    after)`), point `latest` at it."""
    log.info(f"already built: {built} (same config, data and base model; pass --force to train again)")
    m = artifacts.read_manifest(built)
    print(table(m["metrics"].get("before"), m["metrics"].get("after")))
    artifacts.set_latest(root, built.name)
    return built


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes checkpoints in place (trainer_state.json last),
    so a kill while saving leaves the highest-numbered folder incomplete: skip it, and say so."""
    found = [d for d in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if d.is_dir() and d.name.rsplit("-", 1)[1].isdigit()]
    for ckpt in sorted(found, key=lambda d: int(d.name.rsplit("-", 1)[1]), reverse=True):
        missing = [what for what, names in CHECKPOINT_FILES.items() if not any((ckpt / n).exists() for n in names)]
        if not missing:
            return str(ckpt)
        log.warning(f"warning: skipping incomplete checkpoint {ckpt} (its saving was interrupted; missing "
                    f"{', '.join(missing)})")
    return None


def load_resume(root: Path, run_id: str | None) -> tuple[TrainConfig, Path]:
    runs = interrupted(root)
    if not runs:
        raise ArtifactError(f"no interrupted run to resume under {root / '.work'}",
                            hint="start one with `llmstack train`")
    work = root / ".work" / run_id if run_id else runs[-1]
    if not (work / "config.yaml").is_file():
        raise ArtifactError("no such interrupted run", file=work, hint=f"known: {', '.join(d.name for d in runs)}")
    data = yaml.safe_load((work / "config.yaml").read_text())
    return validate(TrainConfig, data, file=work / "config.yaml"), work


def drift_reference(cfg: TrainConfig, tokenizer, prepared, after_preds: list[dict], model):
    """The drift profile: training prompts, and the model's answers (the after-evaluation's, or the validation
    split's)."""
    from monitoring import drift

    d = cfg.drift
    fit = [drift.chat_prompt(tokenizer, e.prompt_messages()) for e in prepared.train
           if e.messages is not None][:d.max_prompts]
    held = [e for e in prepared.validation if e.messages is not None]
    prompts = [drift.chat_prompt(tokenizer, e.prompt_messages()) for e in held]
    if not fit or len(prompts) < 2:
        log.info("no drift reference: it needs chat prompts in the train split and at least 2 in the validation split")
        return None
    if d.outputs_from == "validation":
        outputs: list[dict] = []
        ev.generate(model, tokenizer, [e.prompt_messages() for e in held[:d.max_outputs]], cfg.eval.max_new_tokens,
                    cfg.eval.batch_size, desc="drift reference", stats=outputs)
        source = f"validation split, {len(outputs)} greedy answers"
    else:
        outputs = [p for p in after_preds if "n_tokens" in p][:d.max_outputs]
        source = f"the after-training evaluation's greedy answers (test split, first {len(outputs)} rows)"
    return drift.build_reference(fit, prompts, outputs, {
        "created_at": artifacts.now(), "basis_from": f"train split, {len(fit)} prompts",
        "prompts_from": f"validation split, {len(prompts)} prompts", "outputs_from": source})


def drift_reference_for(artifact: str | Path, outputs_from: str | None = None) -> Path:
    """Write (or rewrite) drift_reference.json into an existing training artifact, e.g. one trained before drift
    references existed. The answers come from its predictions_after.jsonl when they carry token statistics, else
    from generating on the validation split with its merged model."""
    from core.config import validate as validate_cfg

    folder = Path(artifact).resolve()
    m = artifacts.read_manifest(folder)
    if m.get("stage") != "train":
        raise ArtifactError(f"a '{m.get('stage')}' artifact; drift references are made from training artifacts",
                            file=folder, hint="pass the compress run's parent, artifacts/train/<run>")
    cfg = validate_cfg(TrainConfig, m["config"], file=folder / artifacts.MANIFEST)
    model_dir = folder / "merged"
    if not (model_dir / "config.json").is_file():
        raise ArtifactError("no merged model in this training artifact", file=folder)
    tokenizer = load_tokenizer(str(model_dir))
    prepared = data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)
    preds_file = folder / "predictions_after.jsonl"
    preds = [json.loads(x) for x in preds_file.read_text().splitlines()] if preds_file.is_file() else []
    cfg.drift.outputs_from = outputs_from or ("eval" if preds and "n_tokens" in preds[0] else "validation")
    model = load_model(str(model_dir)) if cfg.drift.outputs_from == "validation" else None
    ref = drift_reference(cfg, tokenizer, prepared, preds, model)
    if ref is None:
        raise ArtifactError("the training data has too few chat prompts for a drift reference", file=folder)
    tmp = folder / "_drift_tmp"
    tmp.mkdir(exist_ok=True)
    ref.save(tmp).replace(folder / "drift_reference.json")
    tmp.rmdir()
    return folder / "drift_reference.json"


def save_models(out: Path, tokenizer, merged, adapter_dir: Path | None, method: str, save_merged: bool) -> dict:
    """Into the artifact folder `out`: the saved adapter (peft methods) and the merged model with its tokenizer.
    Returns the manifest's `outputs` entries. Shared by every training recipe (SFT, preference tuning)."""
    outputs = {}
    if adapter_dir:
        shutil.copytree(adapter_dir, out / "adapter")
        outputs["adapter"] = f"peft adapter ({method}), load on top of the base model"
    if merged is not None and save_merged:
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")
        outputs["merged"] = "full model (safetensors + tokenizer), what compression and serving load"
    return outputs


def write_common(out: Path, cfg: TrainConfig, tokenizer, prepared, models: dict, history: list[dict],
                 predictions: dict[str, list[dict]]) -> dict:
    """What every training artifact holds, written into `out`: the models (`models`: save_models' merged,
    adapter_dir, method), the resolved config, the data report, token lengths and loss plots, the before / after
    predictions. Returns the manifest's `outputs` entries."""
    written = save_models(out, tokenizer, models["merged"], models["adapter_dir"], models["method"],
                          cfg.output.save_merged)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    artifacts.write_json(out / "data_report.json", prepared.report)
    (out / "data_report.md").write_text(data_mod.report_markdown(prepared.report))
    report.length_histogram({s: [len(e.input_ids) for e in getattr(prepared, s)]
                             for s in ("train", "validation", "test")}, cfg.data.max_seq_len, out / "token_lengths.png")
    report.loss_curve(history, out / "loss_curve.png")
    artifacts.write_json(out / artifacts.TRAIN_HISTORY, history)
    if prepared.report.get("eda"):  # label fields per split (chat data; preference rows have their own report)
        eda.plot(prepared.report["eda"], out / "data_fields.png")
    for name, preds in predictions.items():
        if preds:
            (out / f"predictions_{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return written


def manifest_header(cfg: TrainConfig, run_id: str, fingerprint: str, base_path: str, parent: dict | None = None,
                    ) -> dict:
    """The first manifest entries of a training artifact: what it is and what it came from."""
    return {"stage": "train", "run_id": run_id, "fingerprint": fingerprint, "parent": parent,
            "base_model": {"name": cfg.model.name_or_path, "path": base_path,
                           "source": f"pypi:{BUILTIN[cfg.model.name_or_path]['pip']}"
                           if cfg.model.name_or_path in BUILTIN else "local folder or hub"}}


def finish_artifact(out: Path, manifest: dict, table_md: str) -> None:
    """The model card, metrics.json and, last, manifest.json of a training artifact being written in `out`."""
    (out / "README.md").write_text(report.model_card(manifest, table_md))
    artifacts.write_json(out / "metrics.json", manifest["metrics"] | {"training": manifest["training"]})
    artifacts.write_json(out / artifacts.MANIFEST, manifest)


def resolve_base(cfg: TrainConfig) -> tuple[str, dict | None]:
    """The model folder to train and its parent artifact: a training artifact folder (or its merged/ folder, or a
    `latest` pointer) gives its merged model and becomes the manifest's parent (preference tuning on an SFT run,
    `llmstack retrain` continuing the served model's training); a built-in name or plain folder has no parent."""
    given = Path(cfg.model.name_or_path)
    folder = None
    if (given / artifacts.MANIFEST).is_file() and (given / "merged" / "config.json").is_file():
        folder, model_dir = given.resolve(), given.resolve() / "merged"
    elif given.name == "merged" and (given.parent / artifacts.MANIFEST).is_file():
        folder, model_dir = given.parent.resolve(), given.resolve()
    if folder is None:
        return resolve(cfg.model.name_or_path, cfg.model.models_dir), None
    m = artifacts.read_manifest(folder)
    parent = {"stage": m.get("stage"), "run_id": m.get("run_id"), "path": str(folder),
              "recipe": m.get("config", {}).get("recipe", "sft"), "fingerprint": m.get("fingerprint")}
    return str(model_dir), parent
