"""Quantization of an exported ONNX model for CPU (ONNX Runtime) and of a HF model for GPU serving.

CPU (input: a folder written by `compression.export.export_onnx`; output: a folder `runtimes.onnx.load_ort` loads):
- `int8_block` (nbits.py): 8-bit weights in blocks of 32, int8 activations per block (MatMulNBits): the demo's int8;
- `int4` (nbits.py): 4-bit block weights (RTN, k-quant or HQQ), optionally with the most sensitive MatMuls at 8 bits;
- `int4_base_grid` (base_grid.py): a fine-tune's base model on its own 4-bit grid plus the fine-tune's change as a
  low-rank correction;
- `int8_dynamic` / `int8_static` (int8.py): int8 weights per channel and activations per tensor (MatMulInteger).
GPU (`gpu_quantize`, gpu.py: gptq / bitsandbytes int8 / nf4): a HF folder vLLM and transformers load; needs CUDA.
"""
from .common import PRESETS, cpu_preset  # noqa: F401
from .gpu import Unavailable, gpu_quantize  # noqa: F401
from .int8 import PrefillReader, int8_dynamic, int8_static  # noqa: F401
from .nbits import int4, int8_block, share_tied, untie_lm_head  # noqa: F401
