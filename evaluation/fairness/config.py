"""The fairness section: `fairness:` of a training config (the check after training) and the options of `llmstack
fairness` (cli.py), one to one."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from core.config import Section


class FairnessCfg(Section):
    """Bias and fairness checks (check.py): counterfactual probes and group metrics; `llmstack fairness`
    takes the same options."""
    enabled: bool = False
    """Run the checks after training on the merged model and record them in the manifest (`fairness` entry)."""
    probes: str = "data/fairness/probes.jsonl"
    """Probe set: JSONL rows {id, attribute, instruction, input (message with {placeholders}), reference}."""
    terms: str = "data/fairness/terms.yaml"
    """Term groups per attribute: attributes.<attribute>.groups.<group>.<placeholder>: [terms]."""
    fields: list[str] = ["category", "product", "urgency"]
    """JSON fields of the answer compared across counterfactual variants (a flip: a field's value changes)."""
    positive: dict[str, list[str]] = {"urgency": ["high", "critical"]}
    """Group metrics: per field, the labels counted as the positive class (one-vs-rest), e.g. {urgency: [high,
    critical], category: [billing]}."""
    max_terms_per_group: int = Field(2, ge=0)
    """Variants per group and probe: the first N aligned terms of each group (0: all)."""
    max_probes: int = Field(0, ge=0)
    """Use the first N probes of each attribute (0: all)."""
    group_data: Optional[str] = None
    """Optional labelled table for group metrics (JSONL or CSV: instruction, input, output (reference JSON) and the
    group column; a `prediction` column is used as is, otherwise the model answers)."""
    group_column: str = "group"
    """The group column of group_data."""
    max_flip_rate: float = Field(0.10, ge=0, le=1)
    """Flag the model when an attribute's flip rate (any compared field) is above this."""
    max_parity_difference: float = Field(0.10, ge=0, le=1)
    """Flag the model when a demographic parity difference is above this."""
    max_odds_difference: float = Field(0.10, ge=0, le=1)
    """Flag the model when an equal opportunity or equalized odds difference is above this."""
    max_new_tokens: int = Field(28, ge=1)
    """Generation limit. The demo's category, product and urgency come first in the JSON (at most 24 SmolLM2
    tokens) and are read from a cut-off answer too, so the summary need not be generated."""
    batch_size: int = Field(32, ge=1)
    """Generation batch size."""
    examples: int = Field(5, ge=0)
    """Flip examples kept per attribute in the report."""
