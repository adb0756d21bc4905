"""`llmstack track`: log finished artifacts to MLflow (those made with tracking off, or before it existed)."""
from __future__ import annotations


def run(args) -> int:
    from pathlib import Path

    from core import artifacts
    from core.errors import ArtifactError
    from tracking.config import TrackingCfg
    from tracking.runs import record

    cfg = TrackingCfg(uri=args.uri or "", experiment=args.experiment or "")
    if not cfg.active():
        print("tracking is off (LLMSTACK_TRACKING=off): nothing logged")
        return 1
    failed = 0
    for a in args.artifacts:
        folder = Path(a).resolve() if Path(a).is_symlink() else Path(a)
        if not (folder / artifacts.MANIFEST).is_file():
            raise ArtifactError("not an artifact folder (no manifest.json)", file=folder,
                                hint="a folder under artifacts/train, artifacts/compress or artifacts/tune")
        rid = record(folder, cfg)
        print(f"{a}: MLflow run {rid}" if rid else f"{a}: not logged (see the warning above)")
        failed += rid is None
    return 1 if failed else 0


def register(sub) -> None:
    t = sub.add_parser("track", help="log finished artifacts to MLflow (experiment tracking)",
                       description="Log training, tune or compress artifacts as MLflow runs (the config as "
                       "parameters, the manifest's numbers and the per-step loss as metrics, reports and plots as "
                       "artifacts, lineage tags), as `llmstack train` / `compress` / `tune` do when they finish. "
                       "For artifacts made with tracking off or before it existed. Browse with `make mlflow`.")
    t.add_argument("artifacts", nargs="+", help="artifact folders, e.g. artifacts/train/latest")
    t.add_argument("--uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///artifacts/mlflow/mlflow.db)")
    t.add_argument("--experiment", help="experiment name (default: llmstack-<stage>)")
    t.set_defaults(func=run)
