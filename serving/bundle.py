"""A model folder imported into the BentoML model store by `llmstack bento` (deploy/bento.py) carries
`llmstack_model.json`: what `llmstack serve` knew about it (served name, backend, lineage, drift reference). The
service reads it back here, so a Bento serves its model as `llmstack serve` would have named it."""
from __future__ import annotations

import json
from pathlib import Path

MODEL_NAME = "llmstack-model"
BUNDLE_INFO = "llmstack_model.json"  # written into the stored model: what `llmstack serve` knew about it


def bundled(folder: str | Path) -> dict | None:
    """The import-time description of a stored model folder, or None for any other folder."""
    f = Path(folder) / BUNDLE_INFO
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
