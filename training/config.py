"""The training config: one pydantic model, the single source of truth. Field docstrings are the `--help` text."""
from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from chatdata.config import DataCfg, DatasetSpec
from core.config import FieldProblems, Section
from core.errors import StackWarning
from evaluation.config import EvalCfg
from evaluation.fairness.config import FairnessCfg
from modeling.config import ModelCfg
from monitoring.config import DriftRefCfg
from tracking.config import TrackingCfg

METHODS = ("full", "freeze", "lora", "dora", "adalora", "ia3", "prefix", "prompt", "ptuning")
PROMPT_LEARNING = ("prefix", "prompt", "ptuning")




class MethodCfg(Section):
    name: Literal[METHODS] = "lora"
    """full (all weights) | freeze (top layers / named modules only) | lora | dora | adalora | ia3 | prefix | prompt
    | ptuning (peft methods)."""
    lora_r: int = Field(8, ge=1)
    """LoRA / DoRA rank (AdaLoRA: target average rank)."""
    lora_alpha: float = Field(16, gt=0)
    """LoRA scaling alpha; r..2r is the usual range."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of names (q_proj, v_proj, ...)."""
    lora_layers: int = Field(0, ge=0)
    """LoRA / DoRA / IA3: adapt only the top N decoder layers (0: all). Backpropagation then stops at the lowest
    adapted layer, so a step costs much less; enough for tasks that change the output format more than knowledge."""
    adalora_init_r: int = Field(12, ge=1)
    """AdaLoRA starting rank before pruning to lora_r."""
    freeze_trainable_layers: int = Field(2, ge=0)
    """freeze: number of top decoder layers left trainable."""
    freeze_trainable_modules: list[str] = []
    """freeze: extra parameter-name globs left trainable, e.g. ['model.norm.*', '*.mlp.*']."""
    num_virtual_tokens: int = Field(16, ge=1)
    """prefix / prompt / ptuning: number of virtual tokens."""


class TrainCfg(Section):
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch and process (packing puts them into as few rows as fit in max_seq_len)."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps; the effective batch is batch_size x grad_accum x the number of processes
    (torchrun / accelerate launch)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from epochs."""
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    """Fraction of steps with linear warm-up."""
    scheduler: Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup",
                       "polynomial", "inverse_sqrt"] = "cosine_with_min_lr"
    """Learning-rate schedule."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """cosine_with_min_lr: the floor as a fraction of the peak LR."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    optimizer: Literal["adamw", "sgd", "rmsprop", "adafactor"] = "adamw"
    """Optimizer."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm (0 disables)."""
    scale_lr: bool = False
    """Scale lr by sqrt(effective batch / scale_lr_base_batch) (the effective batch counts every process)."""
    scale_lr_base_batch: int = Field(8, ge=1)
    """The effective batch size that `lr` was tuned for."""
    packing: bool = True
    """Pack the micro-batch's examples into shared rows with a block-diagonal attention mask (no cross-example
    attention, positions reset per example), so no compute is spent on padding."""
    share_prefix: bool = True
    """Compute the token prefix that a micro-batch's examples share (a fixed system prompt and instruction) once per
    batch instead of once per example; every example attends to it. Exact: same keys, values and positions."""
    eval_steps: int = Field(0, ge=0)
    """Validation loss every N steps (0: at the end only, if final_validation)."""
    final_validation: bool = True
    """Compute the validation loss once more after the last step (the manifest's validation_loss)."""
    early_stopping_patience: int = Field(0, ge=0)
    """Stop after N evaluations without validation-loss improvement and keep the best (0: off; needs eval_steps)."""
    save_steps: int = Field(25, ge=1)
    """Checkpoint every N optimizer steps (for `--resume`)."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept."""
    logging_steps: int = Field(5, ge=1)
    """Log the training loss every N steps."""
    seed: int = 42
    """Seed for data order, splits, sampling and initialisation."""
    threads: int = Field(0, ge=0)
    """torch CPU threads per process (0: all cores, shared among the training processes of this machine)."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    """Autocast the forward and backward passes to bf16 / fp16 (weights stay in model.dtype); null: what the launcher
    says (`accelerate launch` with a config's mixed_precision), else no. bf16 on GPUs that have it; this CPU has no
    fast bf16. DeepSpeed configs with "auto" precision take it from here."""
    ddp_backend: Optional[Literal["nccl", "gloo", "mpi", "ccl"]] = None
    """Several processes (torchrun / accelerate launch): the torch.distributed backend; null: what the HF Trainer
    picks, nccl on CUDA GPUs and gloo on CPU. Ignored by a single process."""
    ddp_find_unused_parameters: Optional[bool] = False
    """Several processes with DDP: let DDP look for trainable parameters that got no gradient in a step (a graph walk
    per step, and a warning on every rank when there are none). Every method here gives all its trainable parameters
    a gradient in every step; DDP stops with an error if one does not. null: the Trainer's default (on)."""




class PreferenceCfg(Section):
    beta: float = Field(0.1, gt=0)
    """dpo / kto: how far the model may move from the reference (higher: less); orpo: the weight of the odds-ratio
    term (lambda). Also scales the implicit reward reported after training."""
    loss_type: Optional[str] = None
    """Loss variant; null: the recipe's default. dpo: sigmoid | hinge | ipo | robust | bco_pair | sppo_hard | aot |
    apo_zero | apo_down | sigmoid_norm | ... (TRL's DPO loss types); kto: kto | apo_zero_unpaired; orpo: none."""
    sft_weight: float = Field(0.0, ge=0)
    """dpo: weight of an added negative log-likelihood loss on the chosen answers (TRL's loss_type [<loss>, sft], as
    in RPO); 0: plain DPO. DPO alone lowers the chosen answers' likelihood too (it only widens the gap), which can
    wreck greedy answers that chosen and rejected share most tokens of; see docs/preference.md."""
    max_prompt_len: int = Field(320, ge=8)
    """Longest tokenized prompt (chat template applied); prompt + the longer answer is limited by data.max_seq_len.
    Longer rows are dropped (listed in the data report), or stop the run when data.overlong is error."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto: loss weight of desirable (label true) answers."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto: loss weight of undesirable (label false) answers."""
    precompute_ref: bool = False
    """dpo / kto with method full: compute the reference log-probabilities once before training, so no second copy
    of the model is kept (LoRA needs none: the reference is the model with the adapter disabled)."""
    generate: bool = True
    """Before/after: greedy answers to the held-out prompts, scored as rejected-like or not (the demo's headline
    figure); off: only the log-probability metrics."""




class StageCfg(Section):
    """One curriculum stage: which named datasets, mixed how, for how long."""
    name: str
    """Stage name (the manifest's per-stage metrics and the plots use it)."""
    mix: dict[str, float]
    """Named datasets (keys of curriculum.datasets) and their weights. mixing: proportions -> each dataset's share of
    the stage's rows (the shares sum to 1); mixing: upsample -> repeat factors (2.0: every row twice, 0.5: a seeded
    half)."""
    rows: int = Field(0, ge=0)
    """proportions: rows per stage epoch (0: as many as the named datasets hold together). upsample: not allowed (the
    weights decide)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the stage's mixed rows (each pass reshuffled; a fraction takes a seeded part of the last pass)."""
    max_steps: int = Field(0, ge=0)
    """Optimizer steps for this stage (0: from epochs); overrides epochs."""

    @model_validator(mode="after")
    def _weights(self):
        if not self.mix:
            raise ValueError(f"stage '{self.name}' names no dataset: mix needs at least one `name: weight`")
        bad = {k: v for k, v in self.mix.items() if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"stage '{self.name}': mix weights must be positive numbers, got "
                             + ", ".join(f"{k}: {v}" for k, v in bad.items()))
        return self


class CurriculumCfg(Section):
    """Continued pre-training and staged data mixing (training/sft/curriculum.py, docs/curriculum.md): the stages run in
    order in one training run, one optimizer and one learning-rate schedule over all of them (warm-up once at the
    start, decay across the stages); after each stage the domain validation set (data.validation) and the general
    held-out set (general_eval) are evaluated, so forgetting shows beside the domain gain."""
    datasets: dict[str, DatasetSpec] = {}
    """Named datasets the stages draw from, e.g. {cpt: {path: data/corpus/domain.jsonl, format: text}, general:
    {path: data/general/train.jsonl}, domain: {path: data/tickets/train.jsonl}}. format text: loss on every token
    (CPT); instruction / chat: loss on the answers. Their own `weight` is not used: stages say how much of each."""
    stages: list[StageCfg] = []
    """The stages, in order; empty: no curriculum (data.train is trained on, as usual)."""
    mixing: Literal["proportions", "upsample"] = "proportions"
    """How stage weights read: proportions (shares of the stage's rows, summing to 1) or upsample (repeat factors per
    dataset)."""
    general_eval: list[DatasetSpec] = Field(
        default_factory=lambda: [DatasetSpec(path="data/general/test.jsonl")])
    """General held-out data evaluated (loss and perplexity) before training and after every stage: the forgetting
    watch. Empty: only the domain validation set is watched."""

    @model_validator(mode="after")
    def _stages(self):
        if not self.stages:
            return self
        known = ", ".join(self.datasets) or "none"
        problems: list[tuple[tuple, str]] = []
        for name, spec in self.datasets.items():
            if spec.weight != 1.0:
                problems.append((("datasets", name, "weight"), "not used in a curriculum: set the weight in each "
                                 "stage's mix"))
        names = [s.name for s in self.stages]
        for i, st in enumerate(self.stages):
            where = f"stage '{st.name}'"
            if names.index(st.name) != i:
                problems.append((("stages", i, "name"), f"{where} is named twice; stage names must be unique"))
            for missing in [k for k in st.mix if k not in self.datasets]:
                problems.append((("stages", i, "mix", missing), f"{where} names dataset '{missing}', which "
                                 f"curriculum.datasets does not define (defined: {known})"))
            total = sum(st.mix.values())
            if self.mixing == "proportions" and abs(total - 1) > 1e-3:
                problems.append((("stages", i, "mix"), f"{where}: weights sum to {total:g}; with mixing: proportions "
                                 "they are shares of the stage and must sum to 1 (or set curriculum.mixing: upsample "
                                 "for repeat factors)"))
            if self.mixing == "upsample" and st.rows:
                problems.append((("stages", i, "rows"), f"{where}: rows applies to mixing: proportions; with "
                                 "upsample the weights decide"))
        if problems:
            raise FieldProblems(problems)
        return self


class OutputCfg(Section):
    dir: str = "artifacts/train"
    """Root folder of training artifacts (`<dir>/<run-id>/`, `<dir>/latest`)."""
    run_id: Optional[str] = None
    """Run folder name; default: timestamp + random suffix."""
    save_merged: bool = True
    """Save the adapter merged into a full model (what compression and serving consume)."""
    keep_checkpoints: bool = False
    """Keep the resume checkpoints after a successful run."""


class TrainConfig(Section):
    """Fine-tuning run: base model, data, method, hyperparameters, evaluation, outputs."""
    recipe: Literal["sft", "dpo", "orpo", "kto"] = "sft"
    """Objective: sft (supervised, answer-only loss) | dpo | orpo | kto (preference tuning from chosen / rejected
    pairs, or kto's labelled answers; see the preference section and docs/preference.md)."""
    model: ModelCfg = ModelCfg()
    """The base model."""
    data: DataCfg = DataCfg()
    """Datasets and the data pipeline."""
    method: MethodCfg = MethodCfg()
    """Which parameters are trained."""
    train: TrainCfg = TrainCfg()
    """Optimisation."""
    eval: EvalCfg = EvalCfg()
    """Before/after evaluation on the test split."""
    preference: PreferenceCfg = PreferenceCfg()
    """Preference tuning (recipe dpo / orpo / kto)."""
    drift: DriftRefCfg = DriftRefCfg()
    """The drift reference profile for live monitoring."""
    fairness: FairnessCfg = FairnessCfg()
    """Bias and fairness checks after training (off by default)."""
    curriculum: CurriculumCfg = CurriculumCfg()
    """Continued pre-training and staged data mixing (off unless stages are given)."""
    output: OutputCfg = OutputCfg()
    """Where the artifact goes."""
    tracking: TrackingCfg = TrackingCfg()
    """Experiment tracking (MLflow): the finished run logged with its config, metrics and reports."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.train.early_stopping_patience and not self.train.eval_steps:
            raise ValueError("train.early_stopping_patience needs train.eval_steps > 0")
        if self.train.early_stopping_patience and self.train.save_steps % self.train.eval_steps:
            raise ValueError(f"train.early_stopping_patience keeps the best checkpoint, so train.save_steps "
                             f"({self.train.save_steps}) must be a multiple of train.eval_steps "
                             f"({self.train.eval_steps})")
        if self.method.lora_layers and self.method.name not in ("lora", "dora", "ia3"):
            raise ValueError(f"method.lora_layers applies to lora, dora and ia3, not {self.method.name}")
        if self.method.name == "adalora" and self.method.adalora_init_r < self.method.lora_r:
            raise ValueError("method.adalora_init_r must be >= method.lora_r")
        if self.curriculum.stages:
            self._curriculum_consistent()
        return self

    def _curriculum_consistent(self) -> None:
        """A curriculum names its training data per stage and its length per stage; what conflicts is refused."""
        if self.recipe != "sft":
            raise ValueError(f"curriculum.stages work with recipe sft (CPT text and instruction data), not "
                             f"{self.recipe}")
        if self.data.train and "train" in self.data.model_fields_set:
            raise ValueError("data.train and curriculum.stages are both set: a curriculum names its training data "
                             "in each stage's mix (curriculum.datasets); remove data.train")
        if not self.data.validation:
            raise ValueError("curriculum.stages need data.validation: the domain held-out set evaluated after every "
                             "stage")
        if self.train.max_steps > 0:
            raise ValueError("train.max_steps does not apply to a curriculum: set curriculum.stages[].max_steps or "
                             "epochs per stage")
        if self.train.early_stopping_patience:
            raise ValueError("train.early_stopping_patience would stop a curriculum part-way through a stage; "
                             "set it to 0")
        object.__setattr__(self.data, "train", [])  # the stages' data is the training data

    def effective_lr(self, world_size: int = 1) -> float:
        t = self.train
        if not t.scale_lr:
            return t.lr
        return t.lr * math.sqrt(t.batch_size * t.grad_accum * world_size / t.scale_lr_base_batch)

    def poor_settings(self) -> list[str]:
        """Settings known to train badly: warned about, not refused."""
        m, t, out = self.method, self.train, []
        lr = self.effective_lr()
        if m.name in ("full", "freeze") and lr > 1e-4:
            out.append(f"{m.name} fine-tuning with lr={lr:g} > 1e-4 often destroys the base model; try 1e-5..5e-5")
        if m.name in ("lora", "dora", "adalora") and not (0.5 * m.lora_r <= m.lora_alpha <= 4 * m.lora_r):
            out.append(f"lora_alpha={m.lora_alpha:g} is far from r..2r (r={m.lora_r}); the update is scaled by "
                       f"alpha/r={m.lora_alpha / m.lora_r:.2f}")
        if m.name in ("lora", "dora", "adalora", "ia3") and lr > 5e-3:
            out.append(f"lr={lr:g} is very high for {m.name}; 1e-4..1e-3 is usual")
        if t.warmup_ratio > 0.3:
            out.append(f"warmup_ratio={t.warmup_ratio} spends over 30% of training warming up")
        if self.recipe == "dpo" and lr > 5e-4 and not self.preference.sft_weight:
            out.append(f"dpo with lr={lr:g} and no preference.sft_weight: DPO lowers the chosen answers' likelihood "
                       "too; measured on the demo, 40 steps at lr 1e-3 took valid JSON from 1.0 to 0.36. Try lr 1e-4..3e-4 "
                       "and preference.sft_weight: 1.0")
        if t.optimizer == "sgd" and lr < 1e-3:
            out.append(f"SGD with lr={lr:g} barely moves a transformer; SGD usually needs 1e-2 or more")
        return out


def warn_poor_settings(cfg: TrainConfig) -> list[str]:
    msgs = cfg.poor_settings()
    for msg in msgs:
        warnings.warn(msg, StackWarning, stacklevel=2)
    return msgs
