"""Which model folder to serve and with which backend, read from artifact manifests (never from training or
compression code): a compress run -> its recommended variant; a compress variant -> its `serve` entry; a training
artifact -> its merged model; otherwise a plain HF folder (safetensors) or ONNX export folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.artifacts import MANIFEST, read_manifest
from core.errors import ArtifactError


@dataclass
class ModelRef:
    folder: Path
    name: str
    backend: str  # onnxruntime | transformers | vllm | openvino
    file_name: str | None = None
    lineage: dict = field(default_factory=dict)  # stage, run ids and parent paths, for /v1/models and the info metric


def gpu_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no GPU path
        return False


def _format(folder: Path) -> str:
    if (folder / "openvino_model.xml").is_file():
        return "openvino"
    if any(folder.glob("*.onnx")):
        return "onnx"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "hf"
    raise ArtifactError("no model here: expected *.onnx (an ONNX export) or config.json + *.safetensors (an HF "
                        "model folder)", file=folder, field="model.path",
                        hint="point model.path at artifacts/compress/latest, a variant folder, a training artifact "
                        "or an HF folder; `make compress` builds the default")


def resolve(path: str | Path, backend: str = "auto", name: str | None = None, file_name: str | None = None) -> ModelRef:
    folder = Path(path)
    if not folder.exists():
        raise ArtifactError("model path does not exist", file=folder, field="model.path",
                            hint="run `make compress` (or `make train`) first, or set model.path")
    folder = folder.resolve()
    lineage: dict = {}
    served_backend = None
    if (folder / MANIFEST).is_file():
        m = read_manifest(folder)
        stage = m.get("stage")
        lineage = {"stage": stage, "run_id": m.get("run_id"), "parent": (m.get("parent") or {}).get("path")}
        if stage == "compress" and "variants" in m:  # a compress run: its recommended variant
            rec = m.get("recommended_serve") or {}
            if not rec.get("path"):
                raise ArtifactError("this compress run recommends no variant (none passed the quality gate)",
                                    file=folder, field="model.path",
                                    hint="serve one variant folder explicitly, e.g. model.path=<run>/onnx-int8, or "
                                    "relax gate.max_task_drop and re-run make compress")
            return resolve(folder / rec["path"], backend, name, file_name)
        if stage == "compress":  # one variant
            serve = m.get("serve") or {}
            served_backend = serve.get("backend")
            file_name = file_name or serve.get("file_name")
            lineage["variant"] = m.get("variant")
            name = name or m.get("variant")
        elif stage == "train":
            merged = folder / "merged"
            if not merged.is_dir():
                raise ArtifactError("training artifact without a merged model folder", file=folder,
                                    field="model.path", hint="re-run `make train` (it merges the adapter)")
            ref = resolve(merged, backend, name or f"{folder.name}-merged", file_name)
            ref.lineage = lineage
            return ref
    fmt = _format(folder)
    if served_backend is None:
        served_backend = {"onnx": "onnxruntime", "openvino": "openvino"}.get(fmt) or (
            "vllm" if gpu_available() else "transformers")
    chosen = served_backend if backend == "auto" else backend
    if chosen == "openvino" and fmt == "onnx":
        raise ArtifactError("backend openvino needs an HF model folder (exported with optimum-intel) or an OpenVINO "
                            "IR folder, this folder holds an ONNX export", file=folder, field="model.backend",
                            hint="serve the training artifact (model.path=artifacts/train/latest) on openvino: "
                            "openvino.weight_format compresses its weights")
    if fmt == "openvino" and chosen != "openvino":
        raise ArtifactError(f"this folder holds an OpenVINO IR model, which backend {chosen} cannot load",
                            file=folder, field="model.backend", hint="use backend openvino (or auto)")
    if chosen == "onnxruntime" and fmt != "onnx":
        raise ArtifactError("backend onnxruntime needs an ONNX export, this folder holds an HF model", file=folder,
                            field="model.backend", hint="use backend transformers or vllm, or serve an ONNX variant")
    if chosen in ("transformers", "vllm") and fmt != "hf":
        raise ArtifactError(f"backend {chosen} needs an HF model folder (config.json + safetensors), this folder "
                            "holds an ONNX export", file=folder, field="model.backend",
                            hint="use backend onnxruntime for ONNX variants")
    if fmt == "onnx":
        file_name = file_name or "model.onnx"
        if not (folder / file_name).is_file():
            raise ArtifactError(f"no {file_name} in the folder", file=folder, field="model.file_name")
    return ModelRef(folder, name or folder.name, chosen, file_name, lineage)
