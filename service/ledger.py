"""The job ledger: the SQL rows that say which unit of which job runs where, and when a job moves on.

A job runs a *plan*: stages in order (a distill job: ``infer`` then ``pseudo_label``; a pipeline job:
``teacher``, ``evaluate_teacher``, ``infer``, ``pseudo_label``, ``student``, ``evaluate_student``,
``decide``). Each stage has one or more units (rows of ``shards``; inference has one per shard of images),
and only the units of the job's current stage can be claimed.

Celery delivers tasks at least once (``acks_late``; a lost worker's task comes back), and on the Redis backend
a chord's callback can be lost or fire early when a header task is redelivered. So the workers do not trust
delivery: every state change here is a single conditional ``UPDATE`` (compare-and-set), which two workers can
never both win:

- :func:`claim_shard` takes a unit of the current stage that is queued, or whose lease expired, for one
  owner (attempts counted and capped); a worker holding no lease does not run the unit;
- :func:`heartbeat` extends the owner's lease and tells it whether to go on (``False``: the lease was taken
  over, or the job was cancelled);
- :func:`complete_shard` marks the owner's unit done and answers an :class:`Advance` to exactly one caller,
  the one whose commit completed the stage's last unit: the job is now in the next stage, whose units that
  caller enqueues, once (or the plan is over and it finishes the job);
- :func:`sweep` (on service start and periodically) puts units with expired leases back in the queue, fails
  jobs whose units ran out of attempts, and returns every queued unit of a current stage to enqueue again
  (a lost enqueue after an advance is recovered there), so nothing stays "running" after a crash.

All functions take a :class:`~sqlalchemy.orm.Session` inside a transaction (see
:func:`service.db.transaction`) and ``now`` in unix seconds, so tests can move the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from service.models import Job, Shard, aware, utcnow

__all__ = [
    "Advance",
    "Lease",
    "Unit",
    "claim_shard",
    "complete_shard",
    "create_job",
    "fail_shard",
    "finish_job",
    "heartbeat",
    "holds",
    "request_cancel",
    "retry_job",
    "sweep",
    "undelivered",
]

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Unit:
    """One unit of work of a job's stage: ``stage``, its ``index`` in the stage, the Celery queue it runs on
    and the images it covers (inference shards; counted as the job's progress)."""

    stage: str
    index: int = 0
    queue: str = "gpu"
    images: int = 0


@dataclass(frozen=True)
class Lease:
    """The right of ``owner`` to run unit ``index`` of ``stage`` of job ``job_id`` until ``expires``."""

    job_id: int
    stage: str
    index: int
    owner: str
    expires: float
    attempt: int


@dataclass(frozen=True)
class Advance:
    """What the caller that completed a stage must do: enqueue ``units`` of the now current ``stage`` (as
    ``(index, queue)``), or, when ``stage`` is None, finish the job (its plan is over)."""

    stage: str | None
    units: tuple[tuple[int, str], ...] = ()


def infer_units(shard_images: list[int]) -> list[Unit]:
    """The units of an ``infer`` stage: one per shard, with its number of images."""
    return [Unit("infer", i, "gpu", n) for i, n in enumerate(shard_images)]


def create_job(
    session: Session,
    *,
    type: str,
    spec: dict[str, Any],
    units: list[Unit] | None = None,
    shard_images: list[int] | None = None,
    created_by: int | None = None,
) -> Job:
    """A queued job whose plan is the stages of ``units`` in order of first appearance; ``shard_images``
    is shorthand for an ``infer`` stage (one unit per entry: its number of images) then ``pseudo_label``."""
    if units is None:
        units = [*infer_units(shard_images or [0]), Unit("pseudo_label", 0, "cpu")]
    plan = list(dict.fromkeys(u.stage for u in units))
    job = Job(
        type=type, spec=spec, plan=plan, stage=plan[0], created_by=created_by,
        progress_total=sum(u.images for u in units if u.stage == plan[0]),
    )  # fmt: skip
    job.shards = [Shard(stage=u.stage, index=u.index, queue=u.queue, images=u.images) for u in units]
    session.add(job)
    session.flush()
    return job


def _job_open(job_id: int, stage: str | None = None):
    """The job is active and not asked to cancel (and, given ``stage``, that stage is its current one)."""
    clauses = [Job.id == job_id, Job.state.in_(ACTIVE), Job.cancel_requested.is_(False)]
    if stage is not None:
        clauses.append(Job.stage == stage)
    return exists().where(*clauses)


def _unit(job_id: int, stage: str, index: int) -> tuple:
    return Shard.job_id == job_id, Shard.stage == stage, Shard.index == index


def claim_shard(
    session: Session,
    *,
    job_id: int,
    stage: str,
    index: int,
    owner: str,
    now: float,
    lease_seconds: float,
    max_attempts: int,
) -> Lease | None:
    """Lease unit ``index`` of ``stage`` of ``job_id`` to ``owner``: it must be queued, or running under an
    expired lease, with attempts left, in the job's current stage, in a job that is neither finished nor
    cancelled. ``None``: not yours to run."""
    expires = now + lease_seconds
    claimable = or_(Shard.state == "queued", and_(Shard.state == "running", Shard.lease_expires < now))
    result = session.execute(
        update(Shard)
        .where(
            *_unit(job_id, stage, index),
            Shard.attempts < max_attempts,
            claimable,
            _job_open(job_id, stage),
        )
        .values(
            state="running",
            lease_owner=owner,
            lease_expires=expires,
            heartbeat_at=now,
            claimed_at=now,
            attempts=Shard.attempts + 1,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued")
        .values(state="running", started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    attempt = session.scalar(select(Shard.attempts).where(*_unit(job_id, stage, index)))
    return Lease(job_id, stage, index, owner, expires, int(attempt or 0))


def _owned(lease: Lease) -> tuple:
    """The conditions under which ``lease`` still holds: its unit is running, under this owner."""
    return (
        *_unit(lease.job_id, lease.stage, lease.index),
        Shard.state == "running",
        Shard.lease_owner == lease.owner,
    )


def holds(session: Session, *, lease: Lease) -> bool:
    """Whether ``lease`` still holds (its unit is running under its owner), locking the unit's row where
    the database can, so the caller's transaction decides for it."""
    row = session.execute(select(Shard.id).where(*_owned(lease)).with_for_update()).first()
    return row is not None


def heartbeat(
    session: Session,
    *,
    lease: Lease,
    now: float,
    lease_seconds: float,
    progress: tuple[int, int] | None = None,
) -> bool:
    """Extend ``lease`` (and record the unit's ``progress`` as ``(done, total)``: the job's progress is its
    current stage's units' sum); ``False`` when the worker must stop: the lease is no longer its own (it
    expired and another worker took the unit) or the job was cancelled or finished."""
    values: dict[str, Any] = {"lease_expires": now + lease_seconds, "heartbeat_at": now}
    if progress is not None:
        values.update(done=progress[0], images=progress[1])
    result = session.execute(
        update(Shard)
        .where(
            *_owned(lease),
            _job_open(lease.job_id),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    if progress is not None:
        _sum_progress(session, lease.job_id, lease.stage)
    return True


def _sum_progress(session: Session, job_id: int, stage: str) -> None:
    done, total = session.execute(
        select(func.coalesce(func.sum(Shard.done), 0), func.coalesce(func.sum(Shard.images), 0)).where(
            Shard.job_id == job_id, Shard.stage == stage
        )
    ).one()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.stage == stage)
        .values(progress_done=int(done), progress_total=int(total))
        .execution_options(synchronize_session=False)
    )


def complete_shard(
    session: Session, *, lease: Lease, output_key: str, now: float | None = None
) -> Advance | None:
    """Mark the leased unit done with its output. The caller whose commit completed the stage's last unit
    gets the :class:`Advance` (the job is now in the next stage); everyone else gets ``None``.

    A worker whose lease was taken over gets ``None`` and changes nothing (the other owner writes the same
    deterministic output under the same key)."""
    # one completion per job at a time: without the row lock, two last units committing together under
    # READ COMMITTED (PostgreSQL) would each see the other unfinished and neither would advance the job
    session.execute(select(Job.id).where(Job.id == lease.job_id).with_for_update())
    done = session.execute(
        update(Shard)
        .where(
            *_owned(lease),
        )
        .values(
            state="done",
            output_key=output_key,
            lease_owner=None,
            lease_expires=None,
            done=Shard.images,
            finished_at=time.time() if now is None else now,
        )
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:
        return None
    _sum_progress(session, lease.job_id, lease.stage)
    job = session.get(Job, lease.job_id, populate_existing=True)
    unfinished = exists().where(
        Shard.job_id == lease.job_id, Shard.stage == lease.stage, Shard.state != "done"
    )
    plan = list(job.plan or [])
    after = plan[plan.index(lease.stage) + 1 :] if lease.stage in plan else []
    following = after[0] if after else ""  # "": the plan is over
    advanced = session.execute(
        update(Job)
        .where(
            Job.id == lease.job_id,
            Job.stage == lease.stage,
            Job.state.in_(ACTIVE),
            Job.cancel_requested.is_(False),
            ~unfinished,
        )
        .values(stage=following or "done")
        .execution_options(synchronize_session=False)
    )
    if advanced.rowcount != 1:
        return None
    if not following:
        return Advance(None)
    units = session.execute(
        select(Shard.index, Shard.queue, Shard.images)
        .where(Shard.job_id == lease.job_id, Shard.stage == following)
        .order_by(Shard.index)
    ).all()
    job.progress_done, job.progress_total = 0, sum(int(n) for _i, _q, n in units)
    session.flush()
    return Advance(following, tuple((int(i), str(q)) for i, q, _n in units))


def fail_shard(session: Session, *, lease: Lease, error: str, max_attempts: int) -> str:
    """Record a failed attempt: ``"requeued"`` while attempts remain, else ``"failed"`` (and the job fails
    with the shard's error); ``"lost"`` when the lease was no longer this owner's."""
    # locked, so a claim of the same row (after the lease expired) waits for this and then sees it queued
    shard = session.scalar(select(Shard).where(*_owned(lease)).with_for_update())
    if shard is None:
        return "lost"
    shard.error = error
    shard.lease_owner, shard.lease_expires = None, None
    if shard.attempts < max_attempts:
        shard.state = "queued"
        return "requeued"
    shard.state = "failed"
    finish_job(
        session,
        job_id=lease.job_id,
        state="failed",
        error=f"{_name(lease.stage, lease.index)} failed {shard.attempts} times; last error: {error}",
    )
    return "failed"


def _name(stage: str, index: int) -> str:
    return f"{stage} shard {index}" if stage.partition("@")[0] == "infer" else f"stage {stage}"


def sweep(
    session: Session, *, now: float, max_attempts: int, all_queued: bool = True
) -> list[tuple[int, str, int, str]]:
    """Units whose lease expired go back to the queue; those out of attempts fail their job. Returns the
    units to enqueue again as ``(job_id, stage, index, queue)``: with ``all_queued`` (on start: what was in
    a lost broker, or never sent) every queued unit of an active job's current stage, else only the units
    this sweep put back (periodically: no duplicate tasks for units still waiting in the queue)."""
    # row locks (PostgreSQL re-checks the condition on a row another transaction changed meanwhile), so a
    # unit claimed again between this read and its write is skipped, never put back
    expired = session.scalars(
        select(Shard)
        .join(Job)
        .where(Shard.state == "running", Shard.lease_expires < now, Job.state.in_(ACTIVE))
        .order_by(Shard.job_id, Shard.stage, Shard.index)
        .with_for_update(of=Shard)
    ).all()
    requeued: set[tuple[int, str, int]] = set()
    for shard in expired:
        shard.lease_owner, shard.lease_expires = None, None
        if shard.job.cancel_requested:  # its worker is gone: nobody else will record the cancel
            shard.state = "queued"
            finish_job(session, job_id=shard.job_id, state="cancelled")
        elif shard.attempts < max_attempts:
            shard.state = "queued"
            requeued.add((shard.job_id, shard.stage, shard.index))
        else:
            shard.state = "failed"
            finish_job(
                session,
                job_id=shard.job_id,
                state="failed",
                error=f"{_name(shard.stage, shard.index)}: its worker stopped answering "
                f"{shard.attempts} times",
            )
    session.flush()
    _cancel_idle(session, now)
    queued = session.execute(
        select(Shard.job_id, Shard.stage, Shard.index, Shard.queue)
        .join(Job)
        .where(
            Shard.state == "queued",
            Shard.stage == Job.stage,
            Job.state.in_(ACTIVE),
            Job.cancel_requested.is_(False),
        )
        .order_by(Shard.job_id, Shard.stage, Shard.index)
    ).all()
    units = [(int(j), str(s), int(i), str(q)) for j, s, i, q in queued]
    return units if all_queued else [u for u in units if u[:3] in requeued]


def undelivered(session: Session, *, now: float, older_than: float) -> list[tuple[int, str, int, str]]:
    """Units of an active job's current stage that were never delivered (queued, no attempt) although their
    stage began more than ``older_than`` seconds ago, as ``(job_id, stage, index, queue)``: their task may
    have been lost between the commit that queued them and the broker (an enqueue that failed, a worker
    killed between advancing a job and sending its next stage). The caller resends those whose broker
    queue is empty (a resent unit that was in fact delivered runs once: the claim decides)."""
    rows = session.scalars(
        select(Shard)
        .join(Job)
        .where(
            Shard.state == "queued",
            Shard.attempts == 0,
            Shard.stage == Job.stage,
            Job.state.in_(ACTIVE),
            Job.cancel_requested.is_(False),
        )
        .order_by(Shard.job_id, Shard.stage, Shard.index)
    ).all()
    units = []
    for shard in rows:
        job = shard.job
        ended = [s.finished_at for s in job.shards if s.stage != job.stage and s.finished_at is not None]
        began = max(ended) if ended else aware(job.created_at).timestamp()
        if now - began > older_than:
            units.append((shard.job_id, shard.stage, shard.index, shard.queue))
    return units


def _cancel_idle(session: Session, now: float) -> None:
    """End ``cancelled`` the active jobs asked to cancel that no worker is running (a cancel that met the
    end of a stage, or whose queued units were never delivered): no worker would ever record it."""
    working = exists().where(Shard.job_id == Job.id, Shard.state == "running", Shard.lease_expires >= now)
    idle = session.scalars(
        select(Job.id).where(Job.state.in_(ACTIVE), Job.cancel_requested.is_(True), ~working)
    ).all()
    for job_id in idle:
        finish_job(session, job_id=job_id, state="cancelled")


def retry_job(session: Session, *, job_id: int) -> list[tuple[str, int, str]] | None:
    """Put a failed or cancelled job back in the queue where it stopped: its unfinished units queued with
    fresh attempts (the steps find their finished outputs and checkpoints and resume). Returns the current
    stage's units to enqueue as ``(stage, index, queue)``; ``None`` when the job is not failed/cancelled."""
    job = session.get(Job, job_id)
    if job is None or job.state not in ("failed", "cancelled"):
        return None
    for shard in job.shards:
        if shard.state != "done":
            shard.state, shard.attempts, shard.lease_owner, shard.lease_expires = "queued", 0, None, None
    job.state, job.cancel_requested, job.error, job.finished_at = "queued", False, None, None
    plan = list(job.plan or [])
    # a job stopped after its stage's last unit completed (a cancel at that moment) has a current stage with
    # nothing left to run: it goes on from the first stage with unfinished units
    while job.stage in plan and all(s.state == "done" for s in job.shards if s.stage == job.stage):
        after = plan[plan.index(job.stage) + 1 :]
        if not after:
            job.stage = "done"
            session.flush()
            finish_job(session, job_id=job_id, state="succeeded")
            return []
        job.stage = after[0]
    session.flush()
    return [(s.stage, s.index, s.queue) for s in job.shards if s.stage == job.stage and s.state == "queued"]


def request_cancel(session: Session, *, job_id: int) -> bool:
    """Ask a job to stop: workers see it at their next heartbeat or cancel check. A queued job is cancelled
    at once. ``False`` when the job is already finished."""
    job = session.get(Job, job_id)
    if job is None or job.state in FINISHED:
        return False
    job.cancel_requested = True
    if job.state == "queued":
        finish_job(session, job_id=job_id, state="cancelled")
    return True


def finish_job(
    session: Session,
    *,
    job_id: int,
    state: str,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """Record a job's end state once (the first finisher wins); ``False`` when it had ended already."""
    if state not in FINISHED:
        raise ValueError(f"{state!r} is not an end state ({', '.join(FINISHED)})")
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "error": error}
    if metrics is not None:
        values["metrics"] = metrics
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ACTIVE))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1
