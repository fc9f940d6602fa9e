"""Scheduled retraining: cron slots → pipeline jobs over the newest images, with the promotion gate.

A schedule names a model (its promoted version is the teacher), a labeled, an unlabeled and an eval dataset,
the pipeline settings, a cron expression in a time zone, ``min_new_images`` and the promotion rule. Celery
beat sends ``distill.tick_schedules`` every few seconds; a tick (:func:`tick`) looks at each active
schedule's latest due slot and, when no run of that slot exists, records one:

- *skipped* when its previous run is still going, when fewer than ``min_new_images`` unlabeled images arrived
  since the last successful run, or when the model has no promoted version;
- *started* with a pipeline job otherwise — the run row is inserted in the job's own transaction, and
  ``(schedule, slot)`` is unique, so two beat processes (or a beat restarted mid-tick) start one job per
  slot, never two. Only the latest due slot counts: slots missed while beat was down are not caught up.

When the job's ``decide`` stage finishes a round, :func:`apply_gate` promotes its student over the teacher
if the round's decision says it won (beat the teacher on the eval dataset by ``min_gain``, and passed the
health checks) and the teacher is still the promoted version; the outcome is the ``promotion`` of that
round's decision (``job.metrics["decide@K"]["promotion"]``), and a refusal ends the job.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from distill.errors import InputError
from service import ledger, registry
from service.datasets import Conflict
from service.db import transaction
from service.job_requests import PipelineJobCreate
from service.models import Image, Job, Model, Schedule, ScheduleRun, aware, utcnow
from service.runtime import Runtime
from service.submit import submit_job

logger = logging.getLogger(__name__)

NEXT_RUNS = 5


def zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(
            f"timezone: {timezone!r} is not an IANA time zone (e.g. UTC, Europe/Paris)"
        ) from None


def check_cron(cron: str) -> str:
    """``cron`` if it is a valid 5-field cron expression, else an :class:`InputError` naming ``cron``.
    croniter's random and hashed fields (``R``, ``H``) are refused: each parse would pick other times, and a
    slot must be the same moment at every tick."""
    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise InputError(f"cron: {cron!r} is not a cron expression (5 fields: minute hour day month weekday)")
    if any(mark in cron.upper() for mark in ("R", "H")):
        raise InputError(f"cron: {cron!r}: random (R) and hashed (H) fields are not supported")
    return cron


def next_runs(cron: str, timezone: str, after: dt.datetime, count: int = NEXT_RUNS) -> list[dt.datetime]:
    """The next ``count`` slots of ``cron`` in ``timezone`` after ``after`` (aware, in that zone)."""
    it = croniter(check_cron(cron), after.astimezone(zone(timezone)))
    try:
        return [it.get_next(dt.datetime) for _ in range(count)]
    except CroniterBadDateError:  # a date that never comes (30 February)
        raise InputError(f"cron: {cron!r} never fires") from None


SCAN = dt.timedelta(hours=26)  # a day and a daylight-saving shift


def due_slot(schedule: Schedule, now: dt.datetime) -> dt.datetime | None:
    """The latest slot of ``schedule`` at or before ``now`` and after its last change (UTC), or None.

    Found by stepping forward (``get_next``) through the last 26 hours, because croniter's ``get_prev``
    skips or repeats slots around a daylight-saving change; a sparser cron (weekly, monthly) with no slot in
    that window falls back to ``get_prev``."""
    since = aware(schedule.updated_at)
    try:
        tz = zone(schedule.timezone)
    except InputError:  # a zone this machine's tz database lacks: no slot is due
        return None
    if now <= since:
        return None
    try:
        it = croniter(schedule.cron, max(since, now - SCAN).astimezone(tz))
        slot = None
        while (candidate := it.get_next(dt.datetime).astimezone(dt.UTC)) <= now:
            slot = candidate
        if slot is None and now - SCAN > since:
            back = croniter(schedule.cron, (now - SCAN).astimezone(tz) + dt.timedelta(microseconds=1))
            slot = back.get_prev(dt.datetime).astimezone(dt.UTC)
    except (CroniterBadCronError, CroniterBadDateError, ValueError):
        return None
    return slot if slot is not None and slot > since else None


def pipeline_request(schedule: Schedule, teacher: int | str) -> PipelineJobCreate:
    """The pipeline job a run of ``schedule`` starts with ``teacher``: a model id, or a name (resolved to its
    promoted version when the job is created)."""
    promotion = schedule.promotion or {}
    return PipelineJobCreate.model_validate(
        {
            **(schedule.pipeline or {}),
            "type": "pipeline",
            "labeled": schedule.labeled,
            "unlabeled": schedule.unlabeled,
            "eval": schedule.eval,
            "teacher": {"model": teacher},
            "evaluation": {
                "primary": promotion.get("metric", "bbox/AP"),
                "min_gain": promotion.get("min_gain", 0),
            },
            "model_name": schedule.model,
        }
    )


# -- ticks ---------------------------------------------------------------------------------------------------
def tick(runtime: Runtime, now: float) -> list[int]:
    """Start or skip the due slot of every active schedule at unix time ``now``; returns the new run ids."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    with runtime.sessions() as session:
        active = list(session.scalars(select(Schedule).where(Schedule.paused.is_(False))))
    runs = []
    for schedule in active:
        slot = due_slot(schedule, moment)
        if slot is None:
            continue
        try:
            run_id = run_slot(runtime, schedule.id, slot)
        except Exception:  # one broken schedule must not stop the others
            logger.exception("schedule %s: slot %s failed", schedule.name, slot.isoformat())
            continue
        if run_id is not None:
            runs.append(run_id)
    return runs


def _run_exists(session: Session, schedule_id: int, slot: dt.datetime) -> bool:
    query = select(ScheduleRun.id).where(ScheduleRun.schedule_id == schedule_id, ScheduleRun.slot == slot)
    return session.scalar(query) is not None


def _image_counts(session: Session, dataset_id: int, *, since: int) -> dict[str, int]:
    """The unlabeled dataset's images now, how many came after image id ``since``, and the newest id."""
    total, upto = session.execute(
        select(func.count(Image.id), func.max(Image.id)).where(Image.dataset_id == dataset_id)
    ).one()
    new = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset_id, Image.id > since))
    return {"images": int(total or 0), "new_images": int(new or 0), "images_upto": int(upto or 0)}


def _why_not(session: Session, schedule: Schedule) -> tuple[str | None, dict[str, Any], int]:
    """Why the schedule's next run should not start now (None: it should), the run's image counts, and
    the newest image id of the last successful run (images after it are new)."""
    last = session.scalars(
        select(ScheduleRun)
        .where(ScheduleRun.schedule_id == schedule.id, ScheduleRun.state == "started")
        .order_by(ScheduleRun.id.desc())
    ).first()
    if last is not None and last.job_id is not None:
        job = session.get(Job, last.job_id)
        if job is not None and job.state in ledger.ACTIVE:
            return f"the previous run (job {job.id}) is still {job.state}", {}, 0
    succeeded = session.scalars(
        select(ScheduleRun)
        .join(Job, Job.id == ScheduleRun.job_id)
        .where(ScheduleRun.schedule_id == schedule.id, Job.state == "succeeded")
        .order_by(ScheduleRun.id.desc())
    ).first()
    since = 0
    if succeeded is not None:
        job = session.get(Job, succeeded.job_id)
        same = job is not None and (job.spec.get("datasets") or {}).get("unlabeled") == schedule.unlabeled
        since = succeeded.images_upto if same else 0  # another unlabeled dataset: every image is new
    counts = _image_counts(session, schedule.unlabeled, since=since)
    if counts["new_images"] < schedule.min_new_images:
        after = "ever" if succeeded is None else f"since the last successful run (job {succeeded.job_id})"
        needs = schedule.min_new_images
        return (
            f"{counts['new_images']} new unlabeled images {after}; the schedule needs {needs}",
            counts,
            since,
        )
    if registry.promoted_model(session, schedule.model) is None:
        return f"model {schedule.model!r} has no promoted version to use as the teacher", counts, since
    return None, counts, since


class _Stale(Exception):
    """The schedule was paused, edited or deleted after the tick chose the slot."""


def _current(session: Session, schedule_id: int, slot: dt.datetime) -> Schedule:
    """The schedule, its row locked until the transaction ends, if ``slot`` is still one of its due slots
    (not paused, not edited since); else :class:`_Stale`. A PATCH waits for the lock, or is waited for."""
    schedule = session.get(Schedule, schedule_id, with_for_update=True, populate_existing=True)
    if schedule is None or schedule.paused or not slot > aware(schedule.updated_at):
        raise _Stale
    return schedule


def _record(
    runtime: Runtime, schedule_id: int, slot: dt.datetime, state: str, reason: str, **fields
) -> int | None:
    """Record a slot that starts no job (``skipped``, or ``failed`` to start); None: already recorded, or
    the schedule changed meanwhile."""
    with transaction(runtime.sessions) as session:
        try:
            _current(session, schedule_id, slot)
        except _Stale:
            return None
        run = ScheduleRun(schedule_id=schedule_id, slot=slot, state=state, reason=reason, **fields)
        try:
            with session.begin_nested():
                session.add(run)
        except IntegrityError:
            return None  # another tick recorded this slot
        logger.info("schedule %d: slot %s %s: %s", schedule_id, slot.isoformat(), state, reason)
        return run.id


def run_slot(runtime: Runtime, schedule_id: int, slot: dt.datetime) -> int | None:
    """Record what ``slot`` of the schedule does (start a job, skip, or fail to start, with the reason);
    None when it was already recorded, or the schedule was paused or changed after the slot was chosen."""
    with runtime.sessions() as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is None or schedule.paused or _run_exists(session, schedule_id, slot):
            return None
        reason, counts, since = _why_not(session, schedule)
        name, created_by, request = schedule.model, schedule.created_by, None
        if reason is None:
            try:  # the model by name: its promoted version when the job is created
                request = pipeline_request(schedule, name)
            except ValueError as exc:  # settings that were valid once and are not now
                reason = f"the schedule's pipeline settings are invalid: {exc}"
    if reason is not None or request is None:
        return _record(runtime, schedule_id, slot, "skipped", reason or "invalid settings", **counts)
    run_ids: list[int] = []

    def on_create(session: Session, job_id: int, models: dict[str, Any]) -> dict[str, Any]:
        schedule = _current(session, schedule_id, slot)
        teacher_id = models["teacher"]["id"]
        run = ScheduleRun(
            schedule_id=schedule_id, slot=slot, state="started", job_id=job_id, teacher_id=teacher_id,
            **_image_counts(session, schedule.unlabeled, since=since),  # counted in the job's transaction
        )  # fmt: skip
        session.add(run)
        session.flush()  # the unique (schedule, slot) decides here, before any input is snapshotted
        run_ids.append(run.id)
        return {
            "schedule": {"id": schedule_id, "run": run.id, "slot": slot.isoformat()},
            "promote": {"name": name},
        }

    try:
        job_id = submit_job(runtime, request, created_by=created_by, on_create=on_create)
    except (IntegrityError, _Stale):
        return None  # another tick started this slot, or the schedule changed since the tick chose it
    except InputError as exc:  # a dataset gone, or no promoted version, since the checks above
        return _record(runtime, schedule_id, slot, "skipped", f"the job was refused: {exc}", **counts)
    except SQLAlchemyError:
        raise  # the database: the next tick tries this slot again
    except Exception as exc:  # storage and the like: recorded, so the slot does not vanish unexplained
        logger.exception("schedule %d: slot %s could not start", schedule_id, slot.isoformat())
        return _record(runtime, schedule_id, slot, "failed", f"{type(exc).__name__}: {exc}", **counts)
    logger.info("schedule %d: slot %s started job %d", schedule_id, slot.isoformat(), job_id)
    return run_ids[0]


# -- the promotion gate --------------------------------------------------------------------------------------
def apply_gate(session: Session, job: Job, decision: dict[str, Any]) -> dict[str, Any] | None:
    """Promote the round's student when its decision says so and its teacher is still promoted; returns the
    outcome, recorded as the decision's ``promotion`` (None: the job does not promote)."""
    gate = (job.spec or {}).get("promote")
    if not gate:
        return None
    student = registry.model_by_key(session, decision.get("student", ""))
    teacher = registry.model_by_key(session, decision.get("teacher", ""))
    outcome: dict[str, Any] = {"promoted": False, "name": gate["name"]}
    if student is not None:
        outcome |= {"model_id": student.id, "version": student.version}
    primary = decision.get("primary") or {}
    health = decision.get("health") or []
    if student is None or teacher is None:
        outcome["reason"] = "the round's student or teacher is not registered"
    elif health:
        outcome["reason"] = "failed the health checks: " + "; ".join(health)
    elif not decision.get("promoted"):
        outcome["reason"] = _verdict(primary, _min_gain(job), won=False)
    else:
        reason = _verdict(primary, _min_gain(job), won=True) + f" (job {job.id})"
        try:
            registry.promote(session, student, reason=reason, job_id=job.id, expected=teacher)
        except Conflict as exc:
            outcome["reason"] = f"not promoted: {exc}"
        else:
            outcome |= {"promoted": True, "reason": reason}
    return outcome


def _min_gain(job: Job) -> float:
    return float(((job.spec or {}).get("config") or {}).get("evaluation", {}).get("min_gain", 0.0))


def _verdict(primary: dict[str, Any], min_gain: float, *, won: bool) -> str:
    if not primary:
        return "no evaluation decided the round"
    did = "beat" if won else "did not beat"
    return (
        f"{primary.get('metric')}: student {100 * primary.get('student', 0):.1f} {did} the promoted "
        f"version's {100 * primary.get('teacher', 0):.1f} by more than "
        f"min_gain {100 * min_gain:g} (AP points)"
    )


def describe_teacher(session: Session, model_id: int | None) -> dict[str, Any] | None:
    model = None if model_id is None else session.get(Model, model_id)
    return None if model is None else {"id": model.id, "name": model.name, "version": model.version}


def touch(schedule: Schedule) -> None:
    """Mark a schedule changed now: slots before this moment never run (an edit or resume starts afresh)."""
    schedule.updated_at = utcnow()
