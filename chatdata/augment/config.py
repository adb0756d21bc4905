"""The `data.augment:` section (and `llmstack augment`'s settings): which operations make new training rows, at what
rate, and the quality filter every new row must pass. Training split only; validation and test rows are never
augmented."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from core.config import Section

DEFAULT_PARAPHRASE = ("Rewrite the following customer message in other words. Keep every fact, product name, number, "
                      "code and the sender's name. Reply with the rewritten message only.")


class Generator(Section):
    """A language model that writes text: a local model or an OpenAI-compatible endpoint."""
    model: str = "base"
    """Local: `base` (the model being fine-tuned), a model folder or a training artifact (its merged/ model). With
    `endpoint`: the model name the endpoint serves."""
    endpoint: Optional[str] = None
    """Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:3000/v1 (this project's `make serve`)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (unset: no key)."""
    temperature: float = Field(0.7, ge=0, le=2)
    """Sampling temperature (0: greedy)."""
    max_new_tokens: int = Field(256, ge=1)
    """Longest generated text, in tokens."""
    batch_size: int = Field(8, ge=1)
    """Prompts per local generation batch (endpoint: concurrent requests)."""


class AugmentOp(Section):
    """One operation. Fields that do not apply to `op` are ignored."""
    op: Literal["char_noise", "word_noise", "casing", "slots", "synonyms", "paraphrase", "counterfactual"]
    """char_noise: typos, swapped / deleted / inserted letters (nlpaug); word_noise: deleted or swapped words (nlpaug);
    casing: words lower- or upper-cased; slots: values matched by `slots` replaced by others from the data, in prompt
    and answer alike; synonyms: a surface form replaced by another of its group (`synonyms`), answer unchanged; paraphrase: a language model rewrites the message (`generator`); counterfactual: names and
    gendered or national terms swapped for another group's (`terms`), labels unchanged."""
    rate: float = Field(1.0, ge=0, le=10)
    """New rows per original row, on average: 0.5 gives a seeded half of the rows one each, 2 gives every row two."""
    seed: int = 0
    """Seed of this operation (which rows, which edits)."""
    strength: float = Field(0.1, gt=0, le=1)
    """char_noise / word_noise / casing: share of the message's words changed."""
    slots: dict[str, str] = {}
    """slots: name -> regular expression of a value that appears in the prompt and may appear in the answer, e.g.
    {error_code: 'ERR-\\d+'}; a new row replaces every value of one slot by another value seen in the training rows."""
    synonyms: str | dict[str, list[str]] = {}
    """synonyms: named groups of interchangeable surface forms (e.g. a product id -> its names), inline or the path of
    a YAML file with that mapping; a new row replaces every form of one group found in the message by other forms
    of that group (e.g. data/tickets/product_forms.yaml)."""
    generator: Generator = Field(default_factory=Generator)
    """paraphrase: the model that rewrites."""
    instruction: str = DEFAULT_PARAPHRASE
    """paraphrase: what the model is asked to do with the message (the message follows it)."""
    answer_model: Optional[Generator] = None
    """paraphrase: for tasks whose answer depends on the wording (free text, summaries), this model answers each new
    prompt (greedy) and its answer replaces the original's; null keeps the original answer (labels)."""
    terms: str = "data/fairness/augment_terms.yaml"
    """counterfactual: the term groups to swap (the format of the fairness check's terms.yaml). Keep them apart from
    the terms the fairness probes use, so the check measures terms the model never saw swapped."""
    attributes: list[str] = []
    """counterfactual: attributes of `terms` to swap (empty: every attribute)."""

    @model_validator(mode="after")
    def _needs(self):
        if self.op == "slots" and not self.slots:
            raise ValueError("op slots needs `slots:` (name -> regular expression)")
        if self.op == "synonyms" and not self.synonyms:
            raise ValueError("op synonyms needs `synonyms:` (group -> interchangeable forms, or a YAML file of that)")
        return self


class AugmentFilter(Section):
    """What an augmented row must pass to be kept; every drop is listed with its reason in the data report."""
    dedup: bool = True
    """Drop new rows that are exact or near duplicates (MinHash) of an original row or of another new row."""
    near_dup_threshold: Optional[float] = Field(None, gt=0, le=0.98)
    """Similarity at or above which a new row is a near duplicate (null: data.near_dup_threshold). An edit of one
    name in a long message stays above 0.9: raise it for operations that change little on purpose (synonyms)."""
    min_length_ratio: float = Field(0.5, ge=0)
    """Drop a new row whose message is shorter than this times its original's."""
    max_length_ratio: float = Field(2.0, gt=0)
    """Drop a new row whose message is longer than this times its original's."""
    same_language: bool = True
    """Drop a new row whose message is not in its original's language (py3langid)."""
    label_check: Optional[Generator] = None
    """Label preservation: this model answers each new row's prompt (greedy), and the row is dropped when a label
    field of its answer differs from the original's answer (e.g. a fine-tuned artifact; null: no check)."""
    label_fields: list[str] = []
    """JSON answer fields that are labels (empty: the label-like fields the data report finds)."""
    max_per_original: int = Field(2, ge=1)
    """At most this many new rows per original row (all operations together; later ones dropped as `cap`)."""


class AugmentCfg(Section):
    operations: list[AugmentOp] = []
    """The operations, applied in order, each to the original rows (empty: no augmentation)."""
    filter: AugmentFilter = Field(default_factory=AugmentFilter)
    """The quality filter for the new rows."""
