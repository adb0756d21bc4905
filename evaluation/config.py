"""The eval section: how a model's quality is measured on the test split (generation length, batch size, the JSON
fields scored by exact match). Shared by training, compression and `llmstack eval`."""
from __future__ import annotations

from pydantic import Field

from core.config import Section


class EvalCfg(Section):
    before: bool = True
    """Evaluate the base model before training."""
    after: bool = True
    """Evaluate the fine-tuned model after training."""
    max_samples: int = Field(0, ge=0)
    """Evaluate (loss and generations) on the first N test rows only (0: all)."""
    max_new_tokens: int = Field(64, ge=1)
    """Generation length limit."""
    batch_size: int = Field(32, ge=1)
    """Evaluation batch size: greedy generation (left padded) and the loss / perplexity passes."""
    json_fields: list[str] = []
    """If answers are JSON: the fields scored by exact match (per-field accuracy and all-fields exact match).
    Empty: generic text metrics (BLEU, ROUGE-L) on the generations."""
