"""Continued pre-training (CPT) and staged curricula in one training run.

`curriculum.datasets` names the data (raw text for CPT: loss on every token; instruction / chat rows: loss on the
answers), `curriculum.stages` says, stage by stage, which of them to mix, in what proportions (or upsampling
factors) and for how long. The stages' rows are laid out one after the other, each stage shuffled (seeded) and
padded to whole optimizer steps, and the HF Trainer reads them in that order (a sequential sampler) under one
optimizer and one learning-rate schedule: warm-up once, decay across all stages, nothing restarts at a boundary.
At every stage boundary a callback makes the Trainer log, evaluate and checkpoint, so each stage's metrics come
from the Trainer's own log: the training loss, the learning rate, the domain validation loss (data.validation) and
the general held-out loss (curriculum.general_eval), the forgetting watch. Because it is one Trainer run, `--resume`,
torchrun / accelerate launch (the padding makes every stage a whole number of steps for any process count) and the
checkpoints work as for plain SFT.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from transformers import TrainerCallback

from chatdata.pipeline import Example
from core.errors import ConfigError, DataError, collect
from core.log import log

GENERAL = "curriculum.general_eval"


def dataset_split(name: str) -> str:
    return f"curriculum.datasets.{name}"


def extra_splits(cur) -> dict[str, list]:
    """The data pipeline's extra splits for a curriculum: each named dataset, and the general held-out set."""
    if not cur.stages:
        return {}
    used = {n for st in cur.stages for n in st.mix}
    out = {dataset_split(name): [spec] for name, spec in cur.datasets.items() if name in used}
    if cur.general_eval:
        out[GENERAL] = list(cur.general_eval)
    return out


@dataclass
class Stage:
    name: str
    rows: list[Example]          # the stage's training rows in training order, padded to whole steps
    start: int                   # global step before the stage's first step
    end: int                     # global step after its last step
    composition: dict[str, int]  # rows drawn per dataset for one pass over the stage
    padded: int                  # rows repeated to fill the last step

    @property
    def steps(self) -> int:
        return self.end - self.start


def _draw(pool: list[Example], n: int, rng: random.Random) -> list[Example]:
    """n rows of a pool: whole copies of it, then a seeded sample without replacement for the rest."""
    whole, rest = divmod(n, len(pool))
    return list(pool) * whole + rng.sample(pool, rest)


def build(cur, pools: dict[str, list[Example]], step_rows: int, seed: int) -> list[Stage]:
    """Lay out the stages. step_rows: the rows one optimizer step consumes (batch_size x grad_accum x processes)."""
    stages, errors, step = [], [], 0
    for i, st in enumerate(cur.stages):
        rng = random.Random(f"{seed}:stage:{i}")
        where = f"curriculum.stages[{i}] ('{st.name}')"
        available = {name: pools.get(dataset_split(name), []) for name in st.mix}
        size = st.rows or sum(len(p) for p in available.values())
        counts = {}
        for name, weight in st.mix.items():
            pool = available[name]
            if not pool:
                errors.append(DataError(f"{where} draws on '{name}', which has no rows left after the data pipeline "
                                        "(see the data report)", field=dataset_split(name)))
                continue
            n = round(weight * (size if cur.mixing == "proportions" else len(pool)))
            if n == 0:
                errors.append(DataError(f"{where}: weight {weight:g} of '{name}' gives 0 rows", field=f"{where}.mix",
                                        hint="raise the weight (or the stage's rows)"))
            counts[name] = n
        if errors:
            continue
        one_pass = [ex for name, n in counts.items() for ex in _draw(available[name], n, rng)]
        target = st.max_steps * step_rows if st.max_steps else max(1, round(len(one_pass) * st.epochs))
        ordered: list[Example] = []
        while len(ordered) < target:  # whole passes, each reshuffled; the last one cut to length
            chunk = list(one_pass)
            rng.shuffle(chunk)
            ordered.extend(chunk)
        ordered = ordered[:target]
        steps = -(-len(ordered) // step_rows)
        padded = steps * step_rows - len(ordered)
        if padded:  # the last step's free places: more rows of this stage (a fresh shuffle), never the next stage's
            fill = list(one_pass)
            rng.shuffle(fill)
            ordered.extend((fill * (padded // len(fill) + 1))[:padded])
        stages.append(Stage(st.name, ordered, step, step + steps, counts, padded))
        step += steps
    collect(errors, "curriculum problems")
    return stages


def summary(stages: list[Stage]) -> list[dict]:
    """Per stage: what it trains on (the data report's and the manifest's `curriculum` entry)."""
    return [{"name": s.name, "steps": s.steps, "step_range": [s.start + 1, s.end], "rows": len(s.rows),
             "padded_rows": s.padded, "composition": s.composition,
             "tokens": sum(len(e.input_ids) for e in s.rows),
             "loss_tokens": sum(sum(1 for t in e.labels if t != -100) for e in s.rows)} for s in stages]


class StageEnds(TrainerCallback):
    """Evaluates the base model when training starts (the forgetting baseline) and, at each stage's last step, makes
    the Trainer log, evaluate (domain validation + general held-out) and checkpoint; the progress bar names the stage.

    The base evaluation runs inside the training loop, where the Trainer has prepared the model for the launcher
    (an evaluation before `train()` would prepare it for evaluation first, and DDP would then not synchronise the
    gradients). It is kept in `base_file` for a resumed run, which starts past step 0 and reads it back."""

    def __init__(self, stages: list[Stage], progress=None, trainer=None, base_file=None):
        self.stages, self.progress, self.trainer, self.base_file = stages, progress, trainer, base_file
        self.base: dict = {}

    def _current(self, step: int) -> Stage:
        return next((s for s in self.stages if s.start <= step < s.end), self.stages[-1])

    def on_train_begin(self, args, state, control, **kw):
        if self.trainer is None:
            return
        if state.global_step == 0:  # the same on every process: all of them take part in the evaluation
            self.base = self.trainer.evaluate()
            if self.base_file is not None and args.process_index == 0:
                self.base_file.write_text(json.dumps(self.base))
        elif self.base_file is not None and self.base_file.is_file():
            self.base = json.loads(self.base_file.read_text())

    def on_step_begin(self, args, state, control, **kw):
        bar = getattr(self.progress, "bar", None)
        if bar is not None:
            st = self._current(state.global_step)
            bar.set_description(f"stage {self.stages.index(st) + 1}/{len(self.stages)} {st.name}", refresh=False)

    def on_step_end(self, args, state, control, **kw):
        done = [s for s in self.stages if s.end == state.global_step]
        if done:
            control.should_log = control.should_evaluate = control.should_save = True
            log.info(f"stage '{done[0].name}' done at step {state.global_step}: evaluating and saving a checkpoint")


def _ppl(loss):
    return round(math.exp(min(loss, 50)), 3) if loss is not None else None


def stage_metrics(history: list[dict], stages: list[Stage], base: dict) -> list[dict]:
    """Per stage from the Trainer's log: train loss (mean over the stage's steps), learning rate at its first and
    last logged step, the domain validation and general held-out losses at its end, and their change since the base
    model (base: the evaluation before training)."""
    def at(step, key):
        return next((h[key] for h in history if h.get("step") == step and key in h), None)

    rows = [{"name": "base", "step": 0, "validation_loss": base.get("eval_validation_loss"),
             "general_loss": base.get("eval_general_loss")}]
    for s in stages:
        logged = sorted((h["step"], h) for h in history if "loss" in h and s.start < h["step"] <= s.end)
        weighted, prev = 0.0, s.start
        for step, h in logged:  # each logged loss is the mean over the steps since the previous log
            weighted += h["loss"] * (step - prev)
            prev = step
        lrs = [h["learning_rate"] for _, h in logged if "learning_rate" in h]
        rows.append({"name": s.name, "step": s.end, "steps": s.steps,
                     "train_loss": round(weighted / (prev - s.start), 4) if logged else None,
                     "lr_first_logged": lrs[0] if lrs else None, "lr_last_logged": lrs[-1] if lrs else None,
                     "validation_loss": at(s.end, "eval_validation_loss"),
                     "general_loss": at(s.end, "eval_general_loss")})
    for r in rows:
        for key in ("validation", "general"):
            loss, first = r[f"{key}_loss"], rows[0][f"{key}_loss"]
            r[f"{key}_perplexity"] = _ppl(loss)
            r[f"{key}_change"] = round(loss - first, 4) if loss is not None and first is not None else None
    return rows


def table(rows: list[dict], stages: list[dict]) -> str:
    """Markdown: one line per stage (and the base model), domain beside general."""
    comp = {s["name"]: ", ".join(f"{k} {v}" for k, v in s["composition"].items()) for s in stages}
    fmt = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    sign = lambda v: "" if v is None else f" ({v:+.4f})"  # noqa: E731
    lines = ["| stage | data (rows per pass) | steps | lr at end | train loss | domain val loss (Δ base) | "
             "general loss (Δ base) | general ppl |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {comp.get(r['name'], 'before training')} | {r.get('steps', 0)} | "
                     f"{'–' if r.get('lr_last_logged') is None else format(r['lr_last_logged'], '.2e')} | "
                     f"{fmt(r.get('train_loss'))} | {fmt(r['validation_loss'])}{sign(r['validation_change'] or None)} "
                     f"| {fmt(r['general_loss'])}{sign(r['general_change'] or None)} | "
                     f"{fmt(r['general_perplexity'], 2)} |")
    return "\n".join(lines)


def plot(history: list[dict], stages: list[Stage], rows: list[dict], path) -> None:
    """curriculum.png: losses (train, domain validation, general held-out) and the learning rate over the whole run,
    the stage boundaries marked."""
    from training.report import _plt

    plt = _plt()
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", marker=".", alpha=0.7)
    for key, label in (("validation", "domain validation loss"), ("general", "general held-out loss")):
        pts = [(r["step"], r[f"{key}_loss"]) for r in rows if r[f"{key}_loss"] is not None]
        pts += [(h["step"], h[f"eval_{key}_loss"]) for h in history if f"eval_{key}_loss" in h]
        if pts:
            ax.plot(*zip(*sorted(set(pts))), label=label, marker="o")
    lrs = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    if lrs:
        ax_lr.plot(*zip(*lrs), color="gray")
    for s in stages:
        for a in (ax, ax_lr):
            a.axvline(s.end, color="black", linestyle=":", linewidth=0.8)
        ax.text((s.start + s.end) / 2, 1.01, s.name, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
    ax.set_ylabel("cross-entropy")
    ax.set_title("Curriculum: loss per stage (dotted: stage ends)", pad=16)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attach(cfg, prepared, step_rows: int) -> list[Stage]:
    """With curriculum stages: lay them out and make them the training split (the data report gains a `curriculum`
    entry); without: []."""
    if not cfg.curriculum.stages:
        return []
    from chatdata.pipeline import length_stats

    stages = build(cfg.curriculum, prepared.extra, step_rows, cfg.train.seed)
    prepared.train = [ex for s in stages for ex in s.rows]
    prepared.report["splits"]["train"] = length_stats(prepared.train)
    prepared.report["curriculum"] = summary(stages)
    log.info("curriculum: " + "; ".join(f"{s.name} {s.steps} steps ({len(s.rows)} rows)" for s in stages))
    return stages


def prepare_data(cfg, tokenizer, world_size: int = 1):
    """The data pipeline for a training config, a curriculum's stages included: (prepared, stages) (stages: [] without
    a curriculum)."""
    from chatdata.pipeline import prepare

    extra = extra_splits(cfg.curriculum)
    if extra and (cfg.data.augment.operations or cfg.data.reweigh.enabled):
        raise ConfigError("augmentation and reweighing apply to data.train; a curriculum builds its rows from its "
                          "stages' datasets", field="data.augment" if cfg.data.augment.operations else "data.reweigh",
                          hint="augment a stage's dataset with `llmstack augment` and name the written file")
    prepared = prepare(cfg.data, tokenizer, cfg.train.seed, extra=extra)
    return prepared, attach(cfg, prepared, cfg.train.batch_size * cfg.train.grad_accum * world_size)


def eval_sets(prepared, features) -> dict:
    """The Trainer's evaluation datasets in a curriculum: the domain validation set and the general held-out set."""
    sets = {"validation": features(prepared.validation)}
    if prepared.extra.get(GENERAL):
        sets["general"] = features(prepared.extra[GENERAL])
    return sets
