"""The preference-tuning recipe (DPO, ORPO, KTO), top to bottom: load config -> read and validate preference rows ->
load the model (a base model or a training artifact's merged SFT model) -> evaluate before -> TRL trainer -> evaluate
after -> save adapter + merged model -> manifest (same layout as SFT, so compress and serve take it unchanged).

Rows (read and validated by training/preference/data.py): {prompt | messages | instruction (+ input), chosen,
rejected} for every recipe; kto also takes unpaired rows {prompt ..., completion, label: bool} (pairs become one
desirable and one undesirable row). With LoRA (and the other
mergeable peft methods) the reference model is the same model with its adapter disabled; with full / freeze it is a
second copy (or, with preference.precompute_ref, log-probabilities computed once before training).
The held-out metrics (rejected-like rate, format errors, preference accuracy, implicit reward, per-prompt
change) are in training/preference/metrics.py.
"""
from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

import torch

from core import artifacts
from core.config import config_hash
from core.errors import ConfigError
from core.log import log
from modeling.model import load_model, load_tokenizer
from tracking import runs as tracking_runs
from training import methods, outputs
from training.config import TrainConfig, warn_poor_settings
from training.preference.data import prepare, trl_rows
from training.preference.metrics import METRIC_DEFINITIONS, evaluate, paired_change, table
from training.sft.trainer import OPTIMIZERS

RECIPES = ("dpo", "orpo", "kto")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")

# ---------------------------------------------------------------- model and trainer
def _trl_args(cfg: TrainConfig, work: Path, total: int):
    """The TRL config for the recipe, from our train / preference sections."""
    t, p, recipe = cfg.train, cfg.preference, cfg.recipe
    sched_kwargs = {"min_lr_rate": t.min_lr_ratio} if t.scheduler == "cosine_with_min_lr" else {}
    common = dict(
        output_dir=str(work / "checkpoints"), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=cfg.effective_lr(), num_train_epochs=t.epochs, max_steps=t.max_steps,
        warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.scheduler, lr_scheduler_kwargs=sched_kwargs,
        weight_decay=t.weight_decay, optim=OPTIMIZERS[t.optimizer], max_grad_norm=t.max_grad_norm or 1e9,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed, use_cpu=not torch.cuda.is_available(),
        report_to=[], disable_tqdm=True, bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16",
        gradient_checkpointing=False, dataloader_num_workers=0, eval_strategy="no", max_length=cfg.data.max_seq_len,
        beta=p.beta)
    if recipe == "dpo":
        from trl import DPOConfig
        losses = {"loss_type": [p.loss_type or "sigmoid", "sft"], "loss_weights": [1.0, p.sft_weight]} \
            if p.sft_weight else {"loss_type": [p.loss_type or "sigmoid"]}
        return DPOConfig(**common, **losses, precompute_ref_log_probs=p.precompute_ref)
    if recipe == "kto":
        from trl import KTOConfig
        return KTOConfig(**common, loss_type=p.loss_type or "kto", desirable_weight=p.desirable_weight,
                         undesirable_weight=p.undesirable_weight, precompute_ref_log_probs=p.precompute_ref)
    from trl.experimental.orpo import ORPOConfig
    return ORPOConfig(**common)


def _check(cfg: TrainConfig) -> None:
    p, recipe = cfg.preference, cfg.recipe
    if recipe not in RECIPES:
        raise ConfigError(f"training/preference/recipe.py runs {', '.join(RECIPES)}, not {recipe}", field="recipe")
    allowed = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES, "orpo": ()}[recipe]
    if p.loss_type is not None and p.loss_type not in allowed:
        raise ConfigError(f"{recipe} has no loss_type {p.loss_type!r}" + (f"; use one of {', '.join(allowed)}"
                          if allowed else " setting (leave it null)"), field="preference.loss_type")
    if p.sft_weight and recipe != "dpo":
        raise ConfigError(f"preference.sft_weight adds TRL's sft loss to dpo; {recipe} does not take it"
                          + (" (orpo has its own NLL term)" if recipe == "orpo" else ""), field="preference.sft_weight")
    if not methods.mergeable(cfg.method.name) or cfg.method.name == "adalora":
        raise ConfigError(f"preference tuning supports full, freeze, lora, dora and ia3, not {cfg.method.name}",
                          field="method.name")


def build_trainer(cfg: TrainConfig, model, tokenizer, prepared, work: Path, total: int, base_path: str):
    """The TRL trainer for the recipe. Peft methods: the adapter config goes to TRL, which wraps the model and uses
    it with the adapter disabled as the reference (no second copy). full / freeze: the method is applied here and a
    second copy of the starting model is the reference (dpo / kto; orpo needs none)."""
    from datasets import Dataset

    args = _trl_args(cfg, work, total)
    train = Dataset.from_list(trl_rows(prepared.train, cfg.recipe))
    val = Dataset.from_list(trl_rows(prepared.validation, cfg.recipe)) if prepared.validation else None
    kwargs = dict(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    peft_method = cfg.method.name not in ("full", "freeze")
    if peft_method:
        kwargs["peft_config"] = methods.peft_config(cfg.method, total, model)
    else:
        kwargs["model"] = methods.apply(model, cfg.method, total)
    if cfg.recipe == "dpo":
        from trl import DPOTrainer as cls
    elif cfg.recipe == "kto":
        from trl import KTOTrainer as cls
    else:
        from trl.experimental.orpo import ORPOTrainer as cls
    if cfg.recipe != "orpo" and not peft_method and not cfg.preference.precompute_ref:
        kwargs["ref_model"] = load_model(base_path, cfg.model.dtype, cfg.model.attn_implementation,
                                         cfg.model.trust_remote_code).eval()
    trainer = cls(**kwargs)
    from transformers import PrinterCallback
    trainer.remove_callback(PrinterCallback)
    return trainer


class _Progress:
    """A TrainerCallback (built lazily: transformers loads inside run) with a tqdm bar and the step time."""

    @staticmethod
    def make():
        from tqdm import tqdm
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            def __init__(self):
                self.bar, self.step_time, self._t, self.last = None, 0.0, None, {}

            def on_train_begin(self, args, state, control, **kw):
                self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.step_time += time.perf_counter() - self._t
                self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.last = logs
                    post = {"loss": f"{logs['loss']:.4f}"}
                    for k in ("rewards/accuracies", "rewards/margins"):
                        if k in logs:
                            post[k.split("/")[1][:6]] = f"{logs[k]:.3f}"
                    self.bar.set_postfix(post, refresh=False)

            def on_train_end(self, args, state, control, **kw):
                if self.bar is not None:
                    self.bar.close()

        return Progress()


# ---------------------------------------------------------------- the recipe
def run(cfg: TrainConfig, *, force: bool = False) -> Path:
    """Preference-tune and write the artifact; return its folder."""
    _check(cfg)
    root = Path(cfg.output.dir)
    artifacts.clean_stale(root)
    warn_poor_settings(cfg)
    torch.set_num_threads(cfg.train.threads or max(1, os.cpu_count() or 1))
    torch.manual_seed(cfg.train.seed)
    phase, started_at = artifacts.Phases(), artifacts.now()

    # ---- data
    base_path, parent = outputs.resolve_base(cfg)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    prepared = prepare(cfg, tokenizer)
    fingerprint = outputs.fingerprint(cfg, prepared, base_path)
    if not force and (built := artifacts.find_built(root, fingerprint)):
        return outputs.reuse_built(root, built, table)
    run_id, work = outputs.new_work(root, cfg)
    try:
        return _train(cfg, root, work, run_id, base_path, parent, tokenizer, prepared, fingerprint, phase,
                      started_at)
    finally:
        if not cfg.output.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)


def _train(cfg, root, work, run_id, base_path, parent, tokenizer, prepared, fingerprint, phase, started_at) -> Path:
    phase("data")
    log.info(f"run {run_id} ({cfg.recipe}): {len(prepared.train)} train / {len(prepared.validation)} validation / "
             f"{len(prepared.test)} test rows; {len(prepared.report['drops'])} rows dropped (see data_report.md)")

    # ---- model, evaluation before (its log-probabilities are the reference for the reward margin)
    model = load_model(base_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    before, before_preds, ref_logps = evaluate(model, tokenizer, prepared.test, cfg, label="before",
                                               generate=cfg.eval.before)
    if not cfg.eval.before:
        before, before_preds = None, []
    phase("load_and_eval_before")

    # ---- train
    model, train_stats, val, history = _fit(cfg, model, tokenizer, prepared, work, base_path, phase)

    # ---- evaluation after, merge (the adapter is saved first: merging folds it into the weights)
    method = cfg.method.name
    adapter_dir = work / "adapter" if method not in ("full", "freeze") else None
    if adapter_dir:
        model.save_pretrained(adapter_dir)
    merged = methods.merged(model, method)
    after, after_preds = None, []
    if cfg.eval.after:
        after, after_preds, _ = evaluate(merged, tokenizer, prepared.test, cfg, ref=ref_logps, label="after")
        if before_preds and after_preds:
            after.update(paired_change(before_preds, after_preds))
    train_stats["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    phase("merge_and_eval_after")

    # ---- artifact (same layout and manifest as SFT)
    final, table_md = _save(cfg, root, run_id, tokenizer, prepared, {"merged": merged, "adapter_dir": adapter_dir,
                            "method": method}, history, {"before": before_preds, "after": after_preds},
                            {"before": before, "after": after, "validation_loss": val.get("eval_loss"),
                             "definitions": METRIC_DEFINITIONS}, train_stats,
                            outputs.manifest_header(cfg, run_id, fingerprint, base_path, parent), phase, started_at)
    n = (after or before or {}).get("n") or (after or before or {}).get("pairs", 0)
    print(f"\n{cfg.recipe.upper()} before/after on the held-out preference rows ({n}):\n")
    print(table_md)
    print(f"\nartifact: {final}  (latest: {root / 'latest'})")
    print(phase.summary())
    return final


def _fit(cfg: TrainConfig, model, tokenizer, prepared, work: Path, base_path: str, phase) -> tuple:
    """Train with TRL's trainer for the recipe, validate; the model back on the CPU, the training stats, the
    validation metrics and the log history."""
    t = cfg.train
    n_train = len(prepared.train) * (2 if cfg.recipe == "kto" else 1)
    per_epoch = -(-n_train // (t.batch_size * t.grad_accum))
    total = t.max_steps if t.max_steps > 0 else int(per_epoch * t.epochs + 0.999)
    trainer = build_trainer(cfg, model, tokenizer, prepared, work, total, base_path)
    model = trainer.model
    params = methods.count_parameters(model)
    log.info(f"{cfg.recipe} with {cfg.method.name}: {params['trainable']:,} trainable of {params['total']:,} "
             f"parameters, {total} steps, lr {cfg.effective_lr():g}, beta {cfg.preference.beta:g}")
    progress = _Progress.make()
    trainer.add_callback(progress)
    trainer.train()
    phase("train")
    val = trainer.evaluate() if prepared.validation and t.final_validation else {}
    phase("validation")
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "loss" in h), {})
    tokens = sum(len(r.prompt_ids) * 2 + len(r.chosen_ids) + len(r.rejected_ids) for r in prepared.train)
    tokens = int(tokens * trainer.state.global_step * t.batch_size * t.grad_accum / max(n_train, 1))
    train_stats = {
        "recipe": cfg.recipe, "steps": trainer.state.global_step, "tokens": tokens,
        "tokens_per_s": round(tokens / max(progress.step_time, 1e-9), 1), "step_seconds": round(progress.step_time, 1),
        "final_train_loss": last.get("loss"), "final_logs": {k: v for k, v in last.items() if "/" in k},
        "validation_loss": val.get("eval_loss"), "parameters": params, "effective_lr": cfg.effective_lr(),
        "effective_batch": t.batch_size * t.grad_accum, "beta": cfg.preference.beta,
        "loss_type": cfg.preference.loss_type or {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo"}[cfg.recipe],
        "sft_weight": cfg.preference.sft_weight,
        "reference": ("the model with its adapter disabled" if cfg.method.name not in ("full", "freeze") else
                      "none (orpo)" if cfg.recipe == "orpo" else "precomputed log-probabilities"
                      if cfg.preference.precompute_ref else "a frozen copy of the starting model"),
    }
    model = model.to("cpu")
    return model, train_stats, val, history


def _save(cfg: TrainConfig, root: Path, run_id: str, tokenizer, prepared, models: dict, history: list[dict],
          predictions: dict, metrics: dict, train_stats: dict, header: dict, phase, started_at: str) -> tuple:
    """The artifact, written atomically with the same layout and manifest as SFT; (its folder, the metrics table)."""
    with artifacts.atomic_dir(root, run_id) as out:
        written = outputs.write_common(out, cfg, tokenizer, prepared, models, history, predictions)
        table_md = table(metrics["before"], metrics["after"])
        manifest = {
            **header, "recipe": cfg.recipe, "datasets": prepared.report["sources"],
            "config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg, {"output.run_id"}),
            "metrics": metrics, "metrics_table": table_md, "training": train_stats, "outputs": written,
            "drift_reference": None, "packages": artifacts.package_versions(), "started_at": started_at,
            "finished_at": artifacts.now(), "wall_seconds": round(time.time() - phase.start, 1),
        }
        phase("save")
        manifest["timings"] = phase.timings
        outputs.finish_artifact(out, manifest, table_md)
    artifacts.set_latest(root, run_id)
    tracking_runs.record(root / run_id, cfg.tracking, history)
    return root / run_id, table_md
