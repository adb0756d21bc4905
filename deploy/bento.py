"""`llmstack bento`: the served model and the service as one Bento (BentoML's deployable unit), packaged beside
the bentofile and the images it belongs with (deploy/).

1. The folder `llmstack serve` would serve (config + overrides, resolved by serving.model_ref: the compress run's
   recommended variant by default) is imported into the BentoML model store as `llmstack-model:<version>`, the version
   named after its lineage (`<run_id>-<variant>`; a plain folder: a hash of its files), with the drift reference it
   is monitored against and `llmstack_model.json` (served name, backend, lineage). Importing again is a no-op.
2. `bentoml build -f deploy/bentofile.yaml` builds the Bento from the repository with two Bento arguments: `model`
   (that tag) and `config` (the resolved serve config). serving/service.py declares `bentoml.models.BentoModel(model)`
   on the service when the argument is there, so bento.yaml lists the model and `bentoml containerize` copies it into
   the image; the service then serves that model's folder with the baked config.

Without the arguments (`llmstack serve`, `bentoml serve serving.service:LLMService`) nothing changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from core.errors import ConfigError, StackError

from serving.bundle import BUNDLE_INFO, MODEL_NAME
from serving.model_ref import ModelRef

DEFAULT_BENTOFILE = "deploy/bentofile.yaml"


def _tag_part(text: str) -> str:
    part = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return part[:63].rstrip("-._")


def _files_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def _no_none(value):
    """BentoML model metadata takes basic types only: drop the None values."""
    if isinstance(value, dict):
        return {k: _no_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_none(v) for v in value if v is not None]
    return value


def model_version(ref: ModelRef) -> str:
    """`<run_id>-<variant>` for compress variants, `<run_id>-merged` for training artifacts, else a content hash."""
    run_id = ref.lineage.get("run_id")
    if run_id:
        return _tag_part(f"{run_id}-{ref.lineage.get('variant') or ref.folder.name}")
    return "sha-" + _files_hash(ref.folder)


def import_model(ref: ModelRef, drift_reference: str | None = None) -> str:
    """Copy the served folder into the BentoML model store (BENTOML_HOME); returns the tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    from monitoring import drift

    tag = f"{MODEL_NAME}:{model_version(ref)}"
    try:
        return str(bentoml.models.get(tag).tag)  # artifacts are immutable: same lineage, same files
    except NotFound:
        pass
    reference = Path(drift_reference) if drift_reference else drift.find_reference(ref.folder)
    if reference is not None and reference.is_dir():
        reference = reference / drift.FILE
    info = {"name": ref.name, "backend": ref.backend, "file_name": ref.file_name, "lineage": ref.lineage,
            "source": str(ref.folder), "drift_reference": str(reference) if reference else None}
    labels = {k: _tag_part(str(v)) for k, v in (("stage", ref.lineage.get("stage")), ("run_id",
              ref.lineage.get("run_id")), ("variant", ref.lineage.get("variant")), ("backend", ref.backend)) if v}
    with bentoml.models.create(tag, labels=labels, metadata={"llmstack": _no_none(info)}) as model:
        dest = Path(model.path)
        shutil.copytree(ref.folder, dest, dirs_exist_ok=True, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", ".*"))
        if reference is not None and reference.resolve() != (ref.folder / drift.FILE).resolve():
            shutil.copy2(reference, dest / drift.FILE)
        (dest / BUNDLE_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return str(model.tag)


def build(cfg, ref: ModelRef, bentofile: str = DEFAULT_BENTOFILE, build_ctx: str = ".",
          version: str | None = None) -> tuple[str, str]:
    """Import the model, then `bentoml build` the service with it; returns (model tag, bento tag)."""
    if cfg.adapters:
        raise ConfigError("the Bento carries one model; LoRA adapters are not bundled", field="adapters",
                          hint="serve a merged variant, or run `llmstack serve` with the adapters")
    if cfg.model.backend == "vllm":
        raise ConfigError("the Bento runs the in-process backends (onnxruntime, transformers); vLLM ships as "
                          "deploy/docker/serve-gpu.Dockerfile", field="model.backend")
    if not Path(bentofile).is_file():
        raise ConfigError("bentofile not found", file=bentofile, hint="run from the repository root")
    model_tag = import_model(ref, cfg.monitoring.drift.reference)
    baked = cfg.model_copy(deep=True)
    baked.model.path = model_tag  # informative: the service serves the Bento model's folder
    baked.monitoring.drift.reference = None  # stored with the model
    args = {"model": model_tag, "config": baked.model_dump(mode="json")}
    fd, arg_file = tempfile.mkstemp(prefix="llmstack-bento-args-", suffix=".yaml")
    try:
        import yaml
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(args, f, sort_keys=False)
        bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
        cmd = [bentoml, "build", "-f", bentofile, "--arg-file", arg_file, "-o", "tag", build_ctx]
        if version:
            cmd[2:2] = ["--version", version]
        res = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.unlink(arg_file)
    found = re.search(r"__tag__:(\S+)", res.stdout)
    if res.returncode != 0 or not found:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise StackError(f"bentoml build failed (exit {res.returncode}):\n{tail}", file=bentofile)
    return model_tag, found.group(1)
