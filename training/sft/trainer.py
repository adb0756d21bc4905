"""The SFT trainer: HF Trainer with the answer-only loss (AnswerLossTrainer), its TrainingArguments, the progress
and AdaLoRA callbacks, and `build_trainer`, which training/sft/recipe.py (the recipe) and training/tune/search.py call.

Imports torch and transformers: load it when training, not to build the CLI parser."""
from __future__ import annotations

import contextlib
import os
import time
import unittest.mock
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from core.log import log
from modeling.collate import Collator, answer_loss
from training import distributed
from training.config import TrainConfig
from training.sft import curriculum

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
        self.sequential = sequential  # a curriculum: rows in their laid-out order (training/sft/curriculum.py)
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
    """The collator's features; each carries its example's loss "weight" only when some weight differs from 1 (so an
    unweighted run batches exactly as without weights)."""
    weights = [float(getattr(e, "weight", 1.0)) for e in rows]
    if all(w == 1.0 for w in weights):
        return [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]
    return [{"input_ids": e.input_ids, "labels": e.labels, "weight": w} for e, w in zip(rows, weights)]


def build_trainer(cfg: TrainConfig, model, tokenizer, prepared, work: Path, *, pack: bool, fast: bool,
                  dist: distributed.Dist | None = None, stages: list | None = None):
    """The HF Trainer with our collator, answer-only loss, progress bar and method-specific callbacks.

    Several processes: the Trainer's dataloader (accelerate) gives each rank every world_size-th micro-batch of the
    same seeded shuffle, so at batch B per process a step sees the examples one process sees at batch world_size x
    B; the collator packs (and shares the prefix of) each rank's micro-batch, which is exact per example.

    stages (a curriculum, training/sft/curriculum.py): the rows are read in their laid-out order for exactly the stages'
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
