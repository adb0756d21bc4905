"""The eval section: how a model's quality is measured on the test split (generation length, batch size, the JSON
fields scored by exact match), shared by training, compression and `llmstack eval`; and the sections of a training
config that `llmstack eval` and `llmstack report` read."""
from __future__ import annotations

from pydantic import ConfigDict, Field

from chatdata.config import DataCfg
from core.config import Section
from modeling.config import ModelCfg


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


class _SeedAndThreads(Section):
    model_config = ConfigDict(extra="ignore", validate_assignment=True, use_attribute_docstrings=True)
    seed: int = 42
    """Seed of the data pipeline (the validation split taken off the training rows)."""
    threads: int = Field(0, ge=0)
    """torch CPU threads (0: all cores)."""


class TrainingSections(Section):
    """What evaluating a model reads of a training config: model, data (its test split), eval, train.seed and
    train.threads. The other sections and keys are the trainer's (`llmstack train` validates them) and are not read."""
    model_config = ConfigDict(extra="ignore", validate_assignment=True, use_attribute_docstrings=True)
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    train: _SeedAndThreads = Field(default_factory=_SeedAndThreads)
