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
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from chatdata import pipeline as data_mod
from chatdata import splits
from core import artifacts
from core.config import config_hash, dump_yaml
from core.errors import ArtifactError, ConfigError
from core.log import log
from evaluation import quality as ev
from modeling.model import load_model, load_tokenizer, resolve
from training import distributed, methods, outputs, report
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


def _run(cfg: TrainConfig | None, dist: distributed.Dist, *, resume: bool, resume_id: str | None,
         force: bool) -> Path:
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
    phase = artifacts.Phases(log)  # call at each phase's end: manifest `timings`, and the log
    t_start, timings, started_at = phase.start, phase.timings, artifacts.now()

    # ---- data (every rank prepares it: deterministic for a seed)
    if dist.local_rank == 0:  # provisioning a built-in model writes its folder: one process per machine, first
        base_path = resolve(cfg.model.name_or_path, cfg.model.models_dir)
    dist.barrier()
    if dist.local_rank != 0:
        base_path = resolve(cfg.model.name_or_path, cfg.model.models_dir)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    prepared, stages = curriculum.prepare_data(cfg, tokenizer, dist.world_size)
    t = cfg.train
    fingerprint = outputs.fingerprint(cfg, prepared, base_path, dist.world_size)

    def plan() -> dict:
        """Rank 0 decides: an existing artifact to reuse, or this run's id and work folder."""
        if not resume and not force and (built := artifacts.find_built(root, fingerprint)):
            return {"built": built}
        if not resume:
            for old in outputs.interrupted(root):
                log.info(f"note: interrupted run {old.name} can be resumed with `llmstack train --resume {old.name}`")
            run_id = cfg.output.run_id or artifacts.new_run_id()
            new_work = root / ".work" / run_id
            if (root / run_id).exists() or new_work.exists():
                raise ConfigError(f"run {run_id} already exists", field="output.run_id")
            cfg.output.run_id = run_id
            new_work.mkdir(parents=True)
            (new_work / "config.yaml").write_text(dump_yaml(cfg))
            artifacts.write_json(new_work / "state.json", {"fingerprint": fingerprint, "started_at": started_at})
            return {"run_id": run_id, "work": new_work}
        if json.loads((work / "state.json").read_text())["fingerprint"] != fingerprint:
            raise ArtifactError("the data or base model changed since this run started; cannot resume it", file=work,
                                hint="start a new run with `llmstack train`")
        return {"run_id": cfg.output.run_id, "work": work}

    decided = dist.decide(plan)
    if "built" in decided:
        built = decided["built"]
        if dist.main:
            log.info(f"already built: {built} (same config, data and base model; pass --force to train again)")
            m = artifacts.read_manifest(built)
            print(ev.table(m["metrics"].get("before"), m["metrics"].get("after")))
            artifacts.set_latest(root, built.name)
        return built
    cfg.output.run_id, work = decided["run_id"], decided["work"]
    run_id = cfg.output.run_id
    phase("data")
    log.info(f"run {run_id}: {len(prepared.train)} train / {len(prepared.validation)} validation / "
             f"{len(prepared.test)} test examples; {len(prepared.report['drops'])} rows dropped (see data_report.md)")

    # ---- model, evaluation before (rank 0; the others wait)
    method = cfg.method.name
    fast = methods.fast_loss(method)
    pack = cfg.train.packing and methods.supports_packing(method)
    if cfg.train.packing and not pack:
        log.info(f"packing is off: {method} prepends virtual tokens to each example")
    model = load_model(base_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    max_len = cfg.data.max_seq_len
    before, before_preds = None, []
    if cfg.eval.before and dist.main:
        cached = work / "before.json"
        if cached.is_file():
            before, before_preds = json.loads(cached.read_text()).values()
        else:
            before, before_preds = ev.evaluate(model, tokenizer, prepared.test, cfg.eval, max_len=max_len, fast=True,
                                               label="before")
            artifacts.write_json(cached, {"metrics": before, "predictions": before_preds})
    dist.barrier()
    phase("load_and_eval_before")

    # ---- train
    per_epoch = -(-len(prepared.train) // (t.batch_size * t.grad_accum * dist.world_size))
    total = t.max_steps if t.max_steps > 0 else int(per_epoch * t.epochs + 0.999)
    total = stages[-1].end if stages else total
    model = methods.apply(model, cfg.method, total)
    params = methods.count_parameters(model)
    log.info(f"method {method}: {params['trainable']:,} trainable of {params['total']:,} parameters "
             f"({params['trainable_pct']}%), {total} steps, lr {cfg.effective_lr(dist.world_size):g}")
    trainer, progress = build_trainer(cfg, model, tokenizer, prepared, work, pack=pack, fast=fast, dist=dist,
                                      stages=stages)
    last = dist.decide(lambda: outputs.last_complete_checkpoint(work / "checkpoints"))
    if last:
        log.info(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    phase("train")
    if stages:  # the last stage's end evaluated the validation set already
        ends = next(c for c in trainer.callback_handler.callbacks if isinstance(c, curriculum.StageEnds))
        stage_rows = curriculum.stage_metrics(trainer.state.log_history, stages, ends.base)
        val = {"eval_loss": stage_rows[-1]["validation_loss"]}
    else:
        val = trainer.evaluate() if prepared.validation and cfg.train.final_validation else {}
    phase("validation")
    tokens = dist.sum(trainer.tokens_seen)
    train_stats = {
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
    model = _gather_trained(trainer, model, cfg, base_path, total, dist)
    if not dist.main:
        log.info(f"rank {dist.rank}: training done; rank 0 evaluates and writes the artifact")
        return root / run_id

    # ---- evaluation after, merge (the adapter is saved first: merging folds it into the weights)
    adapter_dir = work / "adapter" if method not in ("full", "freeze") else None
    if adapter_dir:
        model.save_pretrained(adapter_dir)
    merged = methods.merged(model, method)
    after, after_preds = None, []
    if cfg.eval.after:
        eval_model = merged if merged is not None else model
        after, after_preds = ev.evaluate(eval_model, tokenizer, prepared.test, cfg.eval, max_len=max_len,
                                         fast=merged is not None or fast, pack=pack, label="after")
    train_stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    phase("merge_and_eval_after")
    drift_ref = outputs.drift_reference(cfg, tokenizer, prepared, after_preds,
                                 merged if merged is not None else model) if cfg.drift.enabled else None
    if drift_ref is not None:
        phase("drift_reference")

    # ---- artifact
    with artifacts.atomic_dir(root, run_id) as out:
        written = outputs.save_models(out, tokenizer, merged, adapter_dir, method, cfg.output.save_merged)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        artifacts.write_json(out / "data_report.json", prepared.report)
        (out / "data_report.md").write_text(data_mod.report_markdown(prepared.report))
        splits.save(prepared, out / splits.FOLDER)  # what compression distils and evaluates on
        report.length_histogram({s: [len(e.input_ids) for e in getattr(prepared, s)]
                                 for s in ("train", "validation", "test")}, max_len, out / "token_lengths.png")
        report.loss_curve(trainer.state.log_history, out / "loss_curve.png")
        if stages:
            curriculum.plot(trainer.state.log_history, stages, stage_rows, out / "curriculum.png")
        for name, preds in (("before", before_preds), ("after", after_preds)):
            if preds:
                (out / f"predictions_{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        if drift_ref is not None:
            drift_ref.save(out)
            written["drift_reference"] = "drift_reference.json: the profile serving compares live traffic with"
        table_md = ev.table(before, after)
        stage_md = curriculum.table(stage_rows, prepared.report["curriculum"]) if stages else None
        manifest = {
            **outputs.manifest_header(cfg, run_id, fingerprint, base_path),
            "datasets": prepared.report["sources"], "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg, {"output.run_id"}),
            "metrics": {"before": before, "after": after, "validation_loss": val.get("eval_loss")},
            "metrics_table": table_md, "training": train_stats, "outputs": written,
            "curriculum": {"stages": prepared.report["curriculum"], "metrics": stage_rows,
                           "table": stage_md} if stages else None,
            "drift_reference": drift_ref.meta if drift_ref is not None else None,
            "packages": artifacts.package_versions(), "started_at": started_at, "finished_at": artifacts.now(),
            "wall_seconds": round(time.time() - t_start, 1),
        }
        phase("save")
        manifest["timings"] = timings
        outputs.finish_artifact(out, manifest, table_md)
    final = root / run_id
    artifacts.set_latest(root, run_id)
    if cfg.fairness.enabled:  # bias checks on the merged model: reports + the manifest's `fairness` entry
        from evaluation.fairness import check as fairness
        fairness.run(str(final), cfg.fairness, model=merged if merged is not None else model, tokenizer=tokenizer)
    if not cfg.output.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nBefore/after on the held-out test split ({(after or before or {}).get('n', 0)} examples):\n")
    print(table_md)
    if stages:
        print(f"\nCurriculum: domain validation and general held-out loss after each stage:\n\n{stage_md}")
    print(f"\nartifact: {final}  (latest: {root / 'latest'})")
    print(phase.summary())
    return final

