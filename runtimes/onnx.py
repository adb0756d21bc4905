"""ONNX Runtime on the CPU: the exported graphs of a model folder and optimum's ORTModelForCausalLM over them.
Shared by compression (parity, quantizing, measuring) and training's evaluation harness; imports no stage."""
from __future__ import annotations

from pathlib import Path

from core.errors import ArtifactError, one_line


def onnx_files(onnx_dir: str | Path) -> list[Path]:
    """The .onnx graphs in a folder; ArtifactError when the folder or the graph is missing."""
    folder = Path(onnx_dir)
    if not folder.is_dir():
        raise ArtifactError("ONNX model folder does not exist", file=folder)
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise ArtifactError("no .onnx file in the folder (export the model first)", file=folder)
    if not (folder / "config.json").is_file():
        raise ArtifactError("config.json is missing next to the .onnx file", file=folder)
    return files


def load_ort(onnx_dir: str | Path, threads: int = 0, file_name: str | None = None):
    """ORTModelForCausalLM on the CPU execution provider with `threads` intra-op threads (0: all cores)."""
    folder = Path(onnx_dir)
    files = onnx_files(folder)
    if file_name is not None and not (folder / file_name).is_file():
        raise ArtifactError(f"{file_name} not found (the folder has {', '.join(f.name for f in files)})",
                            file=folder)
    if file_name is None and len(files) > 1:
        file_name = "model.onnx" if (folder / "model.onnx").is_file() else files[0].name
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    try:
        return ORTModelForCausalLM.from_pretrained(folder, file_name=file_name, session_options=options,
                                                   provider="CPUExecutionProvider", local_files_only=True)
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot load the model ({one_line(exc)})", file=folder) from None
