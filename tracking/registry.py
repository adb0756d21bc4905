"""The model registry (MLflow): `llmstack serve` registers the folder it serves as a version of a registered model,
with the lineage from the artifact manifests as tags, and points an alias (`production`) at it; `models:/<name>@alias`
or `models:/<name>/<version>` as the model to serve resolves back to that folder. A version is the served folder
(its absolute path is the version's source): serving the same folder again reuses its version."""
from __future__ import annotations

import json
import re
from pathlib import Path

from core import artifacts
from core.errors import ConfigError
from core.log import log

from .config import RegistryCfg

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def _client(cfg: RegistryCfg):
    from mlflow import MlflowClient

    from .runs import ensure_sqlite_folder
    uri = ensure_sqlite_folder(cfg.resolved_uri())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def lineage(folder: Path) -> dict[str, str]:
    """Tags from the manifests of the folder and the run folder above it: stage, run id, variant, parent run id."""
    tags = {"llmstack.path": str(folder)}
    for where in (folder, folder.parent):
        file = where / artifacts.MANIFEST
        if not file.is_file():
            continue
        m = json.loads(file.read_text())
        tags.setdefault("llmstack.stage", str(m.get("stage", "")))
        tags.setdefault("llmstack.run_id", str(m.get("run_id", "")))
        parent = m.get("parent")
        if isinstance(parent, dict) and parent.get("run_id"):
            tags.setdefault("llmstack.parent_run_id", str(parent["run_id"]))
        if where is folder.parent:
            tags["llmstack.variant"] = folder.name
    return tags


def register(folder: Path, cfg: RegistryCfg) -> str | None:
    """Register `folder` (reusing its version when it is registered already) and set the alias; the version, or
    None (off, or failed: a warning; serving goes on)."""
    if not cfg.active():
        return None
    try:
        client = _client(cfg)
        source = str(Path(folder).resolve())
        if not client.search_registered_models(f"name='{cfg.name}'"):
            client.create_registered_model(cfg.name, description="Models served by llmstack (llmstack serve)")
        found = [v for v in client.search_model_versions(f"name='{cfg.name}'") if v.source == source]
        version = found[0] if found else client.create_model_version(cfg.name, source, tags=lineage(Path(source)))
        client.set_registered_model_alias(cfg.name, cfg.alias, version.version)
        log.info(f"registry: {cfg.name} version {version.version} ({source}) is @{cfg.alias}")
        return str(version.version)
    except Exception as exc:  # noqa: BLE001 - the registry must never stop serving
        log.warning(f"warning: model registry update failed ({type(exc).__name__}: {exc}); serving goes on")
        return None


def resolve(uri: str, cfg: RegistryCfg) -> str:
    """The folder a `models:/<name>@<alias>` or `models:/<name>/<version>` URI names; ConfigError naming model.path
    when it does not parse, is unknown, or its folder is gone."""
    m = MODELS_URI.match(uri)
    if not m:
        raise ConfigError(f"{uri!r} is not a registry URI", field="model.path",
                          hint="models:/<name>@<alias> or models:/<name>/<version>, e.g. models:/llmstack@production")
    try:
        client = _client(cfg)
        v = client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"] else \
            client.get_model_version(m["name"], m["version"])
    except Exception as exc:  # noqa: BLE001 - MlflowException for unknown names / aliases, connection errors
        raise ConfigError(f"{uri} is not in the model registry at {cfg.resolved_uri()}: {exc}", field="model.path",
                          hint="llmstack serve registers what it serves; browse the registry with `make mlflow`") \
            from None
    if not Path(v.source).exists():
        raise ConfigError(f"{uri} is version {v.version}, whose folder {v.source} no longer exists",
                          field="model.path")
    return v.source
