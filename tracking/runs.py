"""One MLflow run per finished artifact, read from the artifact folder itself (its manifest.json): parameters (the
resolved config, flattened), metrics (the manifest's numbers: before / after, training figures, each compress
variant's measurements; the loss curve per step from the trainer's history), artifacts (model card, data report,
plots, metrics.json, manifest.json) and tags (stage, run id, parent run id, the artifact's path).

`record` never raises: a tracking server that is down or refuses the run is a warning, and the artifact stands."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from core import artifacts
from core.log import log

from .config import TrackingCfg

FILES = ("README.md", "data_report.md", "report.md", "trials.md", "fairness.md", "metrics.json", artifacts.MANIFEST,
         artifacts.TRAIN_HISTORY)
MAX_PARAM = 6000  # MLflow's limit on a parameter value


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and not all(isinstance(x, (str, int, float, bool)) or x is None for x in obj):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def params(manifest: dict) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in _flat(manifest.get("config") or {}).items()}


def metrics(manifest: dict) -> dict[str, float]:
    """Every finite number under metrics / training / variants (their summaries and gates) / best of a manifest."""
    picked = {k: manifest.get(k) for k in ("metrics", "training", "best")}
    for name, v in (manifest.get("variants") or {}).items():
        picked[f"variant.{name}"] = {"summary": v.get("summary"), "gate": v.get("gate")}
    out = {}
    for k, v in _flat(picked).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k.replace("@", "_at_")] = float(v)
    return out


def steps(history: list[dict] | None) -> dict[str, list[tuple[int, float]]]:
    """Per-step series of a Hugging Face Trainer's log history (loss, learning_rate, grad_norm, eval_loss, ...)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in history or []:
        step = row.get("step")
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and step is not None and math.isfinite(v):
                out.setdefault(f"step.{k}", []).append((int(step), float(v)))
    return out


def record(folder: Path, cfg: TrackingCfg, history: list[dict] | None = None) -> str | None:
    """Log the artifact in `folder` as one MLflow run; its MLflow run id, or None (off, or failed: a warning).
    history: the trainer's per-step log (default: the artifact's train_history.json, when it has one)."""
    if not cfg.active():
        return None
    try:
        return _record(Path(folder), cfg, history)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a run
        log.warning(f"warning: MLflow tracking failed ({type(exc).__name__}: {exc}); the artifact {folder} is "
                    f"complete, only its tracking entry is missing")
        return None


def ensure_sqlite_folder(uri: str) -> str:
    """A relative SQLite store's folder is created (MLflow creates the file, not its folder)."""
    if uri.startswith("sqlite:///"):  # sqlite:///relative/path or sqlite:////absolute/path
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _client(cfg: TrackingCfg):
    from mlflow import MlflowClient

    uri = ensure_sqlite_folder(cfg.resolved_uri())
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def _record(folder: Path, cfg: TrackingCfg, history: list[dict] | None) -> str:
    from mlflow.entities import Metric, Param

    manifest = json.loads((folder / artifacts.MANIFEST).read_text())
    if history is None and (folder / artifacts.TRAIN_HISTORY).is_file():
        history = json.loads((folder / artifacts.TRAIN_HISTORY).read_text())
    stage = manifest.get("stage", "run")
    client, uri = _client(cfg)
    parent = manifest.get("parent") or {}
    tags = {"llmstack.stage": stage, "llmstack.run_id": manifest.get("run_id", folder.name),
            "llmstack.artifact": os.path.relpath(folder), "mlflow.runName": manifest.get("run_id", folder.name),
            "llmstack.parent_run_id": str(parent.get("run_id", "")) if isinstance(parent, dict) else ""}
    tags |= {str(k): str(v) for k, v in (manifest.get("tags") or {}).items()}  # what a stage adds, e.g. a decision
    run = client.create_run(experiment_id(client, cfg.experiment or f"llmstack-{stage}"), tags=tags)
    rid, now = run.info.run_id, int(time.time() * 1000)
    ps = [Param(k, v[:MAX_PARAM]) for k, v in params(manifest).items()]
    ms = [Metric(k, v, now, 0) for k, v in metrics(manifest).items()]
    ms += [Metric(k, v, now, s) for k, series in steps(history).items() for s, v in series]
    for i in range(0, len(ps), 100):
        client.log_batch(rid, params=ps[i:i + 100])
    for i in range(0, len(ms), 1000):
        client.log_batch(rid, metrics=ms[i:i + 1000])
    for f in [folder / n for n in FILES] + sorted(folder.glob("*.png")):
        if f.is_file():
            client.log_artifact(rid, str(f))
    client.set_terminated(rid)
    log.info(f"MLflow: run {rid} in experiment {cfg.experiment or 'llmstack-' + stage} ({uri})")
    return rid
