"""The `llmstack tune` config (configs/tune.yaml): the search space over dotted TrainConfig fields, sampler, objective,
budget, pruning and output; and its checks — every problem in the space at once, with the tune file's line, before
anything is written. The search itself is training/tune/search.py."""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from core.config import Section, apply_overrides, parse_override, read_yaml, validate
from core.errors import ConfigError, StackError, collect
from core.log import log
from tracking.config import TrackingCfg
from training.config import TrainConfig

DEFAULT_TUNE_CONFIG = "configs/tune.yaml"
OBJECTIVE_ROOTS = ("validation_loss", "after", "training")
NO_CHECKPOINTS = 10 ** 9  # train.save_steps for trials: no resume checkpoints (a trial is rerun, not resumed)


# ---------------------------------------------------------------- config
class ParamSpec(Section):
    type: Literal["float", "int", "categorical"]
    """float / int: a range low..high (log: sampled on a log scale; step: a grid of low, low+step, ... high);
    categorical: one of `choices`."""
    low: Optional[float] = None
    """Lower bound (inclusive)."""
    high: Optional[float] = None
    """Upper bound (inclusive)."""
    log: bool = False
    """Sample on a log scale (needs low > 0; not with step)."""
    step: Optional[float] = None
    """Discretisation step; the grid sampler needs it for float ranges (int ranges default to 1)."""
    choices: Optional[list[Union[bool, int, float, str, None]]] = None
    """categorical: the values to choose from."""


class SamplerCfg(Section):
    name: Literal["grid", "random", "tpe"] = "tpe"
    """grid: every combination of the space (float ranges need a step), in a seeded random order; random: independent
    uniform / log-uniform draws; tpe: Optuna's Tree-structured Parzen Estimator (random for the first
    n_startup_trials, then it models good vs poor trials)."""
    seed: int = 42
    """Sampler seed: the same seed gives the same trials."""
    n_startup_trials: int = Field(4, ge=0)
    """tpe: random trials before the model takes over."""


class ObjectiveCfg(Section):
    metric: str = "validation_loss"
    """What a trial is scored by: validation_loss (the trial's final validation loss), after.<metric> (the
    after-training evaluation on the test split: after.exact_match, after.json_valid, after.loss,
    after.field_accuracy.category, after.rougeL, ...) or training.<key> (the manifest's training section)."""
    direction: Literal["auto", "minimize", "maximize"] = "auto"
    """auto: minimize losses and perplexities, maximize everything else."""


class BudgetCfg(Section):
    n_trials: Optional[int] = Field(None, ge=1)
    """Trials to run (finished ones of an earlier, interrupted run of this search count). null: until timeout_s
    (grid: the whole grid)."""
    timeout_s: Optional[float] = Field(None, gt=0)
    """Wall-time budget in seconds: no trial starts after it, and the running trial is stopped at it (recorded as
    pruned, reason 'time budget'). null: no time limit."""


class PruningCfg(Section):
    pruner: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = "median"
    """median: stop a trial whose validation loss at a step is worse than the median of earlier trials at the same
    step; percentile: worse than the given percentile; successive_halving / hyperband: asynchronous successive halving
    over the eval steps; none: never prune."""
    eval_steps: int = Field(0, ge=0)
    """Validation loss every N optimizer steps during each trial (train.eval_steps; what the pruner compares).
    0: the base config's train.eval_steps (if that is 0 too, nothing is reported and nothing is pruned)."""
    n_startup_trials: int = Field(2, ge=0)
    """median / percentile: trials that always run to the end before pruning starts."""
    n_warmup_steps: int = Field(0, ge=0)
    """median / percentile: steps of a trial before it can be pruned."""
    percentile: float = Field(25.0, gt=0, lt=100)
    """percentile: keep trials in the best `percentile` percent at each step."""
    min_resource: Optional[int] = Field(None, ge=1)
    """successive_halving / hyperband: steps before the first comparison; null: Optuna's estimate."""
    reduction_factor: int = Field(3, ge=2)
    """successive_halving / hyperband: keep the best 1/reduction_factor at each rung."""


class TrialsCfg(Section):
    eval_before: bool = False
    """Evaluate the base model before each trial (the same for every trial: off saves time)."""
    eval_after: Optional[bool] = None
    """The after-training evaluation (generations on the test split) in each trial; null: only when the objective
    is an after.* metric."""
    drift_reference: bool = False
    """Build the drift reference profile in each trial's artifact."""
    keep_merged: Literal["best", "all", "none"] = "best"
    """Merged models kept in the trial artifacts: the best trial's only, every trial's, or none (adapters, configs
    and manifests are always kept)."""


class TuneOutputCfg(Section):
    dir: str = "artifacts/tune"
    """Root folder of searches (`<dir>/<run-id>/`, `<dir>/latest`)."""
    run_id: Optional[str] = None
    """Search folder name; default: timestamp + random suffix."""


class TuneConfig(Section):
    """Hyperparameter search: a base train config, the space, the sampler, the objective, the budget, pruning."""
    base: str = "configs/train.yaml"
    """The train config every trial starts from (a path relative to the working directory, or to this file)."""
    overrides: list[str] = []
    """section.key=value overrides of the base config for every trial, e.g. [train.max_steps=20]."""
    space: dict[str, ParamSpec]
    """Search space: a dotted TrainConfig field name (train.lr, method.lora_r, method.lora_alpha,
    train.warmup_ratio, train.epochs, ...) -> {type: float|int|categorical, low, high, log, step, choices}."""
    enqueue: list[dict[str, Any]] = []
    """Parameter sets to try first, in order (e.g. the base config's own values), before the sampler's picks."""
    sampler: SamplerCfg = SamplerCfg()
    """How trials are picked."""
    objective: ObjectiveCfg = ObjectiveCfg()
    """What a trial is scored by."""
    budget: BudgetCfg = BudgetCfg()
    """When the search stops."""
    pruning: PruningCfg = PruningCfg()
    """Early stopping of poor trials."""
    trials: TrialsCfg = TrialsCfg()
    """What each trial computes and keeps."""
    output: TuneOutputCfg = TuneOutputCfg()
    tracking: TrackingCfg = TrackingCfg()
    """Experiment tracking (MLflow): the study logged with the best trial; each trial's training run is logged by
    the base config's own tracking section."""
    """Where the search goes."""


def direction(cfg: TuneConfig) -> str:
    if cfg.objective.direction != "auto":
        return cfg.objective.direction
    leaf = cfg.objective.metric.rsplit(".", 1)[-1]
    return "minimize" if "loss" in leaf or "perplexity" in leaf else "maximize"


# ---------------------------------------------------------------- checks
def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        tp = field.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out += _leaf_fields(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _set(data: dict, dotted: str, value) -> dict:
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


def grid_values(name: str, spec: ParamSpec) -> list:
    if spec.type == "categorical":
        return list(spec.choices)
    if spec.type == "int":
        return list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))
    n = int(math.floor((spec.high - spec.low) / spec.step + 1e-9))
    return [round(spec.low + i * spec.step, 12) for i in range(n + 1)]


def check(cfg: TuneConfig, base: TrainConfig, file, lines: dict) -> None:
    """Every problem of the search space, objective and budget, raised once (ConfigError / ManyErrors) with the tune
    config's file, line and field."""
    errors: list[StackError] = []

    def err(msg: str, *key, hint: str | None = None):
        line = next((lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in lines), None)
        errors.append(ConfigError(msg, file=file, line=line, field=".".join(str(k) for k in key), hint=hint))

    leaves = _leaf_fields(TrainConfig)
    base_data = base.model_dump(mode="json")
    if not cfg.space:
        err("the search space is empty", "space", hint="name at least one TrainConfig field, e.g. train.lr")
    for name, spec in cfg.space.items():
        key = ("space", name)
        if name not in leaves:
            close = difflib.get_close_matches(name, leaves, n=1)
            err(f"unknown parameter '{name}': not a TrainConfig field", *key,
                hint=(f"did you mean {close[0]}? " if close else "") + "`llmstack train --help` lists every field")
            continue
        if spec.type == "categorical":
            if not spec.choices:
                err("categorical parameter needs a non-empty `choices` list", *key, "choices")
                continue
            if spec.low is not None or spec.high is not None or spec.step is not None or spec.log:
                err("categorical parameter takes `choices` only (no low/high/step/log)", *key)
            probe = list(spec.choices)
        else:
            if spec.choices is not None:
                err(f"{spec.type} parameter takes low/high, not choices (use type: categorical)", *key, "choices")
            if spec.low is None or spec.high is None:
                err(f"{spec.type} parameter needs both low and high", *key)
                continue
            if spec.low >= spec.high:
                err(f"low ({spec.low:g}) must be below high ({spec.high:g})", *key, "low")
                continue
            if spec.log and spec.low <= 0:
                err(f"log scale needs low > 0 (got {spec.low:g})", *key, "low")
            if spec.log and spec.step is not None:
                err("log and step cannot be combined", *key, "step")
            if spec.step is not None and spec.step <= 0:
                err(f"step must be > 0 (got {spec.step:g})", *key, "step")
            if spec.type == "int" and any(v is not None and float(v) != int(v)
                                          for v in (spec.low, spec.high, spec.step)):
                err("int parameter needs integer low, high and step", *key)
            if cfg.sampler.name == "grid" and spec.type == "float" and spec.step is None:
                err("the grid sampler needs a `step` for a float range (or use type: categorical with choices)",
                    *key, "step")
            probe = [int(spec.low), int(spec.high)] if spec.type == "int" else [spec.low, spec.high]
        for value in probe:  # each bound / choice must make a valid train config
            try:
                validate(TrainConfig, _set(json.loads(json.dumps(base_data)), name, value))
            except StackError as exc:
                first = exc.errors[0] if hasattr(exc, "errors") else exc
                err(f"{value!r} is not a valid {name}: {first.message}", *key)
    for i, row in enumerate(cfg.enqueue):
        unknown = sorted(set(row) - set(cfg.space))
        if unknown:
            err(f"enqueued parameters {unknown} are not in the search space", "enqueue", i)
    root = cfg.objective.metric.split(".")[0]
    if root not in OBJECTIVE_ROOTS or (root == "validation_loss") != (cfg.objective.metric == "validation_loss") \
            or (root != "validation_loss" and "." not in cfg.objective.metric):
        err(f"unknown objective '{cfg.objective.metric}'", "objective", "metric",
            hint="use validation_loss, after.<metric> (e.g. after.exact_match) or training.<key>")
    if cfg.budget.n_trials is None and cfg.budget.timeout_s is None and cfg.sampler.name != "grid":
        err("neither budget.n_trials nor budget.timeout_s is set: the search would never stop", "budget",
            hint="set budget.n_trials (e.g. 8) and/or budget.timeout_s (e.g. 900)")
    collect(errors, "tune config problems")
    if cfg.pruning.pruner != "none" and not (cfg.pruning.eval_steps or base.train.eval_steps):
        log.info("note: pruning.eval_steps and the base train.eval_steps are 0: nothing is reported during a trial, "
                 "so nothing is pruned")


def _base_path(cfg: TuneConfig, file) -> Path:
    p = Path(cfg.base)
    if not p.is_file() and file is not None and (Path(file).parent / p).is_file():
        p = Path(file).parent / p
    return p


def load_tune(path: str | Path, overrides: list[str] = ()) -> tuple[TuneConfig, TrainConfig]:
    """The validated tune config and its base train config (base overrides applied); every problem raised at once,
    before anything is written."""
    from core.config import load

    data, lines = read_yaml(path)
    data = apply_overrides(data, list(overrides))
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    cfg = validate(TuneConfig, data, file=path, lines=lines, overridden=overridden)
    base_file = _base_path(cfg, path)
    if not base_file.is_file():
        raise ConfigError(f"base train config {cfg.base} not found", file=path, line=lines.get(("base",)),
                          field="base", hint="name an existing train config, e.g. configs/train.yaml")
    base = load(TrainConfig, base_file, cfg.overrides)
    cfg.base = str(base_file)
    check(cfg, base, path, lines)
    return cfg, base
