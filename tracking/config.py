"""The `tracking:` section of the training and compress configs."""
from __future__ import annotations

import os

from core.config import Section

DEFAULT_URI = "sqlite:///artifacts/mlflow/mlflow.db"
OFF_ENV = "LLMSTACK_TRACKING"


class TrackingCfg(Section):
    enabled: bool = True
    """Log the run to MLflow when its artifact is complete (environment LLMSTACK_TRACKING=off turns it off too). A
    tracking failure is a warning, never a failed run."""
    uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else a local SQLite store in artifacts/mlflow/ (browse it
    with `make mlflow`). A shared server: http://mlflow.internal:5000."""
    experiment: str = ""
    """Experiment name; empty: llmstack-<stage> (llmstack-train, llmstack-compress, llmstack-tune)."""

    def active(self) -> bool:
        return self.enabled and os.environ.get(OFF_ENV, "").lower() not in ("off", "0", "false", "no")

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
