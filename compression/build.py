"""Building the variants of a compress run: prune -> distill -> (SmoothQuant) -> export to ONNX -> quantize.

Intermediate results are shared: one student per (pruning, distillation, smoothing) setting, one fp32 ONNX export
(parity-gated) per student, one teacher in memory. Every step's wall time goes to the run's `PhaseClock`.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from collections import defaultdict
from pathlib import Path

from core.log import log

from .config import GPU_QUANT, CompressConfig, VariantCfg
from .export import SIDE_FILES, copy_side_files

TOKENIZER_FILES = [n for n in SIDE_FILES if n not in ("config.json", "generation_config.json")]
SMOOTHED = ("int8_dynamic", "int8_static")  # per-tensor activation scales: SmoothQuant helps them


class PhaseClock:
    """Wall time per phase summed over the run (export, parity, quantize, prune, distill, measure speed, ...)."""

    def __init__(self):
        self.start = time.time()
        self.timings: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.add(phase, time.time() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = round(self.timings[phase] + seconds, 1)

    def as_dict(self) -> dict:
        return {**self.timings, "total": round(time.time() - self.start, 1)}

    def summary(self) -> str:
        return ("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
                + f"; total {time.time() - self.start:.0f} s")


def prune_setting(v: VariantCfg, cfg: CompressConfig) -> tuple:
    """What pruning variant `v` gets: (method, layers dropped or None, MLP fraction kept or None)."""
    depth = v.prune in ("depth", "depth+width")
    width = v.prune in ("width", "depth+width")
    return (v.prune, (v.drop_layers if v.drop_layers is not None else cfg.prune.drop_layers) if depth else None,
            (v.mlp_keep if v.mlp_keep is not None else cfg.prune.mlp_keep) if width else None)


def distill_steps(v: VariantCfg, cfg: CompressConfig) -> int | None:
    return (v.distill_steps or cfg.distill.steps) if v.distill else None


class Builder:
    """Builds variants with shared intermediate steps cached (see the module docstring)."""

    def __init__(self, cfg: CompressConfig, model_dir: Path, prepared, data_cfg, work: Path, clock: PhaseClock,
                 base_dir: Path | None = None):
        self.cfg, self.model_dir, self.prepared, self.data_cfg, self.work = cfg, model_dir, prepared, data_cfg, work
        self.clock, self.base_dir = clock, base_dir
        self.students: dict[tuple, tuple[Path, dict]] = {}
        self.exports: dict[tuple, tuple[Path, dict]] = {}
        self._tokenizer = self._teacher = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from modeling.model import load_tokenizer
            self._tokenizer = load_tokenizer(str(self.model_dir))
        return self._tokenizer

    @property
    def teacher(self):
        if self._teacher is None:
            from modeling.model import load_model
            self._teacher = load_model(str(self.model_dir), "float32", "sdpa_gqa").eval()
        return self._teacher

    def calibration(self, n: int) -> list[list[int]]:
        from .prune import calibration_ids
        return calibration_ids(self.prepared.train, n)

    def smoothing(self, v: VariantCfg) -> float | None:
        """The SmoothQuant alpha variant `v` gets (per-tensor int8 variants only), None for none."""
        return self.cfg.quantize.smooth_alpha if v.quantize in SMOOTHED else None

    def key(self, v: VariantCfg) -> tuple:
        return (prune_setting(v, self.cfg), distill_steps(v, self.cfg), self.smoothing(v))

    def student(self, v: VariantCfg) -> tuple[Path, dict]:
        """The PyTorch model folder after pruning, distillation and SmoothQuant (the input folder itself when none)."""
        return self._student(*self.key(v), name=v.name)

    def _student(self, prune: tuple, steps: int | None, alpha: float | None, name: str) -> tuple[Path, dict]:
        key = (prune, steps, alpha)
        if key == (("none", None, None), None, None):
            return self.model_dir, {}
        if key not in self.students:
            t0 = time.time()
            if alpha is not None:  # smoothing comes last: it keeps the function of whatever model it is given
                base, record = self._student(prune, steps, None, name)
                model, record = self._load(base), dict(record)
                record["smooth"] = self._smooth(model, alpha, name)
            else:
                model = self._load(self.model_dir)
                record = self._prune(model, prune, name)
                if steps:
                    record["distill"] = self._distill(model, steps, prune, name)
            folder = self.work / ("student-" + _slug(key))
            model.save_pretrained(folder, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            copy_side_files(self.model_dir, folder, TOKENIZER_FILES)  # verbatim: our fixed tokenizer files
            record["seconds_student"] = round(time.time() - t0, 1)
            self.students[key] = (folder, record)
        return self.students[key]

    def _load(self, folder: Path):
        from modeling.model import load_model
        return load_model(str(folder), "float32", "sdpa_gqa")

    def _smooth(self, model, alpha: float, name: str) -> dict:
        from .smooth import smooth
        calib = self.calibration(self.cfg.quantize.calibration_samples)
        log.info(f"[{name}] SmoothQuant (alpha {alpha}) on {len(calib)} calibration rows")
        with self.clock("smooth"):
            return smooth(model, calib, alpha)

    def _prune(self, model, prune: tuple, name: str) -> dict:
        from . import prune as pr
        method, drop, keep = prune
        if method == "none":
            return {}
        p = self.cfg.prune
        calib = self.calibration(p.calibration_samples)
        log.info(f"[{name}] pruning ({method}: drop {drop} layers, keep {keep} of the MLP) on {len(calib)} rows")
        record = {}
        with self.clock("prune"):
            if drop is not None:
                record["prune_depth"] = pr.prune_depth(model, drop, calib)
            if keep is not None:
                record["prune_width"] = pr.prune_width(model, calib, keep, p.heads_keep)
            if method == "sparsity":
                record["sparsify"] = pr.sparsify(model, calib, p.sparsity, p.sparsity_method)
        return record

    def _distill(self, model, steps: int, prune: tuple, name: str) -> dict:
        from .distill import distill as run_distill
        d = self.cfg.distill.model_copy(update={"steps": steps})
        log.info(f"[{name}] distilling from the input model ({d.steps} steps at most, {d.max_minutes:g} min at most)")
        with self.clock("distill"):
            return run_distill(model, self.teacher, self.prepared.train, self.tokenizer.pad_token_id, d,
                               self.data_cfg.max_seq_len, keep_sparsity=prune[0] == "sparsity")  # zeros stay zeros

    def onnx(self, v: VariantCfg, pt_folder: Path) -> tuple[Path, dict]:
        """fp32 ONNX export of a student, gated on parity with its PyTorch model."""
        key = self.key(v)
        if key not in self.exports:
            from .export import check_parity, export_onnx

            folder = self.work / ("onnx-" + _slug(key))
            log.info(f"[{v.name}] exporting to ONNX with KV cache (optimum)")
            t0 = time.time()
            with self.clock("export"):
                export_onnx(pt_folder, folder)  # copies config and tokenizer files itself, as every quantizer does
            seconds = round(time.time() - t0, 1)
            prompts = [e.prompt_messages() for e in self.prepared.test[:4] if e.messages is not None]
            with self.clock("parity"):
                parity = check_parity(pt_folder, folder, prompts, threads=self.cfg.measure.threads)
            log.info(f"[{v.name}] parity: max |logit diff| {parity['max_abs_logit_diff']:.2e}, greedy outputs "
                     "identical")
            self.exports[key] = (folder, {"export_seconds": seconds, "parity": parity})
        return self.exports[key]

    def build(self, v: VariantCfg, out: Path) -> dict:
        """Write variant `v` into `out`; return its build record (steps, timings)."""
        from . import quantize as qz

        q = self.cfg.quantize
        record: dict = {}
        t0 = time.time()
        if v.format == "openvino" and not Path(self.cfg.openvino.python).exists():
            raise qz.Unavailable(f"no OpenVINO environment ({self.cfg.openvino.python}; `make openvino-env` "
                                 "installs it, openvino.python points at another)")
        pt_folder, steps = self.student(v)
        record.update(steps)
        if v.format == "openvino":
            from runtimes.openvino import export_ir
            log.info(f"[{v.name}] exporting to OpenVINO ({v.openvino_weights} weights, optimum-intel + NNCF)")
            with self.clock("export"):
                seconds = export_ir(self.cfg.openvino.python, pt_folder, out,  # its existence checked above
                                    v.openvino_weights, field=f"variants.{v.name}.openvino_weights")
            record.update({"export_seconds": round(seconds, 1), "weights": v.openvino_weights,
                           "seconds": round(time.time() - t0, 1)})
            return record
        if v.format == "pytorch":
            if v.quantize in GPU_QUANT:
                calib_texts = [e.flat_text() for e in self.prepared.train[:q.calibration_samples]]
                qz.gpu_quantize(pt_folder, out, v.quantize, calib_texts)  # raises qz.Unavailable without a GPU
            else:
                shutil.copytree(pt_folder, out)
            record["seconds"] = round(time.time() - t0, 1)
            return record
        onnx_folder, info = self.onnx(v, pt_folder)
        record.update(info)
        t1 = time.time()
        with self.clock("quantize"):
            detail = self._quantize(v, onnx_folder, out, pt_folder == self.model_dir)
        if v.quantize != "none":
            record["quantize"] = {"method": v.quantize, **detail, "seconds": round(time.time() - t1, 1)}
        record["seconds"] = round(time.time() - t0, 1)
        return record

    def _quantize(self, v: VariantCfg, onnx_folder: Path, out: Path, unpruned: bool) -> dict:
        from . import quantize as qz

        q = self.cfg.quantize
        if v.quantize == "none":
            shutil.copytree(onnx_folder, out)
            return {}
        if v.quantize == "int8_block":
            qz.int8_block(onnx_folder, out, q.int8_block_size, q.accuracy_level)
            return {"block_size": q.int8_block_size, "accuracy_level": q.accuracy_level}
        if v.quantize in ("int8_dynamic", "int8_static"):
            preset = qz.cpu_preset() if q.preset == "auto" else q.preset
            if v.quantize == "int8_dynamic":
                qz.int8_dynamic(onnx_folder, out, preset, q.per_channel)
            else:
                qz.int8_static(onnx_folder, out, self.calibration(q.calibration_samples), preset, q.per_channel)
            return {"preset": preset, "smooth_alpha": self.smoothing(v)}
        # int4
        if q.int4_base_grid and unpruned:
            from .quantize.base_grid import int4_base_grid
            base = self.base_dir if self.base_dir is not None and self.base_dir.is_dir() else None
            if base is None:
                log.info(f"[{v.name}] no base model known: the merged weights are their own 4-bit base")
            _, info = int4_base_grid(onnx_folder, out, base, q.int4_correction_rank, q.int4_block_size,
                                     q.accuracy_level, q.int4_branch_bits)
            return {"scheme": "base_grid", "base_model": _display(base), **info}
        int8_nodes = self._sensitive_nodes(v) if q.int4_int8_layers else []
        qz.int4(onnx_folder, out, q.int4_block_size, q.int4_symmetric, q.int4_embeddings, q.accuracy_level,
                q.int4_algorithm, int8_nodes)
        return {"scheme": q.int4_algorithm, "block_size": q.int4_block_size, "symmetric": q.int4_symmetric,
                "int8_matmuls": len(int8_nodes)}

    def _sensitive_nodes(self, v: VariantCfg) -> list[str]:
        """The exported MatMul names of the `int4_int8_layers` decoder layers most sensitive to 4-bit rounding."""
        from .sensitivity import layer_matmul_names, rank_layers
        pt_folder, _ = self.student(v)
        q = self.cfg.quantize
        rows = self.prepared.validation[:q.sensitivity_samples] or self.prepared.train[:q.sensitivity_samples]
        with self.clock("sensitivity"):
            ranking = rank_layers(self._load(pt_folder), rows, q.int4_block_size, q.int4_symmetric,
                                  self.tokenizer.pad_token_id)
        keep = [r["layer"] for r in ranking[:q.int4_int8_layers]]
        log.info(f"[{v.name}] 4-bit sensitivity: layers {keep} stay at 8 bits")
        return layer_matmul_names(keep)


def _display(path: Path | None) -> str | None:
    """A path for the manifest: relative to the working directory when below it (no machine paths in artifacts)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return Path(path).name


def _slug(key: tuple) -> str:
    (method, drop, keep), steps, alpha = key
    parts = [method] + ([f"d{drop}"] if drop is not None else []) + ([f"w{keep:g}"] if keep is not None else [])
    parts += [f"distilled{steps}"] if steps else []
    parts += [f"smooth{alpha:g}"] if alpha is not None else []
    return "-".join(parts).replace("+", "_")
