"""The SFT recipe, top to bottom: load config -> prepare data -> load model -> evaluate before -> apply method ->
train (HF Trainer, answer-only loss, packing) -> evaluate after -> save adapter + merged model -> manifest.

Checkpoints go to `<output.dir>/.work/<run-id>/` so `--resume` continues a killed run; the artifact is written to a
temporary folder and renamed only when complete.

Several processes (`torchrun --nproc_per_node N -m llmstack train`, `accelerate launch -m llmstack train`): every
process runs `run`, trains its share of each batch and keeps its gradients in sync (DDP, FSDP or DeepSpeed, as the
launcher configured accelerate); rank 0 decides the run id, evaluates, merges and writes the artifact (see
training/distributed.py and deploy/training/README.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
import unittest.mock
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from llmstack import artifacts
from llmstack.config import config_hash, dump_yaml
from llmstack.errors import ArtifactError, ConfigError
from llmstack.log import log

from . import curriculum
from . import data as data_mod
from . import distributed
from . import evaluate as ev
from . import methods, outputs, report
from .collate import Collator, answer_loss
from .config import TrainConfig, warn_poor_settings
from .model import load_model, load_tokenizer, resolve

OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "rmsprop": "rmsprop", "adafactor": "adafactor"}


@contextlib.contextmanager
def _forward_replaced(module, fn):
    """`module.forward` is `fn` for the duration (an instance attribute; accelerate's own mixed-precision wrapper, if
    it set one, is put back afterwards)."""
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if saved is not None:
            module.forward = saved
        else:
            del module.forward


class AnswerLossTrainer(Trainer):
    """HF Trainer with the answer-only loss, normalised by the answer tokens of the whole accumulated step (of all
    processes, when there are several)."""

    def __init__(self, *args, fast: bool = True, sequential: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fast = fast
        self.sequential = sequential  # a curriculum: rows in their laid-out order (training/curriculum.py)
        self.model_accepts_loss_kwargs = True  # we divide by num_items_in_batch ourselves
        self.tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        if self.sequential:
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _answer_loss(self, model, inputs):
        """answer_loss on `model`, which the Trainer may have wrapped (DDP, FSDP, DeepSpeed). The fast path calls the
        decoder and the LM head directly; a wrapper must still see a forward call (DDP arms its gradient all-reduce
        there, FSDP and DeepSpeed gather their sharded parameters), so the fast path then runs as the wrapped model's
        forward, under accelerate's autocast when mixed precision is on."""
        inner = self.accelerator.unwrap_model(model)
        if not self.fast:  # the model's own forward: accelerate's wrappers apply
            return answer_loss(model, inputs, fast=False)
        if inner is model and self.accelerator.distributed_type == DistributedType.NO:
            with self.accelerator.autocast():  # a no-op without mixed precision
                return answer_loss(model, inputs, fast=True)

        def forward(**batch):
            with self.accelerator.autocast():
                return answer_loss(inner, batch, fast=True)

        with _forward_replaced(inner, forward):
            return model(**inputs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resuming with several processes on the CPU: accelerate names each process's device cpu:<rank>, which the
        Trainer passes to torch.load as map_location for the optimizer state, and torch refuses it. Load to "cpu"."""
        device = self.args.device
        if checkpoint is None or self.args.world_size <= 1 or device.type != "cpu" or device.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load = torch.load

        def cpu_load(*args, **kwargs):
            if kwargs.get("map_location") == device:
                kwargs["map_location"] = "cpu"
            return load(*args, **kwargs)

        with unittest.mock.patch.object(torch, "load", cpu_load):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n_tokens = int(inputs.pop("n_tokens"))
        if model.training:
            self.tokens_seen += n_tokens
        loss_sum, n = self._answer_loss(model, inputs)
        loss = loss_sum / (num_items_in_batch if num_items_in_batch is not None else max(n, 1))
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # As Trainer.compute_loss does: num_items_in_batch counts the answer tokens of every process
            # (_get_num_items_in_batch gathers them) and DDP / DeepSpeed average the gradients over the processes, so
            # the per-process loss is scaled back up; N processes at batch B then step like 1 process at N x B.
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, {}) if return_outputs else loss


class Progress(TrainerCallback):
    """One progress bar: step, loss, tokens/s, lr and tqdm's ETA. Also times the steps (tokens/s excludes evals)."""

    def __init__(self, trainer: AnswerLossTrainer, show: bool = True):
        self.trainer, self.bar, self.loss, self.step_time, self._t = trainer, None, None, 0.0, None
        self.show = show  # several processes: only rank 0 shows the bar (all of them time their steps)

    def on_train_begin(self, args, state, control, **kw):
        from tqdm import tqdm
        if not self.show:
            return
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.step_time += time.perf_counter() - self._t
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        tps = self.trainer.tokens_seen / max(self.step_time, 1e-9)
        post = {"tok/s": f"{tps:.0f}"}
        if self.loss is not None:
            post["loss"] = f"{self.loss:.4f}"
        self.bar.set_postfix(post, refresh=False)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss = logs["loss"]
        if logs and "eval_loss" in logs and self.bar is not None:
            self.bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


class AdaLoraAllocator(TrainerCallback):
    """AdaLoRA re-allocates ranks after each optimizer step, while gradients still exist."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kw):
        self.model.base_model.update_and_allocate(state.global_step)


def _training_args(cfg: TrainConfig, work: Path, n_train: int, world_size: int = 1,
                   max_steps: int | None = None) -> TrainingArguments:
    t = cfg.train
    sched_kwargs = {"min_lr_rate": t.min_lr_ratio} if t.scheduler == "cosine_with_min_lr" else {}
    precision = t.mixed_precision or distributed.LAUNCHER_MIXED_PRECISION or "no"
    # accelerate (and its DeepSpeed plugin, which fills the JSON's "auto" precision from it while TrainingArguments
    # is built) reads the variable, the Trainer the bf16/fp16 flags: tell both the same
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    evals = {"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps else {"eval_strategy": "no"}
    best = {}
    if t.early_stopping_patience:
        best = {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False}
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(t.batch_size, cfg.eval.batch_size), gradient_accumulation_steps=t.grad_accum,
        learning_rate=cfg.effective_lr(world_size), num_train_epochs=t.epochs,
        max_steps=max_steps if max_steps is not None else t.max_steps,
        warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.scheduler, lr_scheduler_kwargs=sched_kwargs,
        weight_decay=t.weight_decay, optim=OPTIMIZERS[t.optimizer], max_grad_norm=t.max_grad_norm or 1e9,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed, use_cpu=not torch.cuda.is_available(),
        report_to=[], disable_tqdm=True, remove_unused_columns=False, label_names=["labels"],
        prediction_loss_only=True, dataloader_num_workers=0, save_safetensors=True, bf16=precision == "bf16",
        fp16=precision == "fp16", ddp_backend=t.ddp_backend,
        ddp_find_unused_parameters=t.ddp_find_unused_parameters, **evals, **best)
    if world_size == 1 and args.n_gpu > 1:
        # one process on a machine with several GPUs: the Trainer would use torch's DataParallel, which replicates
        # the model per GPU inside one process and calls each replica's forward (our answer-only fast path bypasses
        # it). Train on one GPU instead; torchrun / accelerate launch use them all (DDP).
        log.info(f"training on 1 of {args.n_gpu} GPUs; launch with `torchrun --nproc_per_node {args.n_gpu} -m "
                 "llmstack train ...` to use them all")
        args._n_gpu = 1
    return args


def _features(rows) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]


def build_trainer(cfg: TrainConfig, model, tokenizer, prepared, work: Path, *, pack: bool, fast: bool,
                  dist: distributed.Dist | None = None, stages: list | None = None):
    """The HF Trainer with our collator, answer-only loss, progress bar and method-specific callbacks.

    Several processes: the Trainer's dataloader (accelerate) gives each rank every world_size-th micro-batch of the
    same seeded shuffle, so at batch B per process a step sees the examples one process sees at batch world_size x
    B; the collator packs (and shares the prefix of) each rank's micro-batch, which is exact per example.

    stages (a curriculum, training/curriculum.py): the rows are read in their laid-out order for exactly the stages'
    steps, and evaluated on the domain validation and the general held-out sets at every stage end."""
    dist = dist or distributed.Dist()
    evals = curriculum.eval_sets(prepared, _features) if stages else (_features(prepared.validation) or None)
    trainer = AnswerLossTrainer(
        model=model, args=_training_args(cfg, work, len(prepared.train), dist.world_size,
                                         max_steps=stages[-1].end if stages else None),
        fast=fast, sequential=bool(stages), train_dataset=_features(prepared.train), eval_dataset=evals,
        data_collator=Collator(tokenizer.pad_token_id, cfg.data.max_seq_len, pack=pack,
                               share_prefix=fast and cfg.train.share_prefix))
    progress = Progress(trainer, show=dist.main)
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; no raw dicts on stdout
    trainer.add_callback(progress)
    if stages:
        trainer.add_callback(curriculum.StageEnds(stages, progress, trainer, work / "curriculum_base.json"))
    if cfg.method.name == "adalora":
        trainer.add_callback(AdaLoraAllocator(model))
    if cfg.train.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    return trainer, progress


def _gather_trained(trainer: AnswerLossTrainer, model, cfg: TrainConfig, base_path: str, total: int,
                    dist: distributed.Dist):
    """The trained model, whole, on rank 0 (None on the other ranks; every rank must call this).

    One process or DDP: `model` itself (DDP keeps a full replica in every process). FSDP shards the parameters and
    DeepSpeed keeps its own copies (ZeRO-3: sharded; bf16: cast), so every rank joins in gathering the full state
    dict to rank 0 (accelerate's get_state_dict: FSDP's full state dict offloaded to rank 0's CPU, whatever
    fsdp_state_dict_type the checkpoints use; DeepSpeed ZeRO-3 needs stage3_gather_16bit_weights_on_model_save), and
    rank 0 loads it into a fresh base model with the method applied. Either way the model comes back on the CPU,
    where the merge, the after evaluation (training/evaluate.py builds its batches there) and the save run."""
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
        from . import fairness
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

