"""`llmstack retrain` settings (configs/retrain.yaml): which traffic, how the new model is trained and compressed, how
old and new are compared, the promotion rule, and where the running service is."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from core.config import Section
from tracking.config import RegistryCfg, TrackingCfg


class TrafficCfg(Section):
    request_log: str = "artifacts/serve/requests.sqlite"
    """The service's request log (monitoring.request_log in the serve config; rotated files are read too)."""
    select: Literal["review", "drifted", "all"] = "drifted"
    """review: the rows of `review` a person accepted or corrected (their answers are trained on); drifted: logged
    requests whose prompts fall outside the served model's drift reference, with the served model's own answers;
    all: every successful logged request, with its answers."""
    review: Optional[str] = None
    """A reviewed export (`llmstack log export --out F`, then each row's `review` set to accepted, corrected or
    rejected, and corrected answers edited in the assistant message). Needed for select=review."""
    since_hours: Optional[float] = Field(None, gt=0)
    """Only requests from the last N hours (drifted, all)."""
    min_rows: int = Field(20, ge=1)
    """Fewer selected rows than this for training: stop with an error instead of training on too little."""
    holdout: float = Field(0.25, ge=0, lt=1)
    """Share of the selected rows kept out of training (seeded) to score old and new models on the drifted traffic;
    unused when evaluate.drifted names a labelled file."""
    seed: int = 42


class TrainingCfg(Section):
    original_share: float = Field(1.0, gt=0)
    """Weight of the served model's own training rows in the mix (its saved data/train.jsonl; 1.0: each once, 0.5:
    a seeded half): keeps the task it had while it learns the new traffic."""
    traffic_weight: float = Field(1.0, gt=0)
    """Weight of the selected traffic rows (2.0: each twice)."""
    overrides: list[str] = ["train.max_steps=60", "train.lr=1e-3", "data.dedup_near=false"]
    """section.key=value overrides of the served model's training config (the training artifact's resolved config),
    e.g. a shorter run: the new model continues from the served model's merged weights."""
    output_dir: str = "artifacts/retrain/train"
    """Where the candidate's training artifact goes (not artifacts/train: `latest` there stays what was promoted)."""


class CompressCfg(Section):
    enabled: Literal["auto", "true", "false"] = "auto"
    """auto: compress (the fast path: the first variant that passes the gate) when the served model is a compress
    variant, serve the training artifact when it is one."""
    config: str = "configs/compress.yaml"
    output_dir: str = "artifacts/retrain/compress"


class EvaluateCfg(Section):
    heldout: Optional[str] = None
    """Labelled held-out rows of the original task; default: the served training run's saved test split."""
    drifted: Optional[str] = None
    """Labelled rows of the drifted traffic; default: the held-out share of the selected traffic."""
    max_rows: int = Field(100, ge=1)
    """First N rows of each set (time: two models generate on each)."""
    metric: str = "exact_match"
    """The task metric the rule compares (exact_match, or a field's accuracy such as category_accuracy)."""


class PromotionCfg(Section):
    max_heldout_drop: float = Field(0.02, ge=0)
    """No regression: the new model's held-out metric may be at most this much below the served model's."""
    min_drifted_gain: float = Field(0.0, ge=-1, le=1)
    """Gain: the new model's metric on the drifted rows must exceed the served model's by more than this (a
    negative value accepts a drop of at most that much)."""


class ServiceCfg(Section):
    url: str = "http://127.0.0.1:3000"
    """The running `llmstack serve` that --promote swaps (POST /admin/reload)."""
    api_key_env: str = "LLMSTACK_API_KEY"
    """Environment variable with a key allowed to swap (the default key, or a named key with admin: true)."""


class RetrainConfig(Section):
    """Retraining from served traffic: select → train (served model's lineage) → compress → compare → decide."""
    served: str = "artifacts/compress/latest"
    """The served model (as `llmstack serve --model` takes it): the new model's lineage parent and the baseline."""
    traffic: TrafficCfg = TrafficCfg()
    training: TrainingCfg = TrainingCfg()
    compress: CompressCfg = CompressCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    promotion: PromotionCfg = PromotionCfg()
    service: ServiceCfg = ServiceCfg()
    output_dir: str = "artifacts/retrain"
    """Where each retrain run's record goes (`<dir>/<run-id>/`: manifest, report.md, predictions) and its selected
    rows (`<dir>/traffic/<run-id>/`: what the candidate trained on and the held-out drifted rows)."""
    tracking: TrackingCfg = TrackingCfg()
    """The decision is logged to MLflow (params: the rule; metrics: old / new on both sets; tag: the decision)."""
    registry: RegistryCfg = RegistryCfg()
    """With --promote, the promoted folder becomes a version of the registered model and gets its alias."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.traffic.select == "review" and not self.traffic.review:
            raise ValueError("traffic.select is review but traffic.review names no file")
        if not self.evaluate.drifted and self.traffic.holdout == 0:
            raise ValueError("nothing to score the drifted traffic on: set traffic.holdout > 0 or evaluate.drifted")
        return self
