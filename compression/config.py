"""The compression config: which variants to build from the fine-tuned model, how, and how they are measured and gated.

Each variant is a fixed pipeline: [prune] -> [distill] -> [export to ONNX] -> [quantize]. The shared sections
(`prune`, `distill`, `quantize`, `measure`, `gate`) hold the settings every variant that uses a step shares.
Field docstrings are the `llmstack compress --help` text.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from chatdata.config import DataCfg
from core.config import Section
from evaluation.config import EvalCfg
from tracking.config import TrackingCfg

PRUNE = ("none", "depth", "width", "depth+width", "sparsity")
QUANTIZE = ("none", "int8_block", "int8_dynamic", "int8_static", "int4", "gptq", "bnb_int8", "bnb_nf4")
ONNX_QUANT = ("int8_block", "int8_dynamic", "int8_static", "int4")
GPU_QUANT = ("gptq", "bnb_int8", "bnb_nf4")


class VariantCfg(Section):
    name: str
    """Folder name of the variant under the run folder (letters, digits, `-`, `_`, `.`)."""
    prune: Literal[PRUNE] = "none"
    """Structured pruning first: depth (drop whole layers by block influence), width (MLP channels / attention heads
    by activation importance), both, or unstructured sparsity (zeros only: saves nothing on dense kernels)."""
    distill: bool = False
    """Knowledge distillation from the input model (the teacher) after pruning, to win back what pruning lost."""
    format: Literal["onnx", "pytorch", "openvino"] = "onnx"
    """onnx: exported with KV cache through optimum (served by ONNX Runtime); pytorch: a HF safetensors folder
    (served by transformers or vLLM); openvino: an OpenVINO IR folder exported by optimum-intel in the OpenVINO
    environment (`make openvino-env`), weights compressed by NNCF (`openvino_weights`), served by OpenVINO GenAI."""
    openvino_weights: Literal["int8", "int4", "fp16", "fp32"] = "int8"
    """Weights of an openvino variant (NNCF weight compression at export; int8: asymmetric per channel)."""
    drop_layers: Optional[int] = Field(None, ge=0)
    """This variant's number of layers to drop (overrides prune.drop_layers)."""
    mlp_keep: Optional[float] = Field(None, gt=0, le=1)
    """This variant's fraction of MLP channels kept (overrides prune.mlp_keep)."""
    distill_steps: Optional[int] = Field(None, ge=1)
    """This variant's distillation budget in steps (overrides distill.steps)."""
    quantize: Literal[QUANTIZE] = "none"
    """int8_block: 8-bit weights in blocks, int8 activations per block (MatMulNBits; the same scheme on every CPU);
    int8_dynamic / int8_static: int8 weights per channel, activations per tensor (MatMulInteger; with SmoothQuant);
    int4: 4-bit block weights (see quantize.int4_*). These need format onnx. gptq / bnb_int8 / bnb_nf4: GPU only,
    format pytorch; skipped with a stated reason where no GPU exists."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or v in ("reference", "latest"):
            raise ValueError(f"'{v}' is not a usable folder name (letters, digits, . _ -; not 'reference'/'latest')")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.format == "openvino" and self.quantize != "none":
            raise ValueError("an openvino variant's weights are set by openvino_weights (NNCF at export): leave "
                             "quantize at none")
        if self.quantize in ONNX_QUANT and self.format != "onnx":
            raise ValueError(f"quantize {self.quantize} is an ONNX Runtime method: set format: onnx")
        if self.quantize in GPU_QUANT and self.format != "pytorch":
            raise ValueError(f"quantize {self.quantize} produces a HF folder for vLLM/transformers: set format: pytorch")
        return self


def _default_variants() -> list[VariantCfg]:
    return [VariantCfg(name="onnx-fp32"), VariantCfg(name="onnx-int8", quantize="int8_block"),
            VariantCfg(name="onnx-int4", quantize="int4")]


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
    """Weight of the KL term; 1 - alpha weighs the cross-entropy on the reference answer (0: no teacher at all)."""
    train_layers: int = Field(0, ge=0)
    """Train only the top N decoder layers (and the final norm); backpropagation stops below them. 0: every
    weight."""
    lora_rank: int = Field(0, ge=0)
    """Recover with LoRA adapters of this rank (on the `train_layers` top layers, 0: all) merged into the student
    afterwards, instead of training the weights themselves (LLM-Pruner). 0: full weights."""
    seed: int = 42
    """Seed for the data order."""


class QuantizeCfg(Section):
    accuracy_level: Literal[0, 4] = 4
    """int8_block / int4 (MatMulNBits): 4 quantizes the activations to int8 per block and multiplies in int8 (fast on
    AVX2, AVX-512 VNNI, AMX and ARM); 0 computes in float (exact, but 8-bit weights are dequantized at every call)."""
    int8_block_size: int = Field(32, ge=16)
    """int8_block: weights per scale (a power of two; 32 is llama.cpp's Q8_0)."""
    preset: Literal["auto", "avx512_vnni", "avx2", "arm64"] = "auto"
    """int8_dynamic / int8_static: ONNX Runtime int8 preset; auto picks from this CPU's instruction set."""
    per_channel: bool = True
    """int8_dynamic / int8_static: one weight scale per output channel (better accuracy) instead of per tensor."""
    calibration_samples: int = Field(32, ge=1)
    """int8_static: training rows run through the model to calibrate activation ranges; SmoothQuant: rows whose
    activation ranges set the smoothing scales."""
    smooth_alpha: Optional[float] = Field(0.5, gt=0, lt=1)
    """int8_dynamic / int8_static: SmoothQuant strength (0..1) applied to the PyTorch model before export, moving
    activation outliers into the per-channel-quantized weights; null: off. Llama-style models only."""
    int4_block_size: int = Field(32, ge=16)
    """int4: weights per quantization block (a power of two)."""
    int4_algorithm: Literal["rtn", "k_quant", "hqq"] = "rtn"
    """int4 without the base grid: round to nearest, llama.cpp's k-quant search, or HQQ (ONNX Runtime's quantizer)."""
    int4_symmetric: bool = False
    """int4 with rtn: symmetric blocks (no zero point) instead of asymmetric (a zero point per block)."""
    int4_embeddings: bool = True
    """int4: also quantize the token embedding and the LM head (a fifth of SmolLM2's weights)."""
    int4_base_grid: bool = True
    """int4 of an unpruned fine-tune whose base model is known (a training artifact): quantize the base model's
    weights on their own asymmetric 4-bit grid and carry the fine-tune's change as a rank-`int4_correction_rank`
    correction (the LM head and embedding at 8 bits); false: plain block quantization of the merged weights."""
    int4_correction_rank: int = Field(16, ge=0)
    """int4 base grid: rank of the correction per weight (a LoRA fine-tune needs its own rank to be exact)."""
    int4_branch_bits: Literal[8, 16, 32] = 16
    """int4 base grid: the correction and block-minimum branches as 8-bit blocks (int8 activations too), or float
    weights stored as float16 (16) or float32 (32)."""
    int4_int8_layers: int = Field(0, ge=0)
    """int4 without the base grid: keep this many decoder layers at 8 bits, those whose 4-bit rounding raises the
    validation loss most (measured on `sensitivity_samples` validation rows)."""
    sensitivity_samples: int = Field(16, ge=1)
    """Validation rows that rank the layers by their 4-bit sensitivity (int4_int8_layers > 0)."""

    @field_validator("int4_block_size", "int8_block_size")
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
    batch: int = Field(8, ge=0)
    """Decode throughput is also timed with this many identical prompts at once (what a served model meets at this
    many concurrent requests); `gate.recommend: fastest` ranks by it. 0: batch 1 only."""
    runs: int = Field(5, ge=1)
    """Timing runs after one warm-up; medians are reported."""
    eval_samples: int = Field(100, ge=0)
    """Test rows scored (perplexity, task metric, agreement with the input model); 0: all."""


class GateCfg(Section):
    max_task_drop: float = Field(0.02, ge=0)
    """A variant is fit when its task score is at most this much below the input model's (0.02 = 2 points)."""
    recommend: Literal["fastest", "smallest"] = "fastest"
    """Which fit variant the run manifest recommends for serving: fastest = most decode tokens/s at `measure.batch`
    requests at once (at batch 1 when that is 0), smallest = least size on disk."""


class FrontierCfg(Section):
    drop_layers: list[int] = Field(default_factory=list)
    """Depth points of the pruning frontier (layers dropped); each pairs with every `mlp_keep` into a variant named
    `pruned-d<layers>-w<keep>` (prune, distill, export, quantize). Empty: no frontier."""
    mlp_keep: list[float] = Field(default_factory=lambda: [1.0])
    """Width points of the frontier (fraction of MLP channels kept)."""
    quantize: Literal[QUANTIZE] = "int8_block"
    """How every frontier point is quantized after distillation."""
    distill_steps: int = Field(60, ge=0)
    """Distillation budget of the point that removes the most parameters; smaller cuts get a share proportional to
    the parameters they remove (at least `min_distill_steps`). 0: no distillation."""
    min_distill_steps: int = Field(10, ge=0)
    """The smallest distillation budget of a frontier point."""


class FastCfg(Section):
    variants: list[str] = Field(default_factory=lambda: ["onnx-int8", "onnx-fp32"])
    """`llmstack compress --fast` (what `make serve` runs when there is no compress artifact yet): these variants, in
    order, are built and gated until one is fit; the run recommends it. No other variant, no reference speed."""


class OutputCfg(Section):
    dir: str = "artifacts/compress"
    """Root folder of compression runs (`<dir>/<run-id>/<variant>/`, `<dir>/latest`)."""
    run_id: Optional[str] = None
    """Run folder name; default: timestamp + random suffix."""


class OpenVinoCfg(Section):
    python: str = ".venv-openvino/bin/python"
    """Python of the OpenVINO environment (`make openvino-env`) that exports and measures openvino variants."""
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = "auto"
    """Activation precision while measuring (as serve's openvino.inference_precision; auto: bf16 on CPUs with
    AVX-512 BF16 / AMX). Measure with what you will serve."""


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
    frontier: FrontierCfg = FrontierCfg()
    """The pruning frontier: a grid of depth x width points, each distilled and quantized, measured like the
    variants (frontier.png)."""
    fast: FastCfg = FastCfg()
    """The fast path to a served model (`--fast`)."""
    openvino: OpenVinoCfg = OpenVinoCfg()
    """The OpenVINO environment (variants with format openvino)."""
    output: OutputCfg = OutputCfg()
    tracking: TrackingCfg = TrackingCfg()
    """Experiment tracking (MLflow): the run logged with each variant's measurements and the report."""
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
