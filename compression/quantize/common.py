"""Shared helpers of the ONNX quantizers: the source graph and output folder, saving, quiet logging, one-line errors,
and the int8 preset of this CPU."""
from __future__ import annotations

import contextlib
import logging
import platform
from pathlib import Path

from core.errors import CompressError, StackError, one_line
from runtimes.onnx import onnx_files

from ..export import SIDE_FILES, copy_side_files

PRESETS = ("avx512_vnni", "avx2", "arm64")

def cpu_preset() -> str:
    """ONNX Runtime int8 preset for this CPU: avx512_vnni, avx2 or arm64 (from /proc/cpuinfo flags, else the
    machine type); x86 CPUs without AVX2 get the avx2 preset (its kernels fall back at run time)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("armv8"):
        return "arm64"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if {"avx512_vnni", "avx512vnni"} & flags:
        return "avx512_vnni"
    return "avx2"


def resolve_preset(preset: str) -> str:
    if preset == "auto":
        return cpu_preset()
    if preset not in PRESETS:
        raise CompressError(f"unknown int8 preset '{preset}' (auto, {', '.join(PRESETS)})", field="quantize.preset")
    return preset


def source(onnx_dir) -> tuple[Path, Path]:
    """(folder, the .onnx graph) of an exported model folder."""
    files = onnx_files(onnx_dir)
    folder = Path(onnx_dir)
    graph = folder / "model.onnx" if (folder / "model.onnx").is_file() else files[0]
    if len(files) > 1 and graph.name != "model.onnx":
        raise CompressError(f"several .onnx files and no model.onnx ({', '.join(f.name for f in files)})",
                            file=folder)
    return folder, graph


def prepare_out(out_dir, src: Path) -> Path:
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise CompressError("the output folder is the input folder", file=out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.onnx")):
        raise CompressError("the output folder already holds an .onnx model", file=out)
    return out


def copy_side(src: Path, out: Path) -> None:
    """config, generation config and tokenizer next to the quantized graph (everything but the ONNX files)."""
    copy_side_files(src, out, SIDE_FILES)


def save(model, path: Path) -> None:
    """Save an onnx ModelProto: one file below 2 GB, else with external data next to it."""
    import onnx

    if model.ByteSize() < (2 << 30) - (64 << 20):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)


@contextlib.contextmanager
def quiet_root():
    """onnxruntime.quantization logs advice through the root logger; keep it to errors while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def failing_as(what: str, src: Path):
    """Any library exception inside becomes one CompressError line naming the step and the source folder."""
    try:
        yield
    except StackError:  # ours already names what and where
        raise
    except Exception as exc:
        raise CompressError(f"{what} failed ({one_line(exc)})", file=src) from None


def load_graph(graph: Path, weights: bool = True):
    import onnx

    try:
        return onnx.load_model(str(graph), load_external_data=weights)
    except Exception as exc:
        raise CompressError(f"{graph.name} is not a readable ONNX model ({one_line(exc)})",
                            file=graph.parent) from None



def expect_graph(out: Path) -> None:
    if not (out / "model.onnx").is_file():
        raise CompressError("quantization wrote no model.onnx", file=out)
