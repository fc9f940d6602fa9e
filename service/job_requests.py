"""The bodies of ``POST /v1/jobs`` (and of the jobs a schedule starts): pydantic models that validate a job
request up front, each problem a 422 naming its field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distill.pipeline import EvaluationSpec, StudentSpec
from distill.recipes import RECIPES
from distill.specs import CalibrationSpec, InferenceSpec

NAME = r"^[A-Za-z0-9._-]{1,128}$"
ModelRef = Annotated[
    int | Annotated[str, Field(pattern=NAME)],
    Field(description="a registered model: its id, or its name (that name's promoted version when the job "
          "starts, recorded on the job)"),
]  # fmt: skip


def merge_patch(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``current`` with ``changes`` merged in, objects key by key (a JSON merge patch without deletes):
    ``{"promotion": {"min_gain": 0.01}}`` keeps the metric."""
    out = dict(current)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_patch(out[key], value) if both else value
    return out


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherIn(_Body):
    """The teacher: a registered model (``model``: its id or name), or trained by the job from ``recipe``."""

    model: ModelRef | None = None
    recipe: str = "synth"
    init: Literal["scratch", "imagenet"] = "scratch"
    iterations: int | None = Field(None, ge=1, le=10_000_000)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str) -> str:
        if value not in RECIPES:
            raise ValueError(f"unknown recipe {value!r} (known: {', '.join(RECIPES)})")
        return value


class StudentIn(StudentSpec):
    init: Literal["scratch", "imagenet", "teacher"] = "scratch"
    recipe: str | None = None

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str | None) -> str | None:
        return value if value is None else TeacherIn._known_recipe(value)


class PipelineJobCreate(_Body):
    """A whole distillation round (or ``rounds``): teacher → multi-view inference → pseudo-labels →
    student → evaluation on ``eval`` → promotion decision."""

    type: Literal["pipeline"]
    labeled: int = Field(description="id of a labeled dataset (with annotations)")
    unlabeled: int = Field(description="id of an unlabeled dataset")
    eval: int | None = Field(None, description="id of an eval dataset (teacher vs student)")
    teacher: TeacherIn = TeacherIn()
    inference: InferenceSpec = InferenceSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    student: StudentIn = StudentIn()
    evaluation: EvaluationSpec = EvaluationSpec()
    rounds: int = Field(1, ge=1, le=20)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    model_name: str | None = Field(None, pattern=NAME)
    shard_size: int | None = Field(None, ge=1, le=1_000_000, description="images per shard")


class DistillJobCreate(_Body):
    """Inference + fusion + calibration + pseudo-labels of ``unlabeled`` with a registered teacher."""

    type: Literal["distill"]
    labeled: int = Field(description="id of a labeled dataset (the target density)")
    unlabeled: int
    teacher: ModelRef
    inference: InferenceSpec = InferenceSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    shard_size: int | None = Field(None, ge=1, le=1_000_000)


class TrainJobCreate(_Body):
    type: Literal["train"]
    labeled: int
    recipe: str = "synth"
    init: Literal["scratch", "imagenet"] = "scratch"
    iterations: int | None = Field(None, ge=1, le=10_000_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    model_name: str | None = Field(None, pattern=NAME)

    _known_recipe = field_validator("recipe")(TeacherIn._known_recipe.__func__)


class EvaluateJobCreate(_Body):
    type: Literal["evaluate"]
    model: ModelRef
    eval: int = Field(description="id of an eval (or labeled) dataset")


JobCreate = Annotated[
    PipelineJobCreate | DistillJobCreate | TrainJobCreate | EvaluateJobCreate, Field(discriminator="type")
]
