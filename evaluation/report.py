"""`llmstack report`: base, fine-tuned and compressed models side by side, each measured the same way.

Per model, in its own process (evaluation.measure.measure_in_child: transformers for PyTorch folders, ONNX Runtime for
ONNX variants — the code `llmstack compress` gates its variants with): answer-token loss / perplexity on the test
rows and greedy generations scored like `llmstack eval` (JSON valid, per-field accuracy, exact match); here also
per-field macro F1 and BLEU / ROUGE-L of the answers. Then `llmstack harness` (lm-eval) on the same folder.
Writes report.json, report.md and report.png into --out.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from core import artifacts
from core.errors import ConfigError, StackError
from core.log import log
from evaluation.harness.run import HarnessError, resolve_model


def parse_models(specs: list[str]) -> dict[str, tuple[str, str, Path]]:
    """NAME=PATH entries -> {name: (ref, kind, folder)}; every bad entry reported at once."""
    out, errors = {}, []
    for spec in specs:
        name, sep, ref = spec.partition("=")
        if not sep:
            name, ref = Path(spec.rstrip("/")).name, spec
        if not name or not ref:
            errors.append(f"'{spec}' is not NAME=PATH")
            continue
        if name in out:
            errors.append(f"model name '{name}' given twice")
            continue
        try:
            kind, folder = resolve_model(ref)
        except StackError as exc:
            errors.append(f"{name}: {exc}")
            continue
        out[name] = (ref, kind, folder)
    if errors:
        raise ConfigError("; ".join(errors), field="--models")
    return out


def field_f1(preds: list[str], refs: list[str], fields: list[str]) -> dict:
    """Macro F1 per JSON field over the labels seen in the references (an invalid answer counts as a wrong label)."""
    from sklearn.metrics import f1_score

    from evaluation.metrics import parse_json

    out = {}
    p_json = [parse_json(p) or {} for p in preds]
    r_json = [parse_json(r) or {} for r in refs]
    for f in fields:
        y_true = [str(r.get(f, "")).strip().lower() for r in r_json]
        y_pred = [str(p.get(f, "")).strip().lower() for p in p_json]
        labels = sorted(set(y_true))
        out[f] = round(float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)), 4)
    return out


def flat_metrics(measured: dict, refs: list[str], fields: list[str]) -> dict:
    """One flat {metric: value} per model from evaluation.measure's output."""
    from evaluation.metrics import text_metrics

    m = {"answer_loss": measured["loss"], "perplexity": measured["perplexity"]}
    task = measured["task"]
    for k in ("exact_match", "json_valid"):
        if k in task:
            m[k] = task[k]
    for f, v in task.get("field_accuracy", {}).items():
        m[f"accuracy:{f}"] = v
    preds = measured["predictions"]
    if fields:
        m.update({f"f1:{f}": v for f, v in field_f1(preds, refs, fields).items()})
    m.update(text_metrics(preds, refs))  # bleu (0-100), rougeL
    m["size_mb"] = measured.get("size_mb")
    m["peak_rss_mb"] = measured.get("peak_rss_mb")
    return m


def harness_metrics(name: str, folder: Path, limit: int | None, tasks: list[str] | None, threads: int,
                    work: Path) -> tuple[dict, dict]:
    """`llmstack harness` on one model (in this process; the model is released afterwards):
    ({"harness:<task>:<metric>": value}, {task: documents})."""
    import gc

    from evaluation.harness import run as harness

    try:
        res = harness.run(model=str(folder), tasks=tasks, limit=limit, out=str(work / "harness" / name),
                          threads=threads)
    except StackError as exc:
        raise HarnessError(f"harness on '{name}' failed: {exc}", file=folder) from exc
    finally:
        gc.collect()
    return ({f"harness:{task}:{m}": v for task, r in res["tasks"].items() for m, v in r["metrics"].items()},
            {task: r["n"] for task, r in res["tasks"].items()})


LOWER_IS_BETTER = {"answer_loss", "perplexity", "size_mb", "peak_rss_mb"}


def markdown(models: dict, metrics: list[str], settings: dict) -> str:
    names = list(models)
    lines = ["# Evaluation report", "",
             f"Test rows: {settings['n_rows']} of `{settings['test']}` (config `{settings['config']}`); harness: "
             f"{settings['harness_limit'] or 'all'} documents per task. Best value per row in bold.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in metrics:
        vals = [models[n]["metrics"].get(k) for n in names]
        nums = [v for v in vals if isinstance(v, (int, float))]
        best = (min(nums) if k in LOWER_IS_BETTER else max(nums)) if len(nums) > 1 else None
        cells = []
        for v in vals:
            s = "-" if v is None else (f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v}")
            cells.append(f"**{s}**" if best is not None and v == best and nums.count(best) < len(nums) else s)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| model | reference | evaluated folder | runtime |", "|---|---|---|---|"]
    lines += [f"| {n} | `{m['ref']}` | `{m['folder']}` | {m['runtime']} |" for n, m in models.items()]
    return "\n".join(lines) + "\n"


def plot(models: dict, metrics: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in metrics if k not in LOWER_IS_BETTER and k != "bleu"
            and all(isinstance(m["metrics"].get(k), (int, float)) for m in models.values())]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(keys) * max(1, len(models)) / 2), 4.5))
    width = 0.8 / max(len(models), 1)
    for i, (name, m) in enumerate(models.items()):
        ax.bar([j + i * width for j in range(len(keys))], [m["metrics"][k] for k in keys], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels(keys, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(model_specs: list[str], config: str = "configs/train.yaml", limit: int | None = None,
        tasks: list[str] | None = None, out: str = "artifacts/reports/latest-eval", harness_limit: int | None = None,
        threads: int = 0, skip_harness: bool = False) -> dict:
    from chatdata import pipeline as data_mod
    from core.config import load
    from evaluation.config import TrainingSections
    from modeling.model import load_tokenizer

    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}", field="--limit")
    models = parse_models(model_specs)
    cfg = load(TrainingSections, config)
    if tasks and not skip_harness:
        from evaluation.harness.run import select_tasks
        select_tasks(tasks, endpoint=False, data=None)  # unknown task names fail before any model runs
    from evaluation.measure import measure_in_child, spec_rows

    out_dir = Path(out)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    eval_cfg = SimpleNamespace(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                               json_fields=list(cfg.eval.json_fields))
    measure_cfg = SimpleNamespace(threads=threads, decode_tokens=2, runs=1, batch=0)  # timings are not this report's job
    fields = list(cfg.eval.json_fields)
    harness_limit = harness_limit or limit
    results: dict[str, dict] = {}
    rows_cache: dict[str, list[dict]] = {}
    for name, (ref, kind, folder) in models.items():
        t0 = time.perf_counter()
        tok_key = (folder / "tokenizer.json").read_bytes() if (folder / "tokenizer.json").is_file() else str(folder)
        key = str(hash(tok_key))
        if key not in rows_cache:
            tokenizer = load_tokenizer(str(folder))
            prepared = data_mod.prepare(cfg.data, tokenizer, cfg.train.seed)
            rows_cache[key] = spec_rows(prepared.test, limit or 0, tokenizer)
        rows = rows_cache[key]
        log.info("report: measuring %s (%s, %s) on %d test rows", name, kind, folder, len(rows))
        measured = measure_in_child(name, kind, folder, rows, eval_cfg, measure_cfg, work / "measure")
        from chatdata.pipeline import Example
        refs = [Example(source=r["source"], messages=r["messages"]).reference() for r in rows]
        metrics = flat_metrics(measured, refs, fields)
        n_harness = {}
        if not skip_harness:
            log.info("report: harness tasks on %s", name)
            h, n_harness = harness_metrics(name, folder, harness_limit, tasks, threads, work)
            metrics.update(h)
        with open(work / f"{name}.predictions.jsonl", "w") as f:
            for r, ref_text, p in zip(rows, refs, measured["predictions"]):
                f.write(json.dumps({"source": r["source"], "reference": ref_text, "prediction": p}) + "\n")
        results[name] = {"ref": ref, "folder": str(folder), "kind": kind,
                         "runtime": "onnxruntime" if kind == "onnx" else "transformers", "n_rows": len(rows),
                         "harness_n": n_harness, "metrics": metrics,
                         "seconds": round(time.perf_counter() - t0, 1)}
    order = []
    for m in results.values():
        order += [k for k in m["metrics"] if k not in order]
    settings = {"config": config, "test": ", ".join(str(s.path) for s in cfg.data.test) if cfg.data.test else "-",
                "n_rows": next(iter(results.values()))["n_rows"], "limit": limit, "harness_limit": harness_limit,
                "tasks": tasks, "threads": threads, "max_new_tokens": eval_cfg.max_new_tokens,
                "json_fields": fields, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = {"settings": settings, "metrics": order, "models": results}
    artifacts.write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(markdown(results, order, settings))
    plot(results, order, out_dir / "report.png")
    print(markdown(results, order, settings))
    print(f"report: {out_dir / 'report.md'}")
    return report
