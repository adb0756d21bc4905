"""`llmstack compress`: build every configured variant from the input model, measure all of them (and the input model)
the same way in one run, gate them on task quality, and write one artifact folder with a report and a recommendation.

Layout: `<output.dir>/<run-id>/` holds `<variant>/` (model files + manifest.json each), `report.json`, `report.md`,
`report.png`, `frontier.png` and the run's `manifest.json` (parent artifact, config, per-variant summary,
`recommended`, per-phase `timings`). The run is written into a temporary folder and renamed when complete, like
training artifacts. Paths in the manifests are relative to the working directory (no machine paths in artifacts).

`--fast` (what `make serve` runs when no compress artifact exists): only `fast.variants`, in order, until one passes
the gate; no reference speed measurement. The result is a normal compress run that recommends that variant.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from core import artifacts
from core.config import config_hash, dump_yaml, validate
from core.errors import ArtifactError, ConfigError, StackError
from core.log import log
from tracking import runs as tracking_runs

from .build import Builder, PhaseClock, distill_steps, prune_setting
from .config import CompressConfig, DataCfg, EvalCfg, VariantCfg
from .report import frontier_plot, markdown, plot, summary, task_score

BACKEND = {"onnx": "onnxruntime", "pytorch": "transformers", "openvino": "openvino"}
DRIFT_REFERENCE = "drift_reference.json"  # written by training (monitoring.drift.FILE)


def run(cfg: CompressConfig, fast: bool = False) -> Path:
    import torch

    from evaluation.measure import spec_rows
    from modeling.model import load_tokenizer

    clock = PhaseClock()
    started_at = artifacts.now()
    torch.set_num_threads(cfg.measure.threads or os.cpu_count())
    model_dir, parent_manifest = resolve_input(cfg.input)
    data_cfg, eval_cfg, seed = _settings(cfg, parent_manifest)
    plan = fast_plan(cfg) if fast else variants(cfg)
    root = Path(cfg.output.dir)
    artifacts.clean_stale(root)
    run_id = cfg.output.run_id or artifacts.new_run_id()
    with clock("prepare data"):
        tokenizer = load_tokenizer(str(model_dir))
        prepared = prepare_data(cfg, data_cfg, seed, tokenizer)
        rows = spec_rows(prepared.test, cfg.measure.eval_samples, tokenizer)
    parent = {"path": _rel(Path(cfg.input).resolve()), "model_dir": _rel(model_dir.resolve()),
              "stage": parent_manifest.get("stage") if parent_manifest else None,
              "run_id": parent_manifest.get("run_id") if parent_manifest else None}
    log.info(f"compress {run_id}{' (fast path)' if fast else ''}: input {parent['model_dir']} ({len(plan)} variants; "
             f"measuring on {len(rows)} test rows)")

    with artifacts.atomic_dir(root, run_id) as out:
        work = out / "_work"
        work.mkdir()
        reference = measure_reference(cfg, model_dir, parent_manifest, rows, eval_cfg, work, clock, speed=not fast)
        json_fields = list(eval_cfg.json_fields)
        report_rows = [{"name": "reference", "kind": "pytorch", **summary(reference, reference, json_fields),
                        "fit": True}]
        builder = Builder(cfg, model_dir, prepared, data_cfg, work, clock, base_dir=_base_model(parent_manifest))
        built: dict[str, dict] = {}
        for v in plan:
            row, entry = build_and_measure(cfg, v, builder, reference, rows, eval_cfg, out, parent, run_id, clock,
                                           fast=fast)
            report_rows.append(row)
            built[v.name] = entry
            if fast and row.get("fit"):
                break
        shutil.rmtree(work)
        best = recommend(report_rows, cfg.gate.recommend)
        md = write_report(cfg, out, report_rows, reference, best, json_fields, clock)
        write_manifest(cfg, out, run_id, parent, built, best, fast, clock, started_at)
    artifacts.set_latest(root, run_id)
    tracking_runs.record(root / run_id, cfg.tracking)
    print("\n" + md)
    if best is None:
        log.warning("warning: no variant passed the quality gate; serving should use the input model")
    print(clock.summary())
    print(f"artifact: {root / run_id}  (latest: {root / 'latest'})")
    return root / run_id


# ---------------------------------------------------------------- what to build
def variants(cfg: CompressConfig) -> list[VariantCfg]:
    """The configured variants plus the pruning frontier's points (see FrontierCfg)."""
    out = list(cfg.variants)
    f = cfg.frontier
    if not f.drop_layers:
        return out
    config = _model_config(cfg.input)
    points = [(d, k) for d in f.drop_layers for k in f.mlp_keep if (d, k) != (0, 1.0)]
    removed = {p: _removed_params(config, *p) for p in points}
    most = max(removed.values(), default=0) or 1
    names = {v.name for v in out}
    for d, k in points:
        prune = "depth+width" if d and k < 1 else ("depth" if d else "width")
        steps = max(f.min_distill_steps, math.ceil(f.distill_steps * removed[(d, k)] / most)) if f.distill_steps else 0
        name = f"pruned-d{d}-w{k:g}-{f.quantize.replace('_', '-')}"
        if name in names:
            raise ConfigError(f"frontier point {name} has the name of a configured variant", field="frontier")
        out.append(VariantCfg(name=name, prune=prune, drop_layers=d if d else None, mlp_keep=k if k < 1 else None,
                              distill=steps > 0, distill_steps=steps or None, quantize=f.quantize))
    return out


def fast_plan(cfg: CompressConfig) -> list[VariantCfg]:
    by_name = {v.name: v for v in variants(cfg)}
    unknown = [n for n in cfg.fast.variants if n not in by_name]
    if unknown or not cfg.fast.variants:
        raise ConfigError(f"fast.variants names {', '.join(unknown) or 'nothing'}: not a configured variant "
                          f"({', '.join(by_name)})", field="fast.variants")
    return [by_name[n] for n in cfg.fast.variants]


def _model_config(ref: str) -> dict:
    path = Path(ref)
    folder = path / "merged" if (path / "merged" / "config.json").is_file() else path
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _removed_params(config: dict, drop: int, keep: float) -> float:
    """Decoder parameters a (layers dropped, MLP fraction kept) cut removes, from the model's config."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads") or heads
    attn = h * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * h * inter
    return drop * (attn + mlp) + (layers - drop) * (1 - keep) * mlp


# ---------------------------------------------------------------- input
def resolve_input(ref: str) -> tuple[Path, dict | None]:
    """The model folder to compress and the training manifest it came from (None for a plain HF folder)."""
    path = Path(ref)
    if not path.exists():
        raise ArtifactError("input not found", file=path, hint="run `make train` first or set input to a model folder")
    if (path / artifacts.MANIFEST).is_file():
        manifest = artifacts.read_manifest(path)
        if manifest.get("stage") != "train":
            raise ArtifactError(f"input is a '{manifest.get('stage')}' artifact; compression takes a training artifact "
                                "or a HF model folder", file=path)
        merged = path / "merged"
        if not (merged / "config.json").is_file():
            raise ArtifactError("this training artifact has no merged model (prompt-learning methods cannot merge)",
                                file=path)
        return merged, manifest
    if not (path / "config.json").is_file():
        raise ArtifactError("neither a training artifact (manifest.json) nor a HF model folder (config.json)",
                            file=path)
    return path, None


def _settings(cfg: CompressConfig, manifest: dict | None) -> tuple[DataCfg, EvalCfg, int]:
    """Data and eval sections and the data seed: the config's, else those the training artifact's manifest records."""
    recorded = (manifest or {}).get("config") or {}
    file = Path(cfg.input) / artifacts.MANIFEST

    def section(model, name: str):
        if name not in recorded:
            return None
        try:
            return validate(model, recorded[name], file=file)
        except StackError as exc:  # written by another version of the trainer
            raise ConfigError(f"the training artifact's {name} settings do not validate: {exc}", file=file,
                              field=f"config.{name}", hint=f"set {name}: in the compress config, or rebuild the "
                              "artifact with `llmstack train`") from None
    data = cfg.data or section(DataCfg, "data")
    ev = cfg.eval or section(EvalCfg, "eval")
    if data is None or ev is None:
        what = "a plain model folder has" if manifest is None else "the training artifact's manifest records"
        raise ConfigError(f"{what} no data and eval settings to take", field="data" if data is None else "eval",
                          hint="add data: and eval: sections to the compress config")
    return data, ev, int((recorded.get("train") or {}).get("seed", 42))


def prepare_data(cfg: CompressConfig, data_cfg: DataCfg, seed: int, tokenizer):
    """The rows to calibrate, distil and measure on: the training run's own splits (saved in its artifact's data/)
    unless the compress config names data itself; else the data pipeline run on the data section."""
    from chatdata import pipeline, splits

    saved = Path(cfg.input) / splits.FOLDER
    if cfg.data is None and splits.saved(saved):
        log.info(f"data: the training run's splits ({_rel(saved)})")
        return splits.load(saved, tokenizer)
    return pipeline.prepare(data_cfg, tokenizer, seed)


def _base_model(manifest: dict | None) -> Path | None:
    """The base model folder a training artifact was fine-tuned from (its manifest's base_model.path), if present."""
    path = ((manifest or {}).get("base_model") or {}).get("path")
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def _rel(path: Path) -> str:
    """A path for manifests: relative to the working directory (never an absolute path of this machine)."""
    return os.path.relpath(path, Path.cwd())


# ---------------------------------------------------------------- measuring and gating
def training_quality(folder: Path, manifest: dict | None, rows: list[dict], same_eval: bool) -> dict | None:
    """The input model's perplexity, task score and predictions as its training run measured them, when that run
    evaluated the merged model on exactly these test rows with the same eval settings (the same code, greedy: the same
    result); None otherwise, and the reference is measured here."""
    if not same_eval or not manifest or manifest.get("stage") != "train":
        return None
    after = (manifest.get("metrics") or {}).get("after") or {}
    pred_file = folder / "predictions_after.jsonl"
    if after.get("n") != len(rows) or "loss" not in after or not pred_file.is_file():
        return None
    preds = [json.loads(line) for line in pred_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [p.get("source") for p in preds] != [r["source"] for r in rows]:
        return None
    task = {k: v for k, v in after.items() if k not in ("loss", "perplexity", "answer_tokens", "n")}
    return {"loss": after["loss"], "perplexity": after["perplexity"], "answer_tokens": after.get("answer_tokens"),
            "task": task, "predictions": [p["prediction"] for p in preds],
            "quality_from": _rel(pred_file.parent.resolve())}


def measure_reference(cfg, model_dir, parent_manifest, rows, eval_cfg, work, clock, speed: bool = True) -> dict:
    """The input model's measurements: quality from its training run when that scored the same rows, else measured
    here; speed and memory measured here (skipped on the fast path: size only)."""
    from core.artifacts import dir_size
    from evaluation.measure import measure_in_child

    known = training_quality(Path(cfg.input), parent_manifest, rows, cfg.eval is None)
    if known and not speed:
        reference = {"size_mb": round(dir_size(model_dir) / 2**20, 1), "load_peak_rss_mb": None, "prefill_ms": None,
                     "decode_tokens_per_s": None}
    else:
        log.info("measuring the input model (PyTorch fp32)" + (": speed only, its quality is the training run's "
                                                               "evaluation of the same rows" if known else ""))
        reference = measure_in_child("reference", "pytorch", model_dir, rows, eval_cfg,
                                     cfg.measure.model_copy(update={"batch": 0}), work / "measure",
                                     quality=known is None)
        _clock_measure(clock, reference)
    reference.update(known or {})
    reference["params_m"] = _params(model_dir)
    return reference


def build_and_measure(cfg, v, builder, reference, rows, eval_cfg, out, parent, run_id, clock, fast: bool):
    """Build variant `v` into `out/<name>`, measure it, gate it and write its manifest; returns (report row,
    run-manifest entry). A variant that cannot be built here (a GPU method) is recorded as skipped."""
    from evaluation.measure import measure_in_child

    from .quantize import Unavailable

    vdir = out / v.name
    try:
        record = builder.build(v, vdir)
    except Unavailable as exc:
        log.info(f"[{v.name}] skipped: {exc}")
        shutil.rmtree(vdir, ignore_errors=True)
        return {"name": v.name, "skipped": str(exc)}, {"skipped": str(exc), "method": v.model_dump()}
    log.info(f"[{v.name}] built in {record['seconds']:.0f} s; measuring")
    # the fast path takes the first fit variant whatever its speed: one timing run, no batched one
    measure_cfg = cfg.measure.model_copy(update={"runs": 1, "batch": 0}) if fast else cfg.measure
    measured = measure_in_child(v.name, v.format, vdir, rows, eval_cfg, measure_cfg, out / "_work" / "measure",
                                openvino=cfg.openvino.model_dump())
    _clock_measure(clock, measured)
    measured["params_m"] = _params(builder.student(v)[0])
    json_fields = list(eval_cfg.json_fields)
    g = gate(reference, measured, cfg, json_fields)
    row_summary = summary(measured, reference, json_fields)
    preds = measured.pop("predictions")
    (vdir / "predictions.jsonl").write_text("".join(json.dumps({"prediction": p}) + "\n" for p in preds))
    artifacts.write_json(vdir / artifacts.MANIFEST, {
        "stage": "compress", "variant": v.name, "run_id": run_id, "parent": parent,
        "method": v.model_dump(), "settings": _used_settings(cfg, v), "build": record,
        "measured": measured, "summary": row_summary, "gate": g,
        "serve": {"backend": BACKEND[v.format], "model_dir": ".",
                  "file_name": _onnx_file(vdir) if v.format == "onnx" else None},
        "created_at": artifacts.now(),
    })
    speed = (f"{row_summary['decode_tokens_per_s']:.1f} tok/s ({row_summary['x_decode']:.2f}x)"
             if row_summary["x_decode"] is not None else f"{row_summary['decode_tokens_per_s']:.1f} tok/s")
    log.info(f"[{v.name}] {row_summary['size_mb']:.0f} MB ({row_summary['x_smaller']:.2f}x smaller), {speed}, task "
             f"{row_summary['task_score']:.3f} -> {'fit' if g['fit'] else 'UNFIT'}")
    row = {"name": v.name, "kind": v.format, **row_summary, "fit": g["fit"], "drop": g["drop"]}
    return row, {"fit": g["fit"], "summary": row_summary, "gate": g, "path": v.name, "format": v.format}


def _clock_measure(clock: PhaseClock, measured: dict) -> None:
    for phase, seconds in (measured.get("seconds") or {}).items():
        clock.add(f"measure {phase}", seconds)


def gate(reference: dict, measured: dict, cfg: CompressConfig, json_fields: list[str]) -> dict:
    ref, got = task_score(reference, json_fields), task_score(measured, json_fields)
    drop = round(ref - got, 4)
    return {"metric": "exact_match" if json_fields else "rougeL", "reference": ref, "score": got, "drop": drop,
            "max_drop": cfg.gate.max_task_drop, "fit": drop <= cfg.gate.max_task_drop + 1e-9}


def recommend(rows: list[dict], how: str) -> str | None:
    fit = [r for r in rows if r.get("fit") and r["name"] != "reference"]
    if not fit:
        return None
    if how == "smallest":
        return min(fit, key=lambda r: r["size_mb"])["name"]
    key = ("batch_decode_tokens_per_s" if all(r.get("batch_decode_tokens_per_s") for r in fit)
           else "decode_tokens_per_s")  # at the serving batch when every fit variant was timed there
    return max(fit, key=lambda r: r[key])["name"]


# ---------------------------------------------------------------- writing the run
def write_report(cfg, out, report_rows, reference, best, json_fields, clock) -> str:
    metric = "exact_match" if json_fields else "rougeL"
    md = markdown(report_rows, best, metric)
    if reference.get("quality_from"):
        md += (f"The input model's perplexity, task score and predictions are its training run's evaluation of the "
               f"same rows ({reference['quality_from']}); its speed and memory were measured here.\n")
    md += "\n" + clock.summary() + "\n"
    (out / "report.md").write_text(md)
    artifacts.write_json(out / "report.json", {"rows": report_rows, "recommended": best, "metric": metric,
                                               "timings": clock.as_dict(),
                                               "reference": {k: v for k, v in reference.items()
                                                             if k != "predictions"}})
    with clock("plots"):
        plot(report_rows, out / "report.png", metric)
        floor = task_score(reference, json_fields) - cfg.gate.max_task_drop
        if reference.get("decode_tokens_per_s") is not None:
            frontier_plot(report_rows, out / "frontier.png", metric, floor)
    drift_ref = Path(cfg.input) / DRIFT_REFERENCE  # carried to serving: the variants' live drift baseline
    if drift_ref.is_file():
        shutil.copy2(drift_ref, out / DRIFT_REFERENCE)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return md


def write_manifest(cfg, out, run_id, parent, built, best, fast, clock, started_at) -> None:
    artifacts.write_json(out / artifacts.MANIFEST, {
        "stage": "compress", "run_id": run_id, "parent": parent, "config": cfg.model_dump(mode="json"),
        "config_hash": config_hash(cfg, {"output.run_id"}), "fast": fast, "variants": built, "recommended": best,
        "recommended_serve": ({"path": best, "backend": BACKEND[built[best]["format"]]} if best else None),
        "drift_reference": DRIFT_REFERENCE if (out / DRIFT_REFERENCE).is_file() else None,
        "packages": artifacts.package_versions(("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime",
                                                 "onnx", "llmstack")),
        "timings": clock.as_dict(), "started_at": started_at, "finished_at": artifacts.now(),
        "wall_seconds": round(time.time() - clock.start, 1),
    })


def _params(folder: Path) -> float | None:
    """Parameters (millions) stored in a folder's safetensors files, read from the headers only."""
    from safetensors import safe_open
    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return round(n / 1e6, 2) if n else None


def _onnx_file(folder: Path) -> str | None:
    files = sorted(p.name for p in folder.glob("*.onnx"))
    return files[0] if files else None


def _used_settings(cfg: CompressConfig, v: VariantCfg) -> dict:
    s = {}
    if v.prune != "none":
        method, drop, keep = prune_setting(v, cfg)
        s["prune"] = {**cfg.prune.model_dump(), "drop_layers": drop, "mlp_keep": keep}
    if v.distill:
        s["distill"] = {**cfg.distill.model_dump(), "steps": distill_steps(v, cfg)}
    if v.quantize != "none":
        s["quantize"] = cfg.quantize.model_dump()
    s["measure"] = cfg.measure.model_dump()
    return s
