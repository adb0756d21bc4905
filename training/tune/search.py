"""Hyperparameter search over any TrainConfig field (Optuna): grid, random or TPE sampling, pruning of poor trials
from the validation loss reported at eval steps, bounded by a trial count and/or wall time.

Flow, top to bottom: load the tune config and the base train config -> check the search space (every problem at
once, before anything is written) -> create or reopen the Optuna study (SQLite, `<output.dir>/<run-id>/study.db`,
so an interrupted search resumes) -> each trial: suggest values, train in-process with training.sft.recipe.run (trial
artifacts under `trials/`), report the validation loss at eval steps from a TrainerCallback and stop the trial when
the pruner says so -> after every trial: trials.md / .json / .csv, tune.png (training/tune/report.py), best.yaml,
manifest.json.

This module stays light at import time (the CLI imports it to build its parser); optuna, torch and the recipe load
when a search runs.
"""
from __future__ import annotations

import contextlib
import gc
import math
import shutil
import time
from pathlib import Path
from typing import Any

from core import artifacts
from core.config import dump_yaml, read_yaml, validate
from core.errors import ConfigError, StackError
from core.log import log
from tracking import runs as tracking_runs
from training.config import TrainConfig
from training.tune.config import (NO_CHECKPOINTS, ParamSpec, TuneConfig, TuneOutputCfg, _set, direction, grid_values,
                                  load_tune)
from training.tune.report import markdown, plot, trial_rows, write_csv


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
    """training.sft.recipe builds its Trainer in build_trainer; add our callback to it for the duration (no change to the
    recipe's signature)."""
    from training.sft import recipe as sft

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
    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.time()
    study, out, finished = _open_study(cfg, base, resume)
    n_trials = _trials_left(cfg, finished)
    deadline = started + cfg.budget.timeout_s if cfg.budget.timeout_s else None
    log.info(f"tune {cfg.output.run_id}: sampler {cfg.sampler.name}, objective {cfg.objective.metric} "
             f"({direction(cfg)}), pruner {cfg.pruning.pruner}, budget "
             f"{n_trials if n_trials is not None else 'unbounded'} trials"
             + (f" / {cfg.budget.timeout_s:g} s" if deadline else "") + f" -> {out}")
    bar = tqdm(total=n_trials, desc="tune", unit="trial", dynamic_ncols=True)
    completed = False
    try:
        if n_trials != 0:
            study.optimize(_objective(cfg, base, out, deadline), n_trials=n_trials, timeout=cfg.budget.timeout_s,
                           callbacks=[_after_trial(cfg, base, out, started, bar)], catch=(StackError,),
                           gc_after_trial=True)
        completed = True
    finally:  # interrupted too: the table shows what finished (manifest "finished": false)
        bar.close()
        best = write_results(study, cfg, base, out, started, finished=completed)
        artifacts.set_latest(Path(cfg.output.dir), cfg.output.run_id)
        tracking_runs.record(out, cfg.tracking)
    print((out / "trials.md").read_text())
    if best:
        print(f"best config: {out / 'best.yaml'}  (llmstack train --config {out / 'best.yaml'})")
    else:
        print("no trial completed: no best.yaml")
    print(f"search: {out}  ({time.time() - started:.0f} s)")
    return out


def _open_study(cfg: TuneConfig, base: TrainConfig, resume: str | None):
    """The search folder and its Optuna study (SQLite; a resumed one with the trials a killed search left running
    marked failed); (study, folder, trials already finished)."""
    import optuna
    from optuna.trial import TrialState

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
    return study, out, finished


def _trials_left(cfg: TuneConfig, finished: int) -> int | None:
    """budget.n_trials less the finished ones (None: unbounded); a grid stops at its size."""
    n_trials = None if cfg.budget.n_trials is None else max(cfg.budget.n_trials - finished, 0)
    if cfg.sampler.name == "grid":
        size = math.prod(len(grid_values(n, p)) for n, p in cfg.space.items())
        n_trials = min(n_trials, size) if n_trials is not None else size
    return n_trials


def _objective(cfg: TuneConfig, base: TrainConfig, out: Path, deadline: float | None):
    """Optuna's objective: one SFT run with the trial's parameters (reporting its validation loss for pruning);
    the objective metric from its manifest."""
    from training.sft import recipe as sft

    trials_dir = out / "trials"
    sign = -1.0 if direction(cfg) == "maximize" else 1.0

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
    return objective


def _after_trial(cfg: TuneConfig, base: TrainConfig, out: Path, started: float, bar):
    """Optuna's callback after each trial: the progress bar and its line, the best trial's merged model kept, the
    results rewritten."""
    from optuna.trial import TrialState

    def after_trial(study_, frozen):
        bar.update(1)
        done = [t for t in study_.trials if t.state == TrialState.COMPLETE and t.value is not None]
        if done:
            best = (min if direction(cfg) == "minimize" else max)(done, key=lambda t: t.value)
            bar.set_postfix({"best": f"{best.value:.4g}", "trial": best.number})
            if cfg.trials.keep_merged == "best":
                _drop_merged(out / "trials", f"trial-{best.number:03d}")
        value = "" if frozen.state != TrialState.COMPLETE else f" {cfg.objective.metric}={frozen.value:.4g}"
        note = frozen.user_attrs.get("stopped") or frozen.user_attrs.get("error") or ""
        bar.write(f"trial {frozen.number}: {frozen.state.name.lower()}{value} "
                  + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items())
                  + (f"  ({note})" if note else ""))
        write_results(study_, cfg, base, out, started, finished=False)
    return after_trial


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


def load_tune_output_dir(path: str | None) -> str:
    if path and Path(path).is_file():
        data, _ = read_yaml(path)
        return (data.get("output") or {}).get("dir", TuneOutputCfg().dir)
    return TuneOutputCfg().dir


def search_from_config(config: str | None, overrides: list[str], resume: str | None = None) -> None:
    """`llmstack tune`: a new search from a tune config (+ overrides), or `resume` one with its saved config (only
    budget.* overrides)."""
    if resume:
        other = [o for o in overrides if not o.startswith("budget.")]
        if other:
            raise ConfigError(f"--resume continues a search with its saved config; only budget.* overrides are "
                              f"allowed (got {other[0]})", field="overrides")
        root = Path(load_tune_output_dir(config))
        saved = root / resume / "tune.yaml"
        if not saved.is_file():
            known = sorted(p.parent.name for p in root.glob("*/tune.yaml"))
            raise ConfigError("no such search to resume", file=saved, hint=f"known: {', '.join(known) or 'none'}")
        cfg, base = load_tune(saved, overrides)
        run(cfg, base, resume=resume)
        return
    cfg, base = load_tune(config, overrides)
    run(cfg, base)
