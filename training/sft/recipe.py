"""The SFT recipe, top to bottom: load config -> prepare data -> load model -> evaluate before -> apply method ->
train (HF Trainer, answer-only loss, packing; the trainer is in training/sft/trainer.py) -> evaluate after -> save
adapter + merged model -> manifest.

Checkpoints go to `<output.dir>/.work/<run-id>/` so `--resume` continues a killed run; the artifact is written to a
temporary folder and renamed only when complete.

Several processes (`torchrun --nproc_per_node N -m llmstack train`, `accelerate launch -m llmstack train`): every
process runs `run`, trains its share of each batch and keeps its gradients in sync (DDP, FSDP or DeepSpeed, as the
launcher configured accelerate); rank 0 decides the run id, evaluates, merges and writes the artifact (see
training/distributed.py and deploy/training/README.md).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import DistributedType

from chatdata import splits
from chatdata.augment import report as augment_report
from core import artifacts
from core.config import config_hash, dump_yaml
from core.errors import ArtifactError
from core.log import log
from evaluation import quality as ev
from modeling.model import load_model, load_tokenizer
from tracking import runs as tracking_runs
from training import distributed, methods, outputs
from training.config import TrainConfig, warn_poor_settings
from training.sft import curriculum
from training.sft.trainer import AnswerLossTrainer, build_trainer


def _gather_trained(trainer: AnswerLossTrainer, model, cfg: TrainConfig, base_path: str, total: int,
                    dist: distributed.Dist):
    """The trained model, whole, on rank 0 (None on the other ranks; every rank must call this).

    One process or DDP: `model` itself (DDP keeps a full replica in every process). FSDP shards the parameters and
    DeepSpeed keeps its own copies (ZeRO-3: sharded; bf16: cast), so every rank joins in gathering the full state
    dict to rank 0 (accelerate's get_state_dict: FSDP's full state dict offloaded to rank 0's CPU, whatever
    fsdp_state_dict_type the checkpoints use; DeepSpeed ZeRO-3 needs stage3_gather_16bit_weights_on_model_save), and
    rank 0 loads it into a fresh base model with the method applied. Either way the model comes back on the CPU,
    where the merge, the after evaluation (evaluation/quality.py builds its batches there) and the save run."""
    if trainer.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return model.to("cpu") if dist.main else None
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not dist.main:
        return None
    fresh = methods.apply(load_model(base_path, cfg.model.dtype, cfg.model.attn_implementation,
                                     cfg.model.trust_remote_code), cfg.method, total)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    aliases: dict[int, list[str]] = {}
    for name, p in fresh.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    covered = {n for names in aliases.values() if any(x in state for x in names) for n in names}  # tied weights
    missing = [k for k in missing if k not in covered]
    if missing or unexpected:
        raise ArtifactError(f"the gathered {trainer.accelerator.distributed_type} state dict does not fit the model: "
                            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                            f"(e.g. {unexpected[:2]})")
    return fresh


def run(cfg: TrainConfig | None = None, *, resume: bool = False, resume_id: str | None = None,
        force: bool = False) -> Path:
    """Train and write the artifact; return its folder. resume: continue an interrupted run found under
    cfg.output.dir (default artifacts/train) with its saved config.

    Under torchrun / accelerate launch every process calls this; all return the artifact's folder, which rank 0
    alone writes (the other ranks return once training and the final validation are done, before it exists)."""
    dist = distributed.setup(cfg.train.ddp_backend if cfg else None)
    try:
        return _run(cfg, dist, resume=resume, resume_id=resume_id, force=force)
    finally:
        dist.close()


@dataclass
class _Run:
    """What the steps of one training run share."""
    cfg: TrainConfig
    dist: distributed.Dist
    root: Path
    work: Path | None
    phase: artifacts.Phases
    started_at: str
    run_id: str = ""
    base_path: str = ""
    parent: dict | None = None  # the training artifact this run continues (model.name_or_path names one)
    tokenizer: Any = None
    prepared: Any = None
    stages: list = field(default_factory=list)
    fingerprint: str = ""


def _run(cfg: TrainConfig | None, dist: distributed.Dist, *, resume: bool, resume_id: str | None,
         force: bool) -> Path:
    r = _start(cfg, dist, resume, resume_id)
    _prepare_data(r)
    decided = dist.decide(lambda: _plan(r, resume, force))
    if "built" in decided:
        return _already_built(r, decided["built"])
    r.cfg.output.run_id = r.run_id = decided["run_id"]
    r.work = decided["work"]
    r.phase("data")
    log.info(f"run {r.run_id}: {len(r.prepared.train)} train / {len(r.prepared.validation)} validation / "
             f"{len(r.prepared.test)} test examples; {len(r.prepared.report['drops'])} rows dropped (see "
             "data_report.md)")
    model, before = _load_and_eval_before(r)
    t = _train(r, model)
    model = _gather_trained(t.trainer, t.model, r.cfg, r.base_path, t.total, dist)
    if not dist.main:
        log.info(f"rank {dist.rank}: training done; rank 0 evaluates and writes the artifact")
        return r.root / r.run_id
    after = _merge_and_eval_after(r, model, t)
    final, table_md, stage_md = _save(r, before, after, t)
    _finish(r, final, (after.metrics or before["metrics"] or {}).get("n", 0), after, table_md, stage_md)
    return final


def _start(cfg: TrainConfig | None, dist: distributed.Dist, resume: bool, resume_id: str | None) -> _Run:
    """The config (a resumed run's saved one), threads and seed, the phase clock."""
    root = Path((cfg.output.dir if cfg else "artifacts/train"))
    work = None
    if resume:
        cfg, work = dist.decide(lambda: outputs.load_resume(root, resume_id))
        root = Path(cfg.output.dir)
    if dist.main:
        artifacts.clean_stale(root)
        warn_poor_settings(cfg)
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    torch.manual_seed(cfg.train.seed)
    return _Run(cfg, dist, root, work, artifacts.Phases(log), artifacts.now())  # phase(): manifest `timings`, the log


def _prepare_data(r: _Run) -> None:
    """Base model folder, tokenizer, the data pipeline (every rank: deterministic for a seed), the fingerprint."""
    cfg, dist = r.cfg, r.dist
    if dist.local_rank == 0:  # provisioning a built-in model writes its folder: one process per machine, first
        r.base_path, r.parent = outputs.resolve_base(cfg)
    dist.barrier()
    if dist.local_rank != 0:
        r.base_path, r.parent = outputs.resolve_base(cfg)
    r.tokenizer = load_tokenizer(r.base_path, cfg.model.trust_remote_code)
    r.prepared, r.stages = curriculum.prepare_data(cfg, r.tokenizer, dist.world_size)
    r.fingerprint = outputs.fingerprint(cfg, r.prepared, r.base_path, dist.world_size)


def _plan(r: _Run, resume: bool, force: bool) -> dict:
    """Rank 0 decides: an existing artifact to reuse, or this run's id and work folder."""
    cfg, root = r.cfg, r.root
    if not resume and not force and (built := artifacts.find_built(root, r.fingerprint)):
        return {"built": built}
    if not resume:
        for old in outputs.interrupted(root):
            log.info(f"note: interrupted run {old.name} can be resumed with `llmstack train --resume {old.name}`")
        run_id, new_work = outputs.new_work(root, cfg)
        (new_work / "config.yaml").write_text(dump_yaml(cfg))
        artifacts.write_json(new_work / "state.json", {"fingerprint": r.fingerprint, "started_at": r.started_at})
        return {"run_id": run_id, "work": new_work}
    if json.loads((r.work / "state.json").read_text())["fingerprint"] != r.fingerprint:
        raise ArtifactError("the data or base model changed since this run started; cannot resume it", file=r.work,
                            hint="start a new run with `llmstack train`")
    return {"run_id": cfg.output.run_id, "work": r.work}


def _already_built(r: _Run, built: Path) -> Path:
    return outputs.reuse_built(r.root, built, ev.table) if r.dist.main else built


def _load_and_eval_before(r: _Run) -> tuple[Any, dict]:
    """The base model, and its evaluation on the test split (rank 0; cached in the work folder for --resume)."""
    cfg = r.cfg
    model = load_model(r.base_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    before = {"metrics": None, "predictions": []}
    if cfg.eval.before and r.dist.main:
        cached = r.work / "before.json"
        if cached.is_file():
            before = json.loads(cached.read_text())
        else:
            metrics, preds = ev.evaluate(model, r.tokenizer, r.prepared.test, cfg.eval, max_len=cfg.data.max_seq_len,
                                         fast=True, label="before")
            before = {"metrics": metrics, "predictions": preds}
            artifacts.write_json(cached, before)
    r.dist.barrier()
    r.phase("load_and_eval_before")
    return model, before


def _train(r: _Run, model) -> SimpleNamespace:
    """Apply the method, train (from the last complete checkpoint when resuming), validate; the training stats."""
    cfg, dist, t = r.cfg, r.dist, r.cfg.train
    method = cfg.method.name
    fast, pack = methods.fast_loss(method), t.packing and methods.supports_packing(method)
    if t.packing and not pack:
        log.info(f"packing is off: {method} prepends virtual tokens to each example")
    per_epoch = -(-len(r.prepared.train) // (t.batch_size * t.grad_accum * dist.world_size))
    total = t.max_steps if t.max_steps > 0 else int(per_epoch * t.epochs + 0.999)
    total = r.stages[-1].end if r.stages else total
    model = methods.apply(model, cfg.method, total)
    params = methods.count_parameters(model)
    log.info(f"method {method}: {params['trainable']:,} trainable of {params['total']:,} parameters "
             f"({params['trainable_pct']}%), {total} steps, lr {cfg.effective_lr(dist.world_size):g}")
    trainer, progress = build_trainer(cfg, model, r.tokenizer, r.prepared, r.work, pack=pack, fast=fast, dist=dist,
                                      stages=r.stages)
    last = dist.decide(lambda: outputs.last_complete_checkpoint(r.work / "checkpoints"))
    if last:
        log.info(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    r.phase("train")
    stage_rows = None
    if r.stages:  # the last stage's end evaluated the validation set already
        ends = next(c for c in trainer.callback_handler.callbacks if isinstance(c, curriculum.StageEnds))
        stage_rows = curriculum.stage_metrics(trainer.state.log_history, r.stages, ends.base)
        val = {"eval_loss": stage_rows[-1]["validation_loss"]}
    else:
        val = trainer.evaluate() if r.prepared.validation and t.final_validation else {}
    r.phase("validation")
    tokens = dist.sum(trainer.tokens_seen)
    stats = {
        "steps": trainer.state.global_step, "tokens": tokens,
        "tokens_per_s": round(tokens / max(progress.step_time, 1e-9), 1),
        "step_seconds": round(progress.step_time, 1), "resumed_from": Path(last).name if last else None,
        "final_train_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "validation_loss": val.get("eval_loss"), "parameters": params, "packing": pack, "answer_only_lm_head": fast,
        "effective_lr": cfg.effective_lr(dist.world_size),
        "effective_batch": t.batch_size * t.grad_accum * dist.world_size,
        "distributed": dist.info() | {"type": str(trainer.accelerator.distributed_type.value),
                                      "mixed_precision": str(trainer.accelerator.mixed_precision)},
    }
    return SimpleNamespace(trainer=trainer, model=model, total=total, stats=stats, val=val, stage_rows=stage_rows,
                           fast=fast, pack=pack)


def _merge_and_eval_after(r: _Run, model, t: SimpleNamespace) -> SimpleNamespace:
    """Save the adapter (merging folds it into the weights), merge, evaluate after, profile the drift reference."""
    cfg, method = r.cfg, r.cfg.method.name
    adapter_dir = r.work / "adapter" if method not in ("full", "freeze") else None
    if adapter_dir:
        model.save_pretrained(adapter_dir)
    merged = methods.merged(model, method)
    final_model = merged if merged is not None else model
    metrics, preds = None, []
    if cfg.eval.after:
        metrics, preds = ev.evaluate(final_model, r.tokenizer, r.prepared.test, cfg.eval, max_len=cfg.data.max_seq_len,
                                     fast=merged is not None or t.fast, pack=t.pack, label="after")
    t.stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    r.phase("merge_and_eval_after")
    drift_ref = outputs.drift_reference(cfg, r.tokenizer, r.prepared, preds, final_model) if cfg.drift.enabled else None
    if drift_ref is not None:
        r.phase("drift_reference")
    return SimpleNamespace(metrics=metrics, predictions=preds, merged=merged, model=final_model,
                           adapter_dir=adapter_dir, drift_ref=drift_ref)


def _save(r: _Run, before: dict, after: SimpleNamespace, t: SimpleNamespace) -> tuple[Path, str, str | None]:
    """The artifact, written atomically: models, data splits and reports, plots, predictions, model card, manifest."""
    cfg, prepared, stages = r.cfg, r.prepared, r.stages
    with artifacts.atomic_dir(r.root, r.run_id) as out:
        history = t.trainer.state.log_history
        written = outputs.write_common(out, cfg, r.tokenizer, prepared, {"merged": after.merged, "method":
                                       cfg.method.name, "adapter_dir": after.adapter_dir}, history,
                                       {"before": before["predictions"], "after": after.predictions})
        splits.save(prepared, out / splits.FOLDER)  # what compression distils and evaluates on
        if stages:
            curriculum.plot(history, stages, t.stage_rows, out / "curriculum.png")
        if after.drift_ref is not None:
            after.drift_ref.save(out)
            written["drift_reference"] = "drift_reference.json: the profile serving compares live traffic with"
        table_md = ev.table(before["metrics"], after.metrics)
        stage_md = curriculum.table(t.stage_rows, prepared.report["curriculum"]) if stages else None
        manifest = {
            **outputs.manifest_header(cfg, r.run_id, r.fingerprint, r.base_path, r.parent),
            "datasets": prepared.report["sources"], "config": cfg.model_dump(mode="json"),
            "augmentation": augment_report.manifest_entry(prepared.report.get("augment")),
            "reweighing": prepared.report.get("reweigh"),
            "config_hash": config_hash(cfg, {"output.run_id"}),
            "metrics": {"before": before["metrics"], "after": after.metrics, "validation_loss": t.val.get("eval_loss")},
            "metrics_table": table_md, "training": t.stats, "outputs": written,
            "curriculum": {"stages": prepared.report["curriculum"], "metrics": t.stage_rows,
                           "table": stage_md} if stages else None,
            "drift_reference": after.drift_ref.meta if after.drift_ref is not None else None,
            "packages": artifacts.package_versions(), "started_at": r.started_at, "finished_at": artifacts.now(),
            "wall_seconds": round(time.time() - r.phase.start, 1),
        }
        r.phase("save")
        manifest["timings"] = r.phase.timings
        outputs.finish_artifact(out, manifest, table_md)
    artifacts.set_latest(r.root, r.run_id)
    tracking_runs.record(r.root / r.run_id, cfg.tracking, t.trainer.state.log_history)
    return r.root / r.run_id, table_md, stage_md


def _finish(r: _Run, final: Path, n_test: int, after: SimpleNamespace, table_md: str, stage_md: str | None) -> None:
    """The fairness check (when enabled), the work folder removed, the before / after table."""
    cfg = r.cfg
    if cfg.fairness.enabled:  # bias checks on the merged model: reports + the manifest's `fairness` entry
        from evaluation.fairness import check as fairness
        fairness.run(str(final), cfg.fairness, model=after.model, tokenizer=r.tokenizer)
    if not cfg.output.keep_checkpoints:
        shutil.rmtree(r.work, ignore_errors=True)
    print(f"\nBefore/after on the held-out test split ({n_test} examples):\n")
    print(table_md)
    if r.stages:
        print(f"\nCurriculum: domain validation and general held-out loss after each stage:\n\n{stage_md}")
    print(f"\nartifact: {final}  (latest: {r.root / 'latest'})")
    print(r.phase.summary())
