"""``/v1/schedules``: scheduled retraining — create (cron and time zone validated, the next run times in
the answer), list, read, pause / resume / edit, delete, and each schedule's history of runs with their
decisions. What a tick does is :mod:`service.schedules`'."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from distill.errors import InputError
from distill.pipeline import EvaluationSpec
from distill.specs import CalibrationSpec, InferenceSpec
from service import schedules
from service.api.deps import Read, SessionDep, WriteToken, get_or_404, http_errors, page
from service.job_requests import NAME, StudentIn, merge_patch
from service.models import Job, Model, Schedule, ScheduleRun, aware
from service.submit import ROLE_KINDS, check_dataset

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineSettings(_Body):
    """The pipeline each run starts (its teacher is the model's promoted version, its eval dataset and
    promotion rule the schedule's)."""

    inference: InferenceSpec = InferenceSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    student: StudentIn = StudentIn()
    rounds: int = Field(1, ge=1, le=20)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    shard_size: int | None = Field(None, ge=1, le=1_000_000)


class PromotionRule(_Body):
    metric: str = Field("bbox/AP", description="IOU_TYPE/METRIC on the eval dataset, e.g. keypoints/AP")
    min_gain: float = Field(0.0, ge=0, le=1, description="in the metric's units (AP: 0..1)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return EvaluationSpec(primary=value).primary


class ScheduleFields(_Body):
    cron: str = Field(description="5-field cron: minute hour day-of-month month day-of-week")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in")
    model: str = Field(pattern=NAME, description="a model name: its promoted version is each run's teacher")
    labeled: int = Field(ge=1, description="id of a labeled dataset")
    unlabeled: int = Field(ge=1, description="id of the unlabeled dataset new images arrive in")
    eval: int = Field(ge=1, description="id of the eval dataset the promotion gate scores on")
    pipeline: PipelineSettings = PipelineSettings()
    min_new_images: int = Field(0, ge=0, le=2**31 - 1, description="skip a slot with fewer new images")
    promotion: PromotionRule = PromotionRule()


class ScheduleCreate(ScheduleFields):
    name: str = Field(pattern=NAME)


class ScheduleUpdate(_Body):
    """Any of a schedule's fields, and ``paused``. A change (or a resume) counts slots afresh from now."""

    cron: str | None = None
    timezone: str | None = None
    model: str | None = Field(None, pattern=NAME)
    labeled: int | None = Field(None, ge=1)
    unlabeled: int | None = Field(None, ge=1)
    eval: int | None = Field(None, ge=1)
    pipeline: PipelineSettings | None = None
    min_new_images: int | None = Field(None, ge=0, le=2**31 - 1)
    promotion: PromotionRule | None = None
    paused: bool | None = None


class SchedulePublic(ScheduleCreate):
    model_config = ConfigDict(extra="ignore")

    id: int
    paused: bool
    next_runs: list[str] = Field(description="the next slots in the schedule's time zone (none: paused)")
    created_at: str
    updated_at: str


class SchedulesPublic(BaseModel):
    data: list[SchedulePublic]
    count: int


class RunPublic(BaseModel):
    id: int
    slot: str = Field(description="the cron slot, UTC")
    state: str = Field(description="started | skipped | failed (could not start: the reason says why)")
    reason: str = Field(description="why a slot was skipped")
    job_id: int | None
    job_state: str | None
    teacher: dict[str, Any] | None = Field(description="the promoted version the run started with")
    images: int = Field(description="unlabeled images when the run started")
    new_images: int = Field(description="of them new since the last successful run")
    decision: dict[str, Any] | None = Field(
        description="the last round's decision: promoted, primary metric, health, both metric sets"
    )
    promotion: dict[str, Any] | None = Field(
        description="what the promotion gate did, and why: the round that promoted (the last one, if several "
        "did), else the last round's refusal"
    )
    rounds: list[dict[str, Any]] = Field(description="each round's gate outcome, in order")
    created_at: str


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


def _public(schedule: Schedule) -> SchedulePublic:
    upcoming = []
    if not schedule.paused:
        now = dt.datetime.now(dt.UTC)
        upcoming = [t.isoformat() for t in schedules.next_runs(schedule.cron, schedule.timezone, now)]
    return SchedulePublic(
        id=schedule.id, name=schedule.name, cron=schedule.cron, timezone=schedule.timezone,
        model=schedule.model, labeled=schedule.labeled, unlabeled=schedule.unlabeled, eval=schedule.eval,
        pipeline=PipelineSettings.model_validate(schedule.pipeline or {}),
        min_new_images=schedule.min_new_images,
        promotion=PromotionRule.model_validate(schedule.promotion or {}), paused=schedule.paused,
        next_runs=upcoming, created_at=aware(schedule.created_at).isoformat(),
        updated_at=aware(schedule.updated_at).isoformat(),
    )  # fmt: skip


def _validate(session, fields: ScheduleFields) -> None:
    """Everything a run will need, checked now: cron, zone, datasets and their kinds, the model name, and
    the pipeline the run would start (each problem an InputError naming the field)."""
    schedules.next_runs(fields.cron, fields.timezone, dt.datetime.now(dt.UTC), count=1)  # checks the cron
    for role in ROLE_KINDS:
        check_dataset(session, role, getattr(fields, role))
    if fields.eval == fields.labeled:
        raise InputError(
            f"eval: dataset {fields.eval} is the labeled dataset: the gate would score on training data"
        )
    if session.scalar(select(Model.id).where(Model.name == fields.model).limit(1)) is None:
        raise InputError(f"model: no model is registered as {fields.model!r}")
    plain = set(ScheduleFields.model_fields) - {"pipeline", "promotion"}
    probe = Schedule(
        **fields.model_dump(mode="json", include=plain),
        pipeline=fields.pipeline.model_dump(mode="json"), promotion=fields.promotion.model_dump(mode="json"),
    )  # fmt: skip
    try:
        schedules.pipeline_request(probe, fields.model)
    except ValidationError as exc:
        raise InputError(f"pipeline: {exc.errors()[0]['msg']}") from None


def _schedule(session, schedule_id: int) -> Schedule:
    return get_or_404(session, Schedule, schedule_id, "schedule")


@router.post("", status_code=status.HTTP_201_CREATED, operation_id="create_schedule")
def create_schedule(body: ScheduleCreate, session: SessionDep, token: WriteToken) -> SchedulePublic:
    """A schedule; 422 naming the field for a bad cron, time zone, dataset, model or pipeline setting, 409
    for a name in use. Its first slot is the first cron time after now."""
    http_errors(lambda: _validate(session, body))
    if session.scalar(select(Schedule.id).where(Schedule.name == body.name)) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"a schedule is already named {body.name!r}")
    schedule = Schedule(
        name=body.name, **body.model_dump(mode="json", exclude={"name", "pipeline", "promotion"}),
        pipeline=body.pipeline.model_dump(mode="json", exclude_defaults=True),
        promotion=body.promotion.model_dump(mode="json"), created_by=token.id,
    )  # fmt: skip
    try:
        with session.begin_nested():
            session.add(schedule)
    except IntegrityError:  # created at the same moment by another request
        raise HTTPException(status.HTTP_409_CONFLICT, f"a schedule is already named {body.name!r}") from None
    return _public(schedule)


@router.get("", operation_id="list_schedules", dependencies=[Read])
def list_schedules(
    session: SessionDep, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)
) -> SchedulesPublic:
    rows, count = page(session, select(Schedule), Schedule.id, offset, limit)
    return SchedulesPublic(data=[_public(s) for s in rows], count=count)


@router.get("/{schedule_id}", operation_id="get_schedule", dependencies=[Read])
def get_schedule(schedule_id: int, session: SessionDep) -> SchedulePublic:
    return _public(_schedule(session, schedule_id))


@router.patch("/{schedule_id}", operation_id="update_schedule")
def update_schedule(
    schedule_id: int, body: ScheduleUpdate, session: SessionDep, token: WriteToken
) -> SchedulePublic:
    """Pause (``{"paused": true}``), resume, or edit; the result is validated as a whole (422)."""
    schedule = session.get(Schedule, schedule_id, with_for_update=True)  # a tick starting a slot waits
    if schedule is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"schedule {schedule_id} does not exist")
    current = ScheduleFields.model_validate(
        {k: getattr(schedule, k) for k in ScheduleFields.model_fields}
    ).model_dump(mode="json")
    changes = body.model_dump(mode="json", exclude_unset=True)
    paused = changes.pop("paused", None)
    merged = http_errors(lambda: _merge(current, changes))
    changed = merged.model_dump(mode="json") != current
    if changed:
        http_errors(lambda: _validate(session, merged))
        for key in ScheduleFields.model_fields:
            value = getattr(merged, key)
            setattr(schedule, key, value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
    resumed = paused is False and schedule.paused
    if paused is not None:
        schedule.paused = paused
    if changed or resumed:
        schedules.touch(schedule)  # slots that passed while paused or before the edit do not run
    session.flush()
    return _public(schedule)


def _merge(current: dict[str, Any], changes: dict[str, Any]) -> ScheduleFields:
    try:
        return ScheduleFields.model_validate(merge_patch(current, changes))
    except ValidationError as exc:
        error = exc.errors()[0]
        raise InputError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


@router.delete("/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT, operation_id="delete_schedule")
def delete_schedule(schedule_id: int, session: SessionDep, token: WriteToken) -> Response:
    """Delete a schedule and its run history; the jobs it started and their models stay."""
    session.delete(_schedule(session, schedule_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{schedule_id}/runs", operation_id="list_schedule_runs", dependencies=[Read])
def list_schedule_runs(
    schedule_id: int,
    session: SessionDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> RunsPublic:
    """The schedule's runs, the newest first: the job each started (or why the slot was skipped), the
    images it considered, the decision and both metric sets."""
    _schedule(session, schedule_id)
    query = select(ScheduleRun).where(ScheduleRun.schedule_id == schedule_id)
    rows, count = page(session, query, ScheduleRun.id.desc(), offset, limit)
    return RunsPublic(data=[_run_public(session, run) for run in rows], count=count)


def _run_public(session, run: ScheduleRun) -> RunPublic:
    job = None if run.job_id is None else session.get(Job, run.job_id)
    decisions: list[dict[str, Any]] = []
    if job is not None:
        metrics = job.metrics or {}
        decides = [stage for stage in (job.plan or []) if stage.partition("@")[0] == "decide"]
        decisions = [metrics[s] for s in decides if s in metrics]
    outcomes = [d["promotion"] for d in decisions if d.get("promotion")]
    promotion = next((o for o in reversed(outcomes) if o.get("promoted")), outcomes[-1] if outcomes else None)
    last = decisions[-1] if decisions else None
    return RunPublic(
        id=run.id, slot=aware(run.slot).isoformat(), state=run.state, reason=run.reason,
        job_id=run.job_id, job_state=None if job is None else job.state,
        teacher=schedules.describe_teacher(session, run.teacher_id), images=run.images,
        new_images=run.new_images,
        decision=None if last is None else {k: v for k, v in last.items() if k != "promotion"},
        promotion=promotion, rounds=outcomes, created_at=aware(run.created_at).isoformat(),
    )  # fmt: skip
