"""Results of a hyperparameter search (`llmstack tune`): the trial table (trials.md / .json / .csv rows) and the plot
(tune.png: objective per trial, validation loss per step, parameter importances). training/tune/search.py writes them
after every trial. Light at import; matplotlib and optuna's importance evaluator load when the plot is drawn."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from training.tune.config import TuneConfig, direction


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
