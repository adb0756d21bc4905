"""The `tracking:` section of the training and compress configs."""
from __future__ import annotations

import os

from core.config import Section

DEFAULT_URI = "sqlite:///artifacts/mlflow/mlflow.db"
OFF_ENV = "LLMSTACK_TRACKING"


class _Store(Section):
    enabled: bool = True
    uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else a local SQLite store in artifacts/mlflow/ (browse it
    with `make mlflow`). A shared server: http://mlflow.internal:5000."""

    def active(self) -> bool:
        return self.enabled and os.environ.get(OFF_ENV, "").lower() not in ("off", "0", "false", "no")

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class TrackingCfg(_Store):
    enabled: bool = True
    """Log the run to MLflow when its artifact is complete (environment LLMSTACK_TRACKING=off turns it off too). A
    tracking failure is a warning, never a failed run."""
    experiment: str = ""
    """Experiment name; empty: llmstack-<stage> (llmstack-train, llmstack-compress, llmstack-tune)."""


class RegistryCfg(_Store):
    enabled: bool = True
    """`llmstack serve` registers what it serves in the MLflow model registry (a version per served folder, lineage
    tags) and points `alias` at it (LLMSTACK_TRACKING=off turns it off too; a failure is a warning)."""
    name: str = "llmstack"
    """The registered model's name: `llmstack serve --model models:/<name>@<alias>` serves what the alias names."""
    alias: str = "production"
    """The alias set to the served version."""
