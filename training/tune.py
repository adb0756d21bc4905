"""Hyperparameter search over any TrainConfig field (Optuna): grid, random or TPE sampling, pruning of poor trials
from the validation loss reported at eval steps, bounded by a trial count and/or wall time.

Flow, top to bottom: load the tune config and the base train config -> check the search space (every problem at
once, before anything is written) -> create or reopen the Optuna study (SQLite, `<output.dir>/<run-id>/study.db`,
so an interrupted search resumes) -> each trial: suggest values, train in-process with training.sft.run (trial
artifacts under `trials/`), report the validation loss at eval steps from a TrainerCallback and stop the trial when
the pruner says so -> after every trial: trials.md / .json / .csv, tune.png, best.yaml, manifest.json.

This module stays light at import time (the CLI imports it to build its parser); optuna, torch and the recipe load
when a search runs.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import gc
import io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field

from llmstack import artifacts
from llmstack.config import Section, apply_overrides, describe, dump_yaml, parse_override, read_yaml, validate
from llmstack.errors import ConfigError, StackError, collect
from llmstack.log import log

from .config import TrainConfig

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
    from llmstack.config import load

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


# ---------------------------------------------------------------- trials
def _suggest(trial, name: str, spec: ParamSpec):
    if spec.type == "categorical":
        return trial.suggest_categorical(name, list(spec.choices))
    if spec.type == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


def trial_config(cfg: TuneConfig, base: TrainConfig, params: dict, run_id: str, trials_dir: Path) -> TrainConfig:
    """The base config with the trial's parameters, writing under the search's trials/ folder."""
    data = base.model_dump(mode="json")
    for name, value in params.items():
        _set(data, name, value)
    t = cfg.trials
    data["eval"]["before"] = t.eval_before
    data["eval"]["after"] = t.eval_after if t.eval_after is not None else cfg.objective.metric.startswith("after.")
    data["drift"]["enabled"] = t.drift_reference
    data["output"].update(dir=str(trials_dir), run_id=run_id, save_merged=t.keep_merged != "none",
                          keep_checkpoints=False)
    tr = data["train"]
    if cfg.pruning.eval_steps:
        tr["eval_steps"] = cfg.pruning.eval_steps
    if cfg.objective.metric == "validation_loss":
        tr["final_validation"] = True
    if not tr["early_stopping_patience"]:
        tr["save_steps"] = NO_CHECKPOINTS
    return validate(TrainConfig, data, file=f"trial {run_id}")


def best_config(cfg: TuneConfig, base: TrainConfig, params: dict) -> TrainConfig:
    data = base.model_dump(mode="json")
    for name, value in params.items():
        _set(data, name, value)
    data["output"]["run_id"] = None
    return validate(TrainConfig, data)


def _metric(manifest: dict, metric: str):
    node: Any = manifest["metrics"] if metric.split(".")[0] != "training" else manifest
    if metric == "validation_loss":
        return node.get("validation_loss")
    for k in metric.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _reporter(trial, sign: float, deadline: float | None):
    """A TrainerCallback: report the validation loss (sign-adjusted: the pruner assumes the study's direction) at
    every evaluation and stop the trial when the pruner says so, or when the time budget is spent."""
    import optuna
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self):
            self.reported: set[int] = set()

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            step = state.global_step
            if loss is None or step in self.reported or not math.isfinite(loss):
                return
            self.reported.add(step)
            trial.report(sign * loss, step)
            if step < state.max_steps and trial.should_prune():
                trial.set_user_attr("stopped", f"pruned at step {step} (validation loss {loss:.4f})")
                raise optuna.TrialPruned(f"pruned at step {step}")

        def on_step_end(self, args, state, control, **kw):
            if deadline is not None and time.time() > deadline and state.global_step < state.max_steps:
                trial.set_user_attr("stopped", f"time budget (step {state.global_step} of {state.max_steps})")
                raise optuna.TrialPruned("time budget spent")

    return Reporter()


@contextlib.contextmanager
def _with_callback(callback):
    """training.sft builds its Trainer in build_trainer; add our callback to it for the duration (no change to the
    recipe's signature)."""
    from . import sft

    build = sft.build_trainer

    def patched(*args, **kwargs):
        trainer, progress = build(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer, progress

    sft.build_trainer = patched
    try:
        yield
    finally:
        sft.build_trainer = build


# ---------------------------------------------------------------- results
def trial_rows(study, cfg: TuneConfig) -> list[dict]:
    rows = []
    for t in study.trials:
        inter = sorted(t.intermediate_values.items())
        sign = -1.0 if direction(cfg) == "maximize" else 1.0
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        value = t.value if t.state.name == "COMPLETE" else None  # a pruned trial's value is its last report
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": value,
                     **{k: t.params.get(k) for k in cfg.space},
                     "last_step": inter[-1][0] if inter else None,
                     "last_validation_loss": sign * inter[-1][1] if inter else None,
                     "seconds": round(dur, 1) if dur is not None else None,
                     "artifact": t.user_attrs.get("artifact"), "note": t.user_attrs.get("stopped")
                     or t.user_attrs.get("error"),
                     "validation_losses": {int(s): sign * v for s, v in inter}})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(rows: list[dict], cfg: TuneConfig, best: dict | None, run_id: str) -> str:
    params = list(cfg.space)
    head = ["trial", "state", cfg.objective.metric, *params, "last step", "last val loss", "seconds", "note"]
    out = [f"# Hyperparameter search {run_id}", "",
           f"sampler {cfg.sampler.name} (seed {cfg.sampler.seed}), objective {cfg.objective.metric} "
           f"({direction(cfg)}), pruner {cfg.pruning.pruner}, base {cfg.base}", ""]
    if best:
        out += [f"best: trial {best['trial']}, {cfg.objective.metric} = {_fmt(best['value'])}, "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()), ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], r["state"], r["value"], *[r[p] for p in params], r["last_step"],
                 r["last_validation_loss"], r["seconds"], r["note"]]
        out.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    out += ["", "trials: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    return "\n".join(out) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    cols = [k for k in rows[0] if k != "validation_losses"] if rows else ["trial", "state", "value"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def plot(study, rows: list[dict], cfg: TuneConfig, path: Path) -> None:
    """Three panels: the objective per trial with the best so far; the validation loss reported at each eval step
    per trial (pruned ones dashed); the parameter importances (Optuna's fANOVA) once two trials are complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if done:
        a1.plot([r["trial"] for r in done], [r["value"] for r in done], "o", label="complete")
        best, xs, ys = None, [], []
        better = (lambda a, b: a < b) if direction(cfg) == "minimize" else (lambda a, b: a > b)
        for r in done:
            if best is None or better(r["value"], best):
                best = r["value"]
            xs.append(r["trial"])
            ys.append(best)
        a1.step(xs, ys, where="post", color="C2", label="best so far")
    pruned = [r for r in rows if r["state"] == "pruned"]
    for r in pruned:
        a1.axvline(r["trial"], color="C1", alpha=0.3, lw=3)
    if pruned:
        a1.plot([], [], color="C1", alpha=0.3, lw=3, label="pruned")
    a1.set(xlabel="trial", ylabel=cfg.objective.metric, title=f"objective ({direction(cfg)})")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    for r in rows:
        if r["validation_losses"]:
            steps, losses = zip(*sorted(r["validation_losses"].items()))
            a2.plot(steps, losses, "--" if r["state"] == "pruned" else "-", marker=".", label=f"trial {r['trial']}")
    a2.set(xlabel="optimizer step", ylabel="validation loss", title="reported during training (pruning)")
    a2.grid(alpha=0.3)
    if len(rows) <= 12 and any(r["validation_losses"] for r in rows):
        a2.legend(fontsize=7)
    try:
        import optuna

        imp = optuna.importance.get_param_importances(study) if len(done) >= 2 else {}
    except Exception:  # noqa: BLE001  (importances need varied parameters; the plot must not fail the search)
        imp = {}
    if imp:
        names = list(imp)[::-1]
        a3.barh(names, [imp[n] for n in names])
        a3.set(xlabel="importance (fANOVA)", title="parameter importance")
    else:
        a3.text(0.5, 0.5, "importances need 2+ complete trials\nwith varied parameters", ha="center", va="center")
        a3.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(study, cfg: TuneConfig, base: TrainConfig, out: Path, started: float, finished: bool) -> dict | None:
    """Tables, plot, best.yaml and manifest.json from the study's current state (rewritten after every trial)."""
    from optuna.trial import TrialState

    rows = trial_rows(study, cfg)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = None
    if complete:
        pick = min if direction(cfg) == "minimize" else max
        bt = pick(complete, key=lambda t: t.value)
        best = {"trial": bt.number, "value": bt.value, "params": bt.params, "artifact": bt.user_attrs.get("artifact")}
        best_cfg = best_config(cfg, base, bt.params)
        header = (f"# Best of `llmstack tune` run {out.name}: trial {bt.number}, {cfg.objective.metric} = "
                  f"{bt.value:.6g} ({direction(cfg)}).\n# Searched: "
                  + ", ".join(f"{k}={v!r}" for k, v in bt.params.items())
                  + f"\n# Train it: llmstack train --config {out / 'best.yaml'}\n")
        (out / "best.yaml").write_text(header + dump_yaml(best_cfg), encoding="utf-8")
    artifacts.write_json(out / "trials.json", rows)
    write_csv(rows, out / "trials.csv")
    (out / "trials.md").write_text(markdown(rows, cfg, best, out.name), encoding="utf-8")
    plot(study, rows, cfg, out / "tune.png")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    artifacts.write_json(out / artifacts.MANIFEST, {
        "stage": "tune", "run_id": out.name, "finished": finished, "config": cfg.model_dump(mode="json"),
        "base_config": cfg.base, "direction": direction(cfg), "trials": counts, "best": best,
        "outputs": {"trials.md / trials.json / trials.csv": "every trial with its state, value and parameters",
                    "tune.png": "objective per trial, validation loss per step, parameter importances",
                    "best.yaml": "the base train config with the best parameters (llmstack train --config best.yaml)",
                    "study.db": "the Optuna study (SQLite): `llmstack tune --resume <run-id>` continues it",
                    "trials/": "trial artifacts (merged model of the best trial only, unless trials.keep_merged)"},
        "packages": artifacts.package_versions(("optuna", "torch", "transformers", "peft", "llmstack")),
        "wall_seconds": round(time.time() - started, 1), "updated_at": artifacts.now()})
    return best


def _drop_merged(trials_dir: Path, keep: str | None) -> None:
    for merged in trials_dir.glob("trial-*/merged"):
        if merged.parent.name != keep:
            shutil.rmtree(merged, ignore_errors=True)


# ---------------------------------------------------------------- the search
def _sampler(cfg: TuneConfig):
    import optuna

    s = cfg.sampler
    if s.name == "grid":
        return optuna.samplers.GridSampler({n: grid_values(n, p) for n, p in cfg.space.items()}, seed=s.seed)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)


def _pruner(cfg: TuneConfig):
    import optuna

    p = cfg.pruning
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if p.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource or "auto",
                                                      reduction_factor=p.reduction_factor)
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource or 1, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def run(cfg: TuneConfig, base: TrainConfig, *, resume: str | None = None) -> Path:
    """Run (or continue) the search; return its folder."""
    import optuna
    from optuna.trial import TrialState
    from tqdm import tqdm

    from . import sft

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = Path(cfg.output.dir)
    run_id = resume or cfg.output.run_id or artifacts.new_run_id()
    out = root / run_id
    if resume is None and out.exists():
        raise ConfigError(f"search {run_id} already exists", field="output.run_id",
                          hint=f"continue it with `llmstack tune --resume {run_id}` or choose another run_id")
    trials_dir = out / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    cfg.output.run_id = run_id
    if resume is None:
        (out / "tune.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        (out / "base_config.yaml").write_text(dump_yaml(base), encoding="utf-8")
    started = time.time()
    study = optuna.create_study(study_name=run_id, storage=f"sqlite:///{(out / 'study.db').resolve()}",
                                sampler=_sampler(cfg), pruner=_pruner(cfg), direction=direction(cfg),
                                load_if_exists=True)
    for t in study.trials:  # trials a killed search left running: failed, their partial artifacts removed
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            shutil.rmtree(trials_dir / ".work" / f"trial-{t.number:03d}", ignore_errors=True)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    if resume is None:
        for params in cfg.enqueue:
            study.enqueue_trial(params)
    n_trials = None if cfg.budget.n_trials is None else max(cfg.budget.n_trials - finished, 0)
    if cfg.sampler.name == "grid":
        size = math.prod(len(grid_values(n, p)) for n, p in cfg.space.items())
        n_trials = min(n_trials, size) if n_trials is not None else size
    deadline = started + cfg.budget.timeout_s if cfg.budget.timeout_s else None
    sign = -1.0 if direction(cfg) == "maximize" else 1.0
    log.info(f"tune {run_id}: sampler {cfg.sampler.name}, objective {cfg.objective.metric} ({direction(cfg)}), "
             f"pruner {cfg.pruning.pruner}, budget {n_trials if n_trials is not None else 'unbounded'} trials"
             + (f" / {cfg.budget.timeout_s:g} s" if deadline else "") + f" -> {out}")

    def objective(trial):
        tid = f"trial-{trial.number:03d}"
        params = {name: _suggest(trial, name, spec) for name, spec in cfg.space.items()}
        try:
            tcfg = trial_config(cfg, base, params, tid, trials_dir)
        except StackError as exc:
            trial.set_user_attr("error", str(exc)[:300])
            raise
        try:
            with _with_callback(_reporter(trial, sign, deadline)):
                path = sft.run(tcfg, force=True)
        except BaseException:
            shutil.rmtree(trials_dir / ".work" / tid, ignore_errors=True)
            raise
        finally:
            gc.collect()
        trial.set_user_attr("artifact", str(path.relative_to(out)) if path.is_relative_to(out) else str(path))
        value = _metric(artifacts.read_manifest(path), cfg.objective.metric)
        if value is None or not math.isfinite(float(value)):
            trial.set_user_attr("error", f"{cfg.objective.metric} is {value} in {path}/manifest.json")
            raise ConfigError(f"trial {trial.number}: the objective {cfg.objective.metric} is {value}",
                              file=path / artifacts.MANIFEST, hint="check the base config's validation data and "
                              "eval settings")
        return float(value)

    bar = tqdm(total=n_trials, desc="tune", unit="trial", dynamic_ncols=True)

    def after_trial(study_, frozen):
        bar.update(1)
        done = [t for t in study_.trials if t.state == TrialState.COMPLETE and t.value is not None]
        if done:
            best = (min if direction(cfg) == "minimize" else max)(done, key=lambda t: t.value)
            bar.set_postfix({"best": f"{best.value:.4g}", "trial": best.number})
            if cfg.trials.keep_merged == "best":
                _drop_merged(trials_dir, f"trial-{best.number:03d}")
        value = "" if frozen.state != TrialState.COMPLETE else f" {cfg.objective.metric}={frozen.value:.4g}"
        note = frozen.user_attrs.get("stopped") or frozen.user_attrs.get("error") or ""
        bar.write(f"trial {frozen.number}: {frozen.state.name.lower()}{value} "
                  + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items())
                  + (f"  ({note})" if note else ""))
        write_results(study_, cfg, base, out, started, finished=False)

    completed = False
    try:
        if n_trials != 0:
            study.optimize(objective, n_trials=n_trials, timeout=cfg.budget.timeout_s, callbacks=[after_trial],
                           catch=(StackError,), gc_after_trial=True)
        completed = True
    finally:  # interrupted too: the table shows what finished (manifest "finished": false)
        bar.close()
        best = write_results(study, cfg, base, out, started, finished=completed)
        artifacts.set_latest(root, run_id)
    print((out / "trials.md").read_text())
    if best:
        print(f"best config: {out / 'best.yaml'}  (llmstack train --config {out / 'best.yaml'})")
    else:
        print("no trial completed: no best.yaml")
    print(f"search: {out}  ({time.time() - started:.0f} s)")
    return out


# ---------------------------------------------------------------- CLI
SPACE_HELP = """search space format (tune config `space:`; names are dotted TrainConfig fields):
  space:
    train.lr:           {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
    method.lora_r:      {type: int, low: 4, high: 32, step: 4}
    method.lora_alpha:  {type: categorical, choices: [16, 32, 64]}
    train.warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.05}   # grid: float ranges need a step
Outputs in <output.dir>/<run-id>/: trials.md/.json/.csv (every trial with its state), tune.png, best.yaml (run it
with `llmstack train --config .../best.yaml`), study.db (Optuna, SQLite; --resume continues it), manifest.json,
trials/ (trial artifacts; the best trial's merged model only)."""


def _help() -> str:
    return SPACE_HELP + "\n\ntune config options (override any with section.key=value):\n" + describe(TuneConfig)


def cmd_tune(args) -> int:
    if args.resume:
        other = [o for o in args.overrides if not o.startswith("budget.")]
        if other:
            raise ConfigError(f"--resume continues a search with its saved config; only budget.* overrides are "
                              f"allowed (got {other[0]})", field="overrides")
        root = Path(load_tune_output_dir(args.config))
        saved = root / args.resume / "tune.yaml"
        if not saved.is_file():
            known = sorted(p.parent.name for p in root.glob("*/tune.yaml"))
            raise ConfigError("no such search to resume", file=saved, hint=f"known: {', '.join(known) or 'none'}")
        cfg, base = load_tune(saved, args.overrides)
        run(cfg, base, resume=args.resume)
        return 0
    cfg, base = load_tune(args.config, args.overrides)
    run(cfg, base)
    return 0


def load_tune_output_dir(path: str | None) -> str:
    if path and Path(path).is_file():
        data, _ = read_yaml(path)
        return (data.get("output") or {}).get("dir", TuneOutputCfg().dir)
    return TuneOutputCfg().dir


def add_parser(sub) -> None:
    """The `tune` subcommand (called by llmstack/cli.py's build_parser)."""
    import argparse

    class _LazyEpilog(argparse.RawDescriptionHelpFormatter):
        def add_text(self, text):
            super().add_text(text() if callable(text) else text)

    p = sub.add_parser("tune", help="hyperparameter search (grid, random, Optuna TPE) with pruning; writes the best "
                       "config as a ready train YAML", formatter_class=_LazyEpilog, epilog=_help,
                       description="Train one trial per sampled set of TrainConfig values (lr, LoRA r/alpha, warmup, "
                       "epochs, any field by dotted name), stop poor trials early from their validation loss, and "
                       "write artifacts/tune/<run-id>/ with the trials table (Markdown, JSON, CSV), a plot, the "
                       "Optuna study and best.yaml.")
    p.add_argument("--config", default=DEFAULT_TUNE_CONFIG, help="tune config YAML (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted (or finished) search, its folder "
                   "under the tune config's output.dir, with its saved config; finished trials count towards "
                   "budget.n_trials, which may be raised with a budget.n_trials=N override (budget.timeout_s "
                   "counts from the resume)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the tune config, e.g. "
                   "budget.n_trials=4 sampler.name=random pruning.pruner=none")
    p.set_defaults(func=cmd_tune)
