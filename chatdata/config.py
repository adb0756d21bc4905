"""The data section: which files make the train / validation / test splits and how they are cleaned, deduplicated
and length-filtered. Shared by training (`data:` of a training config) and compression (`data:` of a compress config,
for a plain model folder)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from core.config import Section

from .augment.config import AugmentCfg


class DatasetSpec(Section):
    path: str
    """A .jsonl, .json, .csv or .parquet file."""
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    """instruction (alpaca: instruction / input / output), chat (OpenAI-style `messages`), text (raw text, loss on
    every token); auto picks from the columns."""
    weight: float = Field(1.0, gt=0)
    """Mixing weight, an upsampling factor: 2.0 repeats every row twice, 0.5 keeps a seeded half."""
    columns: dict[str, str] = {}
    """Rename file columns to the format's names, e.g. {instruction: question, output: answer}."""


class ReweighCfg(Section):
    enabled: bool = False
    """Weight each training row's loss so that the term group it mentions and its label are independent
    (Kamiran & Calders' reweighing; chatdata/reweigh.py)."""
    terms: str = "data/fairness/augment_terms.yaml"
    """Term groups that give a row its group (the fairness check's terms.yaml format); a row without a term: `none`."""
    attributes: list[str] = []
    """Attributes of `terms` that define the group (empty: every attribute)."""
    label_field: str = "urgency"
    """The JSON answer field that is the label."""
    max_weight: float = Field(10.0, gt=0)
    """Weights are clipped to this (a (group, label) cell with very few rows would otherwise dominate)."""


class DataCfg(Section):
    train: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="data/tickets/train.jsonl")])
    """Training datasets, mixed by weight (with curriculum.stages: leave empty; the stages name their data)."""
    validation: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="data/tickets/validation.jsonl")])
    """Validation datasets; empty: split `val_ratio` off the training data."""
    test: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="data/tickets/test.jsonl")])
    """Held-out test datasets for the before/after evaluation; empty: evaluate on validation."""
    val_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of training rows held out for validation when no validation dataset is given."""
    max_seq_len: int = Field(512, ge=8)
    """Longest tokenized example (prompt + answer, chat template applied)."""
    overlong: Literal["drop", "truncate", "error"] = "drop"
    """Examples longer than max_seq_len: drop them (reported), truncate them, or stop with an error."""
    system_prompt: Optional[str] = None
    """System message added to chat/instruction rows that have none; null keeps the model template's default."""
    unicode_normalization: Literal["NFKC", "NFC", "none"] = "NFKC"
    """Unicode normalisation applied while cleaning (whitespace is always stripped)."""
    dedup_exact: bool = True
    """Drop exact duplicates (after cleaning) within each split."""
    dedup_near: bool = True
    """Drop near duplicates within each split (MinHash LSH on word 3-grams, datasketch)."""
    near_dup_threshold: float = Field(0.9, gt=0, le=0.98)
    """Estimated Jaccard similarity at or above which two rows are near duplicates (at most 0.98: MinHash LSH on 128
    permutations cannot band a higher threshold; an exact duplicate is dedup_exact's)."""
    leakage: Literal["warn", "error"] = "warn"
    """Validation or test rows whose prompt is also in the training split (exactly, or a near duplicate at
    near_dup_threshold): warn (listed in the data report) or error (stop, naming every such row)."""
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    """New training rows from the training split (noise, slots, paraphrase, counterfactual), through a quality filter;
    validation and test rows are never augmented (docs/training.md#augmentation)."""
    reweigh: ReweighCfg = Field(default_factory=ReweighCfg)
    """Per-row loss weights that balance term groups against a label (bias mitigation; docs/fairness.md)."""
