"""What each step is asked to do (its spec) and what it reports back (:class:`StepResult`).

Specs are plain pydantic records of storage keys and settings, so a worker can receive one as JSON, and the
same spec run twice does the same thing: every output key is named by the spec, and a step finding its
output complete reports it as ``reused`` instead of redoing it. See :mod:`distill.steps`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferenceSpec(_Strict):
    """How the teacher runs on unlabeled images (the pipeline's ``inference:`` section)."""

    views: str = "paper"
    fusion: Literal["nms", "vote", "soft-nms", "wbf"] = "nms"
    batch_size: int = Field(2, ge=1)
    max_detections: int = Field(100, ge=1)
    score_floor: float = Field(0.0, ge=0, le=1)
    view_score_thresh: float | None = Field(None, ge=0, le=1)
    feature_cache_mb: float | None = Field(None, ge=0)  # None: sized from the free memory (FusionConfig)


class CalibrationSpec(_Strict):
    """How fused predictions become hard labels (the pipeline's ``calibration:`` section)."""

    per_class: bool = False
    threshold: float | None = None
    keypoint_threshold: float | None = None
    min_agreement: float | None = Field(None, ge=0, le=1)
    strict: bool = False

    @model_validator(mode="after")
    def _exclusive(self) -> CalibrationSpec:
        if self.threshold is not None and self.per_class:
            raise ValueError("threshold and per_class exclude each other")
        return self


class TrainSpec(_Strict):
    """Train a model directory ``out`` on ``labeled`` (+ ``pseudo`` at ``ratio``: a student).

    ``config``: torchvision: a recipe name or YAML (``model:`` / ``train:``); detectron2: its config (a
    ``.yaml`` or a model-zoo name). ``architecture_from``: a detectron2 model directory whose config the new
    model copies, re-initialised (a student of a detectron2 teacher). ``init``: ``scratch``, ``imagenet`` or
    a key of a model directory / weights file.
    """

    out: str
    labeled: str
    labeled_images: str
    pseudo: str | None = None
    pseudo_images: str | None = None
    ratio: tuple[float, float] = (6.0, 4.0)
    backend: str = "torchvision"
    config: str | None = None
    config_overrides: list[str] = Field(default_factory=list)  # detectron2 KEY VALUE pairs, flat
    architecture_from: str | None = None
    init: str = "scratch"
    iterations: int | None = Field(None, ge=1)
    seed: int | None = None
    train_overrides: dict[str, Any] = Field(default_factory=dict)  # torchvision TrainConfig fields
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # torchvision ModelConfig fields
    device: str = "cpu"


class InferSpec(_Strict):
    """Fused multi-view predictions of ``model`` on shard ``shard[0]`` of ``shard[1]`` of ``images``, as
    JSON lines at ``out``. Shards are contiguous slices of the image list in its order.

    ``cache``: a storage key prefix under which each image's fused prediction is kept, by the model files,
    the settings that change the output and the image's sha256 (see :func:`distill.steps.infer`); an image
    found there is not run again. None: nothing is cached.
    """

    model: str
    images: str  # COCO json or image folder
    images_dir: str | None = None  # folder of a json's file names
    out: str
    shard: tuple[int, int] = (0, 1)
    inference: InferenceSpec = InferenceSpec()
    device: str = "cpu"
    cache: str | None = None

    @model_validator(mode="after")
    def _shard_in_range(self) -> InferSpec:
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard {index} of {count}: need 0 <= index < count")
        return self


class PseudoLabelSpec(_Strict):
    """Calibrate on the fused ``predictions`` (JSON-lines or COCO results keys, e.g. every shard of a run,
    in shard order) and write the pseudo-label COCO file ``out`` (+ ``.calibration.json`` / ``.png``)."""

    predictions: list[str] = Field(min_length=1)
    unlabeled: str
    unlabeled_images: str | None = None
    labeled: str
    out: str
    calibration: CalibrationSpec = CalibrationSpec()
    provenance: dict[str, Any] = Field(default_factory=dict)


class EvaluateSpec(_Strict):
    """COCO metrics of ``model`` on the labeled split ``truth``, written to ``out`` when given."""

    model: str
    truth: str
    images: str | None = None
    out: str | None = None
    batch_size: int = Field(4, ge=1)
    device: str = "cpu"


class StepResult(BaseModel):
    """What a step made: artifact keys by role, metrics, warnings, and whether it only found them done."""

    step: str
    artifacts: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)
    reused: bool = False
