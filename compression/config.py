"""The compression config: which variants to build from the fine-tuned model, how, and how they are measured and gated.

Each variant is a fixed pipeline: [prune] -> [distill] -> [export to ONNX] -> [quantize]. The shared sections
(`prune`, `distill`, `quantize`, `measure`, `gate`) hold the settings every variant that uses a step shares.
Field docstrings are the `llmstack compress --help` text.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from llmstack.config import Section
from training.config import DataCfg, EvalCfg

PRUNE = ("none", "depth", "width", "depth+width", "sparsity")
QUANTIZE = ("none", "int8_dynamic", "int8_static", "int4", "gptq", "bnb_int8", "bnb_nf4")
ONNX_QUANT = ("int8_dynamic", "int8_static", "int4")
GPU_QUANT = ("gptq", "bnb_int8", "bnb_nf4")


class VariantCfg(Section):
    name: str
    """Folder name of the variant under the run folder (letters, digits, `-`, `_`, `.`)."""
    prune: Literal[PRUNE] = "none"
    """Structured pruning first: depth (drop whole layers by block influence), width (MLP channels / attention heads
    by activation importance), both, or unstructured sparsity (zeros only: saves nothing on dense kernels)."""
    distill: bool = False
    """Knowledge distillation from the input model (the teacher) after pruning, to win back what pruning lost."""
    format: Literal["onnx", "pytorch"] = "onnx"
    """onnx: exported with KV cache through optimum (served by ONNX Runtime); pytorch: a HF safetensors folder
    (served by transformers or vLLM)."""
    quantize: Literal[QUANTIZE] = "none"
    """int8_dynamic / int8_static / int4 (ONNX Runtime, needs format onnx); gptq / bnb_int8 / bnb_nf4 (GPU only,
    format pytorch; skipped with a stated reason where no GPU exists)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or v in ("reference", "latest"):
            raise ValueError(f"'{v}' is not a usable folder name (letters, digits, . _ -; not 'reference'/'latest')")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.quantize in ONNX_QUANT and self.format != "onnx":
            raise ValueError(f"quantize {self.quantize} is an ONNX Runtime method: set format: onnx")
        if self.quantize in GPU_QUANT and self.format != "pytorch":
            raise ValueError(f"quantize {self.quantize} produces a HF folder for vLLM/transformers: set format: pytorch")
        return self


def _default_variants() -> list[VariantCfg]:
    return [VariantCfg(name="onnx-fp32"), VariantCfg(name="onnx-int8", quantize="int8_dynamic"),
            VariantCfg(name="onnx-int4", quantize="int4"),
            VariantCfg(name="pruned-distilled-int8", prune="depth+width", distill=True, quantize="int8_dynamic")]


class PruneCfg(Section):
    drop_layers: int = Field(12, ge=0)
    """Depth pruning: how many decoder layers to remove (those whose removal changes the hidden state least)."""
    mlp_keep: float = Field(0.75, gt=0, le=1)
    """Width pruning: fraction of MLP intermediate channels kept (the most active on calibration text)."""
    heads_keep: float = Field(1.0, gt=0, le=1)
    """Width pruning: fraction of query heads kept in every key/value group (1.0: attention untouched)."""
    sparsity: float = Field(0.5, ge=0, lt=1)
    """Unstructured sparsity: fraction of each linear layer's weights set to zero."""
    sparsity_method: Literal["magnitude", "wanda"] = "wanda"
    """magnitude: smallest |w|; wanda: smallest |w| x input activation norm (per output row)."""
    calibration_samples: int = Field(64, ge=1)
    """Training rows used to score layers, channels and heads."""


class DistillCfg(Section):
    steps: int = Field(150, ge=1)
    """Optimizer steps of distillation."""
    max_minutes: float = Field(5.0, gt=0)
    """Stop distillation after this long even if steps remain (the demo's time budget)."""
    batch_size: int = Field(8, ge=1)
    """Training rows per step."""
    lr: float = Field(5e-4, gt=0)
    """Learning rate (AdamW, cosine with warmup) for the student's full weights."""
    temperature: float = Field(2.0, gt=0)
    """Softening temperature of the teacher's and student's logits in the KL term (scaled by T^2)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the KL term; 1 - alpha weighs the cross-entropy on the reference answer."""
    seed: int = 42
    """Seed for the data order."""


class QuantizeCfg(Section):
    preset: Literal["auto", "avx512_vnni", "avx2", "arm64"] = "auto"
    """ONNX Runtime int8 preset; auto picks from this CPU's instruction set."""
    per_channel: bool = True
    """int8: one scale per output channel (better accuracy) instead of per tensor."""
    calibration_samples: int = Field(32, ge=1)
    """int8_static: training rows run through the model to calibrate activation ranges; SmoothQuant: rows whose
    activation ranges set the smoothing scales."""
    smooth_alpha: Optional[float] = Field(0.5, gt=0, lt=1)
    """int8: SmoothQuant strength (0..1) applied to the PyTorch model before export, moving activation outliers into
    the per-channel-quantized weights; null: off. Llama-style models only."""
    int4_block_size: int = Field(32, ge=16)
    """int4: weights per quantization block (a power of two)."""
    int4_symmetric: bool = True
    """int4: symmetric blocks (no zero point)."""
    int4_embeddings: bool = True
    """int4: also quantize the token embedding and the LM head (a fifth of SmolLM2's weights)."""

    @field_validator("int4_block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of two")
        return v


class MeasureCfg(Section):
    threads: int = Field(0, ge=0)
    """CPU threads for every measurement (0: all cores); the same for every variant."""
    decode_tokens: int = Field(64, ge=8)
    """Tokens generated per timing run at batch 1."""
    runs: int = Field(5, ge=1)
    """Timing runs after one warm-up; medians are reported."""
    eval_samples: int = Field(100, ge=0)
    """Test rows scored (perplexity, task metric, agreement with the input model); 0: all."""


class GateCfg(Section):
    max_task_drop: float = Field(0.02, ge=0)
    """A variant is fit when its task score is at most this much below the input model's (0.02 = 2 points)."""
    recommend: Literal["fastest", "smallest"] = "fastest"
    """Which fit variant the run manifest recommends for serving."""


class OutputCfg(Section):
    dir: str = "artifacts/compress"
    """Root folder of compression runs (`<dir>/<run-id>/<variant>/`, `<dir>/latest`)."""
    run_id: Optional[str] = None
    """Run folder name; default: timestamp + random suffix."""


class CompressConfig(Section):
    """Compression run: the input model, the variants to build, and how they are measured and gated."""
    input: str = "artifacts/train/latest"
    """A training artifact (its merged/ model, data and eval settings are used) or any HF model folder."""
    variants: list[VariantCfg] = Field(default_factory=_default_variants)
    """The variants to build; each is prune -> distill -> export -> quantize, steps as set."""
    data: Optional[DataCfg] = None
    """Calibration, distillation and test data, with the keys of the training config's `data` section (see
    `llmstack train --help`); null: the training artifact's data section."""
    eval: Optional[EvalCfg] = None
    """Task metric settings, the keys of the training config's `eval` section (json_fields, max_new_tokens,
    batch_size); null: the training artifact's."""
    prune: PruneCfg = PruneCfg()
    """Pruning settings."""
    distill: DistillCfg = DistillCfg()
    """Distillation settings."""
    quantize: QuantizeCfg = QuantizeCfg()
    """Quantization settings."""
    measure: MeasureCfg = MeasureCfg()
    """How every variant (and the input model) is measured."""
    gate: GateCfg = GateCfg()
    """The quality gate."""
    output: OutputCfg = OutputCfg()
    """Where the run goes."""

    @model_validator(mode="after")
    def _unique(self):
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique: {', '.join(dup)} repeated")
        if not self.variants:
            raise ValueError("variants is empty: nothing to build")
        return self
