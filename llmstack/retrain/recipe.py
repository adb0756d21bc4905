"""`llmstack retrain`: served traffic → a new model → old vs new → a promotion decision (→ the swap, with --promote).

    select traffic → train the candidate (continuing the served model's training, its own rows in the mix) →
    compress it (fast path) → score served and candidate on the same held-out rows and drifted rows → decide by the
    rule → record (artifacts/retrain/<run>/, MLflow) → promote (swap the running service, registry alias)

The stages run as they do on their own (training, compression, evaluation in child processes); they meet here only
through their artifact folders. The candidate's artifacts go under artifacts/retrain/, so artifacts/train/latest and
artifacts/compress/latest stay what was promoted before.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from core import artifacts
from core.config import dump_yaml, load, validate
from core.errors import ArtifactError, ConfigError, DataError
from core.log import log

from . import traffic
from .config import RetrainConfig


@dataclass
class Served:
    """The model being served, and the training artifact its lineage leads to."""
    ref: str
    folder: Path  # what serving loads: a variant folder or a merged model
    kind: str  # onnx | pytorch (for the evaluation)
    stage: str  # compress | train
    training: Path
    config: Any = None  # the training artifact's resolved TrainConfig (read once)
    lineage: dict = field(default_factory=dict)


def run(cfg: RetrainConfig, promote: bool = False) -> Path:
    served = locate_served(cfg.served)
    root = Path(cfg.output_dir)
    artifacts.clean_stale(root)
    run_id = artifacts.new_run_id()
    clock = artifacts.Phases(log)
    started_at = artifacts.now()
    with artifacts.atomic_dir(root / "traffic", run_id) as rows_dir:  # the selected rows: the candidate's data
        selected = select_traffic(cfg, served, rows_dir)
    rows_dir = root / "traffic" / run_id
    selected["folder"] = _rel(rows_dir)
    clock("select")
    with artifacts.atomic_dir(root, run_id) as out:
        trained = train_candidate(cfg, served, rows_dir / "traffic_train.jsonl", out)
        clock("train")
        candidate = compress_candidate(cfg, served, trained)
        clock("compress")
        scores = compare(cfg, served, candidate, rows_dir, out)
        clock("evaluate")
        decision = decide(scores, cfg)
        manifest = record(cfg, run_id, served, selected, trained, candidate, scores, decision, started_at)
        print("\n" + report_markdown(manifest))
        failure = None
        if promote:
            manifest["promoted"], failure = promote_candidate(cfg, candidate.folder, decision)
        manifest.update(finished_at=artifacts.now(), timings=clock.timings)
        (out / "report.md").write_text(report_markdown(manifest))
        artifacts.write_json(out / artifacts.MANIFEST, manifest)
    final = root / run_id
    artifacts.set_latest(root, run_id)
    from tracking import runs as tracking_runs
    tracking_runs.record(final, cfg.tracking)
    print(f"retrain record: {final}  (latest: {root / 'latest'})")
    if failure is not None:
        raise failure
    return final


# ---------------------------------------------------------------- 1. what is served
def model_kind(ref: str | Path) -> tuple[str, Path]:
    """(how evaluation.measure loads it: onnx | openvino | pytorch, the folder) for what `llmstack serve` would serve
    given `ref` (a compress run's recommended variant, a variant, a training artifact's merged model, a folder)."""
    from serving.model_ref import resolve

    r = resolve(ref)
    return {"onnxruntime": "onnx", "openvino": "openvino"}.get(r.backend, "pytorch"), r.folder.resolve()


def locate_served(ref: str) -> Served:
    """The served model's folder and the training artifact behind it (a compress variant's parent, or itself)."""
    kind, folder = model_kind(ref)
    where = folder.parent if folder.name == "merged" else folder
    m = artifacts.read_manifest(where) if (where / artifacts.MANIFEST).is_file() else {}
    stage = m.get("stage")
    if stage == "train":
        training = where
    elif stage == "compress":
        training = artifacts.parent_folder(m, where)
    else:
        training = None
    if training is None or not (training / artifacts.MANIFEST).is_file():
        raise ArtifactError("retraining needs the served model's training artifact (its config and data): serve a "
                            "compress variant or a training artifact made by `llmstack train`", file=folder,
                            field="served")
    from training.config import TrainConfig

    training = training.resolve()
    config = validate(TrainConfig, artifacts.read_manifest(training)["config"], file=training / artifacts.MANIFEST)
    lineage = {"stage": stage, "run_id": m.get("run_id"), "variant": m.get("variant")}
    return Served(ref, folder, kind, stage, training, config, lineage)


# ---------------------------------------------------------------- 2. which traffic
def select_traffic(cfg: RetrainConfig, served: Served, out: Path) -> dict:
    """The selected rows, split into traffic_train.jsonl and (without evaluate.drifted) drifted_holdout.jsonl."""
    t = cfg.traffic
    counts: dict = {}
    if t.select == "review":
        rows, counts = traffic.read_review(t.review)
        source = f"review file {t.review}: {counts['accepted']} accepted, {counts['corrected']} corrected, " \
                 f"{counts['rejected']} rejected, {counts['pending']} not reviewed"
    else:
        reference = None
        if t.select == "drifted":
            from monitoring import drift
            found = drift.find_reference(served.folder)
            if found is None:
                raise ArtifactError("traffic.select=drifted needs the served model's drift reference", file=served.folder,
                                    field="traffic.select", hint="select review or all instead")
            reference = drift.Reference.load(found)
        rows = traffic.from_log(t.request_log, out / "logged.jsonl", t.select == "drifted", reference, t.since_hours)
        source = f"request log {t.request_log}: {len(rows)} {t.select} requests with the served model's answers"
    held: list[dict] = []
    train_rows = rows
    if not cfg.evaluate.drifted:
        train_rows, held = traffic.split(rows, t.holdout, t.seed)
    if len(train_rows) < t.min_rows:
        raise DataError(f"{len(train_rows)} selected rows to train on, fewer than traffic.min_rows={t.min_rows} "
                        f"({source})", field="traffic.min_rows",
                        hint="send more traffic, review more rows, or lower traffic.min_rows")
    if cfg.evaluate.drifted:
        _refuse_leak(train_rows, cfg.evaluate.drifted)
    traffic.write_jsonl(out / "traffic_train.jsonl", [{"messages": r["messages"]} for r in train_rows])
    if held:
        traffic.write_jsonl(out / "drifted_holdout.jsonl", [{"messages": r["messages"]} for r in held])
    log.info(f"retrain: {len(train_rows)} traffic rows to train on, {len(held)} held out ({source})")
    return {"select": t.select, "source": source, "review_counts": counts, "train_rows": len(train_rows),
            "holdout_rows": len(held), "file": "traffic_train.jsonl"}


def _refuse_leak(train_rows: list[dict], scored: str) -> None:
    """Rows scored as the drifted evaluation must not be trained on (the score would measure memory)."""
    from chatdata.config import DataCfg, DatasetSpec
    from chatdata.pipeline import read_rows

    prompts = {json.dumps(r["messages"][:-1], sort_keys=True) for r in train_rows}
    both = [e for e in read_rows(DatasetSpec(path=scored), DataCfg())
            if json.dumps(e.prompt_messages(), sort_keys=True) in prompts]
    if both:
        raise DataError(f"{len(both)} rows of the drifted evaluation are also selected for training (e.g. "
                        f"{both[0].source})", file=scored, field="evaluate.drifted",
                        hint="reject them in the review file, or score on other rows")


# ---------------------------------------------------------------- 3. the candidate
def train_candidate(cfg: RetrainConfig, served: Served, traffic_file: Path, out: Path) -> Path:
    """A fine-tune continuing the served model's training artifact (the manifest's parent) on the traffic plus its
    own training rows, with its own config otherwise (training.overrides on top)."""
    from training.config import TrainConfig
    from training.sft import recipe as sft

    base = served.config.model_dump(mode="json")
    base.update(recipe="sft", curriculum={}, preference={})
    base["model"]["name_or_path"] = str(served.training)  # its merged weights; becomes the parent
    own = original_data(served, base["data"])
    for spec in own["train"]:
        spec["weight"] = spec.get("weight", 1.0) * cfg.training.original_share
    base["data"].update(train=[{"path": str(traffic_file.resolve()), "weight": cfg.training.traffic_weight}]
                        + own["train"], validation=own["validation"], test=own["test"], augment={}, reweigh={})
    base["output"] = {"dir": cfg.training.output_dir}
    cfg_file = out / "train.yaml"
    cfg_file.write_text(dump_yaml(validate(TrainConfig, base)))
    train_cfg = load(TrainConfig, cfg_file, cfg.training.overrides)
    return Path(sft.run(train_cfg)).resolve()


def original_data(served: Served, data: dict) -> dict[str, list[dict]]:
    """The served training run's splits: the rows it saved (data/<split>.jsonl: after its cleaning, mixing and
    augmentation), or, for an artifact made before splits were saved, the files its config names."""
    saved = served.training / "data"
    out = {}
    for split in ("train", "validation", "test"):
        f = saved / f"{split}.jsonl"
        out[split] = [{"path": str(f)}] if f.is_file() else [dict(s) for s in data.get(split) or []]
    return out


def compress_candidate(cfg: RetrainConfig, served: Served, trained: Path) -> SimpleNamespace:
    """The folder to serve: the fast compress path's recommended variant (when the served model is a compress
    variant, or compress.enabled is true), else the training artifact's merged model."""
    wanted = cfg.compress.enabled == "true" or (cfg.compress.enabled == "auto" and served.stage == "compress")
    if not wanted:
        kind, folder = model_kind(trained)
        return SimpleNamespace(folder=folder, kind=kind, path=trained)
    from compression import run as compress_run
    from compression.config import CompressConfig

    ccfg = load(CompressConfig, cfg.compress.config, [f"input={trained}", f"output.dir={cfg.compress.output_dir}"])
    run_dir = compress_run.run(ccfg, fast=True)
    try:
        kind, folder = model_kind(run_dir)
    except ArtifactError as exc:
        raise ArtifactError(f"the candidate's compress run recommends no variant ({exc.message}): nothing passed "
                            "the gate", file=run_dir, field="compress") from None
    return SimpleNamespace(folder=folder, kind=kind, path=run_dir)


# ---------------------------------------------------------------- 4. old vs new
def compare(cfg: RetrainConfig, served: Served, candidate, rows_dir: Path, out: Path) -> dict[str, dict[str, dict]]:
    """{set: {served | candidate: metrics}} on the held-out rows and the drifted rows, the same rows for both; the
    predictions in out/predictions/."""
    from chatdata.config import DataCfg, DatasetSpec
    from chatdata.pipeline import encode, read_rows
    from compression.config import CompressConfig
    from evaluation.measure import measure_in_child, spec_rows
    from modeling.model import load_tokenizer

    tcfg = served.config
    held_out = [s["path"] for s in original_data(served, tcfg.data.model_dump())["test"]]
    sets = {"held_out": [cfg.evaluate.heldout] if cfg.evaluate.heldout else held_out,
            "drifted": [cfg.evaluate.drifted or str(rows_dir / "drifted_holdout.jsonl")]}
    tok = load_tokenizer(str(served.folder))
    data_cfg = DataCfg(max_seq_len=tcfg.data.max_seq_len)
    eval_cfg = SimpleNamespace(max_new_tokens=tcfg.eval.max_new_tokens, batch_size=tcfg.eval.batch_size,
                               json_fields=list(tcfg.eval.json_fields))
    measure_cfg = SimpleNamespace(threads=0, decode_tokens=8, runs=1, batch=0)  # scores, not timings
    openvino = load(CompressConfig, cfg.compress.config).openvino.model_dump()  # as compression measures IR models
    scores: dict[str, dict[str, dict]] = {}
    for name, paths in sets.items():
        examples = []
        for path in paths:
            if not Path(path).is_file():
                raise DataError("no labelled rows to score on", file=path, field=f"evaluate.{name}")
            examples += read_rows(DatasetSpec(path=path), data_cfg)
        for e in examples:
            encode(tok, e)
        rows = spec_rows(examples, cfg.evaluate.max_rows, tok)
        scores[name] = {}
        for who, model in (("served", served), ("candidate", candidate)):
            log.info(f"retrain: scoring the {who} model on {len(rows)} {name} rows")
            measured = measure_in_child(f"{who}-{name}", model.kind, model.folder, rows, eval_cfg, measure_cfg,
                                        out / "_measure", openvino=openvino)
            scores[name][who] = flat(measured["task"]) | {"n": len(rows)}
            preds = [{"reference": r["messages"][-1]["content"], "prediction": p}
                     for r, p in zip(rows, measured["predictions"])]
            traffic.write_jsonl(out / "predictions" / f"{who}-{name}.jsonl", preds)
    shutil.rmtree(out / "_measure", ignore_errors=True)
    if cfg.evaluate.metric not in scores["held_out"]["served"]:
        raise ConfigError(f"no metric '{cfg.evaluate.metric}' (there are: "
                          f"{', '.join(k for k in scores['held_out']['served'] if k != 'n')})", field="evaluate.metric")
    return scores


def flat(task: dict) -> dict:
    out = {k: v for k, v in task.items() if isinstance(v, (int, float))}
    out.update({f"{f}_accuracy": v for f, v in (task.get("field_accuracy") or {}).items()})
    return out


# ---------------------------------------------------------------- 5. the rule
def decide(scores: dict, cfg: RetrainConfig) -> dict:
    """Promote when the held-out metric drops by at most max_heldout_drop and the drifted metric gains more than
    min_drifted_gain; the reasons in words either way."""
    m, rule = cfg.evaluate.metric, cfg.promotion
    held = scores["held_out"]["candidate"][m] - scores["held_out"]["served"][m]
    gain = scores["drifted"]["candidate"][m] - scores["drifted"]["served"][m]
    checks = {"no_heldout_regression": held >= -rule.max_heldout_drop - 1e-9,
              "drifted_gain": gain > rule.min_drifted_gain + 1e-9}
    reasons = [f"held-out {m} {held:+.3f} ({'within' if checks['no_heldout_regression'] else 'beyond'} the allowed "
               f"drop of {rule.max_heldout_drop})",
               f"drifted {m} {gain:+.3f} ({'more' if checks['drifted_gain'] else 'not more'} than "
               f"{rule.min_drifted_gain})"]
    return {"promote": all(checks.values()), "checks": checks, "heldout_change": round(held, 4),
            "drifted_change": round(gain, 4), "reasons": reasons}


def record(cfg: RetrainConfig, run_id: str, served: Served, selected: dict, trained: Path, candidate, scores: dict,
           decision: dict, started_at: str) -> dict:
    """The retrain manifest: the lineage served → candidate, the selection, both models' scores, the rule and the
    decision (also an MLflow tag)."""
    return {"stage": "retrain", "run_id": run_id,
            "parent": {"stage": served.stage, "run_id": served.lineage.get("run_id"), "path": _rel(served.folder),
                       "training": _rel(served.training)},
            "traffic": selected,
            "candidate": {"training": _rel(trained), "folder": _rel(candidate.folder), "kind": candidate.kind},
            "metrics": {s: {m: v[cfg.evaluate.metric] for m, v in d.items()} for s, d in scores.items()},
            "evaluation": scores, "rule": cfg.promotion.model_dump(), "metric": cfg.evaluate.metric,
            "decision": decision, "config": cfg.model_dump(mode="json"), "started_at": started_at,
            "tags": {"llmstack.decision": "promote" if decision["promote"] else "keep"}}


def report_markdown(manifest: dict) -> str:
    m, d, s = manifest["metric"], manifest["decision"], manifest["evaluation"]
    lines = [f"# Retrain {manifest['run_id']}", "",
             f"Served: `{manifest['parent']['path']}` (training `{manifest['parent']['training']}`)  ",
             f"Candidate: `{manifest['candidate']['folder']}` (training `{manifest['candidate']['training']}`)  ",
             f"Traffic: {manifest['traffic']['source']}; {manifest['traffic']['train_rows']} rows trained on, "
             f"{manifest['traffic']['holdout_rows']} held out", "",
             f"| rows | n | served {m} | candidate {m} | change |", "|---|---|---|---|---|"]
    for name, who in s.items():
        lines.append(f"| {name.replace('_', '-')} | {who['served']['n']} | {who['served'][m]:.3f} | "
                     f"{who['candidate'][m]:.3f} | {who['candidate'][m] - who['served'][m]:+.3f} |")
    verdict = "**promote**" if d["promote"] else "**keep the served model**"
    lines += ["", f"Decision: {verdict}: " + "; ".join(d["reasons"]) + "."]
    done = manifest.get("promoted")
    if done:
        lines += ["", f"Promoted: the service at {done['service']} answers from '{done['model']}'" if done["swapped"]
                  else f"Not swapped: {done.get('error') or done.get('why')}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- 6. promotion
def promote_candidate(cfg: RetrainConfig, folder: Path, decision: dict):
    """(what the record says about the promotion, the error to raise once the record is written or None)."""
    from core.errors import StackError
    from llmstack.commands.reload import swap

    if not decision["promote"]:
        print("--promote: the rule says keep the served model; nothing swapped")
        return {"swapped": False, "why": "the rule says keep the served model"}, None
    try:
        result = swap(cfg.service.url, str(folder), os.environ.get(cfg.service.api_key_env))
    except StackError as exc:
        return {"swapped": False, "error": str(exc)}, exc
    print(f"--promote: the service at {cfg.service.url} now answers from '{result['model']}' (was "
          f"'{result['previous']}')")
    version = None
    if cfg.registry.enabled:
        from tracking import registry
        version = registry.register(folder, cfg.registry)
    return {"swapped": True, "at": artifacts.now(), "service": cfg.service.url, "model": result["model"],
            "previous": result["previous"], "registry_version": version}, None


def _rel(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel
