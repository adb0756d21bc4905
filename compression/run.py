"""`llmstack compress`: build every configured variant from the input model, measure all of them (and the input model)
the same way in one run, gate them on task quality, and write one artifact folder with a report and a recommendation.

Layout: `<output.dir>/<run-id>/` holds `<variant>/` (model files + manifest.json each), `report.json`, `report.md`,
`report.png` and the run's `manifest.json` (parent artifact, config, per-variant summary, `recommended`). The run is
written into a temporary folder and renamed when complete, like training artifacts.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from llmstack import artifacts
from llmstack.config import config_hash, dump_yaml, validate
from llmstack.errors import ArtifactError, ConfigError
from llmstack.log import log

from .config import GPU_QUANT, CompressConfig, VariantCfg
from .export import SIDE_FILES, copy_side_files

TOKENIZER_FILES = [n for n in SIDE_FILES if n not in ("config.json", "generation_config.json")]

BACKEND = {"onnx": "onnxruntime", "pytorch": "transformers"}


DRIFT_REFERENCE = "drift_reference.json"  # written by training (monitoring.drift.FILE)


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


def _settings(cfg: CompressConfig, manifest: dict | None):
    """Data and eval sections: the config's, else those of the training artifact whose manifest is given."""
    from training.config import TrainConfig

    train_cfg = validate(TrainConfig, manifest["config"], file=Path(cfg.input) / artifacts.MANIFEST) if manifest else None
    data = cfg.data or (train_cfg.data if train_cfg else None)
    ev = cfg.eval or (train_cfg.eval if train_cfg else None)
    if data is None or ev is None:
        raise ConfigError("a plain model folder has no training config to take data and eval settings from",
                          field="data" if data is None else "eval", hint="add data: and eval: sections to the config")
    return data, ev, train_cfg


class Builder:
    """Builds variants with shared intermediate steps cached: one pruned/distilled student per (prune, distill)
    and one fp32 ONNX export per student, whatever the number of variants using them."""

    def __init__(self, cfg: CompressConfig, model_dir: Path, prepared, data_cfg, work: Path):
        self.cfg, self.model_dir, self.prepared, self.data_cfg, self.work = cfg, model_dir, prepared, data_cfg, work
        self.students: dict[tuple, tuple[Path, dict]] = {}
        self.exports: dict[tuple, tuple[Path, dict]] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from training.model import load_tokenizer
            self._tokenizer = load_tokenizer(str(self.model_dir))
        return self._tokenizer

    def calibration(self, n: int) -> list[list[int]]:
        from .prune import calibration_ids
        return calibration_ids(self.prepared.train, n)

    def smoothing(self, v: VariantCfg) -> float | None:
        """The SmoothQuant alpha variant `v` gets (int8 variants only), None for none."""
        return self.cfg.quantize.smooth_alpha if v.quantize.startswith("int8") else None

    def key(self, v: VariantCfg) -> tuple:
        return (v.prune, v.distill, self.smoothing(v))

    def student(self, v: VariantCfg) -> tuple[Path, dict]:
        """The PyTorch model folder after pruning, distillation and SmoothQuant (the input folder itself when none)."""
        return self._student(*self.key(v), name=v.name)

    def _student(self, prune: str, distill: bool, alpha: float | None, name: str) -> tuple[Path, dict]:
        key = (prune, distill, alpha)
        if key == ("none", False, None):
            return self.model_dir, {}
        if key in self.students:
            return self.students[key]
        from training.model import load_model

        from . import prune as pr
        t0 = time.time()
        if alpha is not None:  # smoothing comes last: it keeps the function of whatever model it is given
            base, steps = self._student(prune, distill, None, name)
            steps = dict(steps)
            model = load_model(str(base), "float32", "sdpa_gqa")
            from .smooth import smooth
            calib = self.calibration(self.cfg.quantize.calibration_samples)
            log.info(f"[{name}] SmoothQuant (alpha {alpha}) on {len(calib)} calibration rows")
            steps["smooth"] = smooth(model, calib, alpha)
        else:
            steps = {}
            model = load_model(str(self.model_dir), "float32", "sdpa_gqa")
            p = self.cfg.prune
            if prune != "none":
                calib = self.calibration(p.calibration_samples)
                log.info(f"[{name}] pruning ({prune}) on {len(calib)} calibration rows")
                if prune in ("depth", "depth+width"):
                    steps["prune_depth"] = pr.prune_depth(model, p.drop_layers, calib)
                if prune in ("width", "depth+width"):
                    steps["prune_width"] = pr.prune_width(model, calib, p.mlp_keep, p.heads_keep)
                if prune == "sparsity":
                    steps["sparsify"] = pr.sparsify(model, calib, p.sparsity, p.sparsity_method)
            if distill:
                from .distill import distill as run_distill
                teacher = load_model(str(self.model_dir), "float32", "sdpa_gqa")
                log.info(f"[{name}] distilling from the input model ({self.cfg.distill.steps} steps at most, "
                         f"{self.cfg.distill.max_minutes:g} min at most)")
                steps["distill"] = run_distill(model, teacher, self.prepared.train, self.tokenizer.pad_token_id,
                                               self.cfg.distill, self.data_cfg.max_seq_len,
                                               keep_sparsity=prune == "sparsity")  # zeros stay zeros
                del teacher
        folder = self.work / ("student-" + _slug(key))
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        copy_side_files(self.model_dir, folder, TOKENIZER_FILES)  # verbatim: our fixed tokenizer files
        steps["seconds_student"] = round(time.time() - t0, 1)
        self.students[key] = (folder, steps)
        return folder, steps

    def onnx(self, v: VariantCfg, pt_folder: Path) -> tuple[Path, dict]:
        """fp32 ONNX export of a student, gated on parity with its PyTorch model."""
        key = self.key(v)
        if key in self.exports:
            return self.exports[key]
        from .export import check_parity, export_onnx

        folder = self.work / ("onnx-" + _slug(key))
        t0 = time.time()
        log.info(f"[{v.name}] exporting to ONNX with KV cache (optimum)")
        export_onnx(pt_folder, folder)  # copies config and tokenizer files itself, as every quantizer does
        seconds = round(time.time() - t0, 1)
        prompts = [e.prompt_messages() for e in self.prepared.test[:4] if e.messages is not None]
        parity = check_parity(pt_folder, folder, prompts, threads=self.cfg.measure.threads)
        log.info(f"[{v.name}] parity: max |logit diff| {parity['max_abs_logit_diff']:.2e}, greedy outputs identical")
        self.exports[key] = (folder, {"export_seconds": seconds, "parity": parity})
        return self.exports[key]

    def build(self, v: VariantCfg, out: Path) -> dict:
        """Write variant `v` into `out`; return its build record (steps, timings)."""
        from . import quantize as qz

        q = self.cfg.quantize
        record: dict = {}
        t0 = time.time()
        pt_folder, steps = self.student(v)
        record.update(steps)
        if v.format == "pytorch":
            if v.quantize in GPU_QUANT:
                calib_texts = [e.flat_text() for e in self.prepared.train[:q.calibration_samples]]
                qz.gpu_quantize(pt_folder, out, v.quantize, calib_texts)  # raises qz.Unavailable without a GPU
            else:
                shutil.copytree(pt_folder, out)
            record["seconds"] = round(time.time() - t0, 1)
            return record
        onnx_folder, info = self.onnx(v, pt_folder)
        record.update(info)
        preset = qz.cpu_preset() if q.preset == "auto" else q.preset
        t1 = time.time()
        if v.quantize == "none":
            shutil.copytree(onnx_folder, out)
        elif v.quantize == "int8_dynamic":
            qz.int8_dynamic(onnx_folder, out, preset, q.per_channel)
        elif v.quantize == "int8_static":
            qz.int8_static(onnx_folder, out, self.calibration(q.calibration_samples), preset, q.per_channel)
        elif v.quantize == "int4":
            qz.int4(onnx_folder, out, q.int4_block_size, q.int4_symmetric, q.int4_embeddings)
        if v.quantize != "none":
            record["quantize"] = {"method": v.quantize, "preset": preset if v.quantize.startswith("int8") else None,
                                  "seconds": round(time.time() - t1, 1)}
        record["seconds"] = round(time.time() - t0, 1)
        return record


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
            "quality_from": str(pred_file.parent.resolve())}


def _slug(key: tuple) -> str:
    prune, distill, alpha = key
    return prune + ("-distilled" if distill else "") + (f"-smooth{alpha:g}" if alpha is not None else "")


def task_score(measured: dict, json_fields: list[str]) -> float:
    """The gated task metric: exact match of the scored JSON fields, else ROUGE-L."""
    return measured["task"]["exact_match" if json_fields else "rougeL"]


def gate(reference: dict, measured: dict, cfg: CompressConfig, json_fields: list[str]) -> dict:
    ref, got = task_score(reference, json_fields), task_score(measured, json_fields)
    drop = round(ref - got, 4)
    return {"metric": "exact_match" if json_fields else "rougeL", "reference": ref, "score": got, "drop": drop,
            "max_drop": cfg.gate.max_task_drop, "fit": drop <= cfg.gate.max_task_drop + 1e-9}


def agreement(preds: list[str], ref_preds: list[str]) -> float:
    """Fraction of greedy generations identical to the input model's."""
    return round(sum(a == b for a, b in zip(preds, ref_preds)) / max(len(ref_preds), 1), 4)


def recommend(rows: list[dict], how: str) -> str | None:
    fit = [r for r in rows if r.get("fit") and r["name"] != "reference"]
    if not fit:
        return None
    if how == "smallest":
        return min(fit, key=lambda r: r["size_mb"])["name"]
    return max(fit, key=lambda r: r["decode_tokens_per_s"])["name"]


REPORT_COLUMNS = [("size (MB)", "size_mb", "{:.0f}"), ("x smaller", "x_smaller", "{:.2f}"),
                  ("params (M)", "params_m", "{:.1f}"), ("load peak RSS (MB)", "load_peak_rss_mb", "{:.0f}"),
                  ("prefill (ms)", "prefill_ms", "{:.0f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
                  ("x decode", "x_decode", "{:.2f}"), ("perplexity", "perplexity", "{:.3f}"),
                  ("task", "task_score", "{:.3f}"), ("agreement", "agreement", "{:.2f}")]


def markdown(rows: list[dict], recommended: str | None, metric: str) -> str:
    head = "| variant | " + " | ".join(c[0] for c in REPORT_COLUMNS) + " | gate |"
    lines = [head, "|" + "---|" * (len(REPORT_COLUMNS) + 2)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['name']} | " + " | ".join("-" for _ in REPORT_COLUMNS) + f" | skipped: {r['skipped']} |")
            continue
        cells = [f.format(r[k]) if r.get(k) is not None else "-" for _, k, f in REPORT_COLUMNS]
        verdict = "input model" if r["name"] == "reference" else ("fit" if r["fit"] else f"UNFIT (drop {r['drop']:+.3f})")
        name = f"**{r['name']}**" if r["name"] == recommended else r["name"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    lines.append("")
    lines.append(f"task = {metric} on the test rows; agreement = greedy outputs identical to the input model's; "
                 f"x = ratio to the input model (PyTorch fp32). Recommended: {recommended or 'none (no variant fit)'}.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, metric: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    names = [r["name"] for r in rows]
    colors = ["#777777" if r["name"] == "reference" else ("#2a9d8f" if r["fit"] else "#e76f51") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(axes, [("size_mb", "size on disk (MB)"), ("decode_tokens_per_s", "decode tokens/s, batch 1"),
                                       ("task_score", f"task: {metric}")]):
        ax.bar(names, [r[key] for r in rows], color=colors)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for i, r in enumerate(rows):
            ax.annotate(f"{r[key]:.2f}" if key == "task_score" else f"{r[key]:.0f}", (i, r[key]), ha="center",
                        va="bottom", fontsize=8)
    fig.suptitle("compression variants (grey: input model, green: fit, red: unfit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _params(folder: Path) -> float | None:
    """Parameters (millions) stored in a folder's safetensors files, read from the headers only."""
    import math

    from safetensors import safe_open
    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return round(n / 1e6, 2) if n else None


def run(cfg: CompressConfig) -> Path:
    import torch

    from training import data as data_mod
    from training.model import load_tokenizer

    from .measure import measure_in_child, spec_rows
    from .quantize import Unavailable

    t_start = time.time()
    started_at = artifacts.now()
    torch.set_num_threads(cfg.measure.threads or os.cpu_count())
    model_dir, parent_manifest = resolve_input(cfg.input)
    data_cfg, eval_cfg, train_cfg = _settings(cfg, parent_manifest)
    root = Path(cfg.output.dir)
    artifacts.clean_stale(root)
    run_id = cfg.output.run_id or artifacts.new_run_id()
    tokenizer = load_tokenizer(str(model_dir))
    prepared = data_mod.prepare(data_cfg, tokenizer, train_cfg.train.seed if train_cfg else 42)
    rows = spec_rows(prepared.test, cfg.measure.eval_samples, tokenizer)
    parent = {"path": str(Path(cfg.input).resolve()), "model_dir": str(model_dir.resolve()),
              "stage": parent_manifest.get("stage") if parent_manifest else None,
              "run_id": parent_manifest.get("run_id") if parent_manifest else None}
    log.info(f"compress {run_id}: input {model_dir} ({len(cfg.variants)} variants; measuring on {len(rows)} test rows)")

    with artifacts.atomic_dir(root, run_id) as out:
        work = out / "_work"
        work.mkdir()
        builder = Builder(cfg, model_dir, prepared, data_cfg, work)
        known = training_quality(Path(cfg.input), parent_manifest, rows, cfg.eval is None)
        log.info("measuring the input model (PyTorch fp32)" + (": speed only, its quality is the training run's "
                                                               "evaluation of the same rows" if known else ""))
        reference = measure_in_child("reference", "pytorch", model_dir, rows, eval_cfg, cfg.measure, work / "measure",
                                     quality=known is None)
        reference.update(known or {})
        reference["params_m"] = _params(model_dir)
        json_fields = list(eval_cfg.json_fields)
        report_rows = [{"name": "reference", "kind": "pytorch", **_summary(reference, reference, json_fields),
                        "fit": True}]
        variants: dict[str, dict] = {}
        for v in cfg.variants:
            vdir = out / v.name
            try:
                record = builder.build(v, vdir)
            except Unavailable as exc:
                log.info(f"[{v.name}] skipped: {exc}")
                shutil.rmtree(vdir, ignore_errors=True)
                variants[v.name] = {"skipped": str(exc), "method": v.model_dump()}
                report_rows.append({"name": v.name, "skipped": str(exc)})
                continue
            log.info(f"[{v.name}] built in {record['seconds']:.0f} s; measuring")
            measured = measure_in_child(v.name, "onnx" if v.format == "onnx" else "pytorch", vdir, rows, eval_cfg,
                                        cfg.measure, work / "measure")
            student_dir = builder.student(v)[0]
            measured["params_m"] = _params(student_dir)
            g = gate(reference, measured, cfg, json_fields)
            summary = _summary(measured, reference, json_fields)
            row = {"name": v.name, "kind": v.format, **summary, "fit": g["fit"], "drop": g["drop"]}
            report_rows.append(row)
            preds = measured.pop("predictions")
            (vdir / "predictions.jsonl").write_text("".join(json.dumps({"prediction": p}) + "\n" for p in preds))
            manifest = {
                "stage": "compress", "variant": v.name, "run_id": run_id, "parent": parent,
                "method": v.model_dump(), "settings": _used_settings(cfg, v), "build": record,
                "measured": measured, "summary": summary, "gate": g,
                "serve": {"backend": BACKEND[v.format], "model_dir": ".",
                          "file_name": _onnx_file(vdir) if v.format == "onnx" else None},
                "created_at": artifacts.now(),
            }
            artifacts.write_json(vdir / artifacts.MANIFEST, manifest)
            variants[v.name] = {"fit": g["fit"], "summary": summary, "gate": g, "path": v.name}
            log.info(f"[{v.name}] {summary['size_mb']:.0f} MB ({summary['x_smaller']:.2f}x smaller), "
                     f"{summary['decode_tokens_per_s']:.1f} tok/s ({summary['x_decode']:.2f}x), task "
                     f"{summary['task_score']:.3f} -> {'fit' if g['fit'] else 'UNFIT'}")
        shutil.rmtree(work)
        drift_ref = Path(cfg.input) / DRIFT_REFERENCE  # carried to serving: the variants' live drift baseline
        if drift_ref.is_file():
            shutil.copy2(drift_ref, out / DRIFT_REFERENCE)
        metric = "exact_match" if json_fields else "rougeL"
        best = recommend(report_rows, cfg.gate.recommend)
        md = markdown(report_rows, best, metric)
        if reference.get("quality_from"):
            md += (f"The input model's perplexity, task score and predictions are its training run's evaluation of the "
                   f"same rows ({reference['quality_from']}); its speed and memory were measured here.\n")
        (out / "report.md").write_text(md)
        artifacts.write_json(out / "report.json", {"rows": report_rows, "recommended": best, "metric": metric,
                                                   "reference": {k: v for k, v in reference.items()
                                                                 if k != "predictions"}})
        plot(report_rows, out / "report.png", metric)
        (out / "config.yaml").write_text(dump_yaml(cfg))
        artifacts.write_json(out / artifacts.MANIFEST, {
            "stage": "compress", "run_id": run_id, "parent": parent, "config": cfg.model_dump(mode="json"),
            "config_hash": config_hash(cfg, {"output.run_id"}), "variants": variants, "recommended": best,
            "recommended_serve": ({"path": best, "backend": BACKEND[_fmt(cfg, best)]} if best else None),
            "drift_reference": DRIFT_REFERENCE if (out / DRIFT_REFERENCE).is_file() else None,
            "packages": artifacts.package_versions(("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime",
                                                     "onnx", "llmstack")),
            "started_at": started_at, "finished_at": artifacts.now(), "wall_seconds": round(time.time() - t_start, 1),
        })
    artifacts.set_latest(root, run_id)
    print("\n" + md)
    if best is None:
        log.warning("warning: no variant passed the quality gate; serving should use the input model")
    print(f"artifact: {root / run_id}  (latest: {root / 'latest'})")
    return root / run_id


def _fmt(cfg: CompressConfig, name: str) -> str:
    return next(v.format for v in cfg.variants if v.name == name)


def _onnx_file(folder: Path) -> str | None:
    files = sorted(p.name for p in folder.glob("*.onnx"))
    return files[0] if files else None


def _used_settings(cfg: CompressConfig, v: VariantCfg) -> dict:
    s = {}
    if v.prune != "none":
        s["prune"] = cfg.prune.model_dump()
    if v.distill:
        s["distill"] = cfg.distill.model_dump()
    if v.quantize != "none":
        s["quantize"] = cfg.quantize.model_dump()
    s["measure"] = cfg.measure.model_dump()
    return s


def _summary(m: dict, ref: dict, json_fields: list[str]) -> dict:
    return {"size_mb": m["size_mb"], "x_smaller": round(ref["size_mb"] / m["size_mb"], 2),
            "params_m": m.get("params_m"), "load_peak_rss_mb": m["load_peak_rss_mb"], "prefill_ms": m["prefill_ms"],
            "decode_tokens_per_s": m["decode_tokens_per_s"],
            "x_decode": round(m["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 2),
            "perplexity": m["perplexity"], "task_score": task_score(m, json_fields),
            "agreement": agreement(m["predictions"], ref["predictions"]) if "predictions" in m else None}
