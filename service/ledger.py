"""The job ledger: the SQL rows that say which shard of which job runs where, and when a job may finish.

Celery delivers tasks at least once (``acks_late``; a lost worker's task comes back), and on the Redis backend
a chord's callback can be lost or fire early when a header task is redelivered. So the workers do not trust
delivery: every state change here is a single conditional ``UPDATE`` (compare-and-set), which two workers can
never both win:

- :func:`claim_shard` takes a shard that is queued, or whose lease expired, for one owner (attempts counted
  and capped); a worker holding no lease does not run the shard;
- :func:`heartbeat` extends the owner's lease and tells it whether to go on (``False``: the lease was taken
  over, or the job was cancelled);
- :func:`complete_shard` marks the owner's shard done and answers ``True`` to exactly one caller, the one
  whose commit completed the last shard: that caller enqueues the job's finalisation, once;
- :func:`sweep` (on service start and periodically) puts shards with expired leases back in the queue and
  fails jobs whose shards ran out of attempts, so nothing stays "running" after a crash.

All functions take a :class:`~sqlalchemy.orm.Session` inside a transaction (see
:func:`service.db.transaction`) and ``now`` in unix seconds, so tests can move the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from service.models import Job, Shard, utcnow

__all__ = [
    "Lease",
    "claim_shard",
    "complete_shard",
    "create_job",
    "fail_shard",
    "finish_job",
    "heartbeat",
    "request_cancel",
    "sweep",
]

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Lease:
    """The right of ``owner`` to run shard ``index`` of job ``job_id`` until ``expires`` (unix seconds)."""

    job_id: int
    index: int
    owner: str
    expires: float
    attempt: int


def create_job(session: Session, *, type: str, spec: dict[str, Any], shard_images: list[int]) -> Job:
    """A queued job with one queued shard per entry of ``shard_images`` (its number of images)."""
    job = Job(type=type, spec=spec, progress_total=sum(shard_images))
    job.shards = [Shard(index=i, images=n) for i, n in enumerate(shard_images)]
    session.add(job)
    session.flush()
    return job


def _job_open(job_id: int):
    return exists().where(Job.id == job_id, Job.state.in_(ACTIVE), Job.cancel_requested.is_(False))


def claim_shard(
    session: Session,
    *,
    job_id: int,
    index: int,
    owner: str,
    now: float,
    lease_seconds: float,
    max_attempts: int,
) -> Lease | None:
    """Lease shard ``index`` of ``job_id`` to ``owner``: it must be queued, or running under an expired
    lease, with attempts left, in a job that is neither finished nor cancelled. ``None``: not yours to run."""
    expires = now + lease_seconds
    claimable = or_(Shard.state == "queued", and_(Shard.state == "running", Shard.lease_expires < now))
    result = session.execute(
        update(Shard)
        .where(
            Shard.job_id == job_id,
            Shard.index == index,
            Shard.attempts < max_attempts,
            claimable,
            _job_open(job_id),
        )
        .values(
            state="running",
            lease_owner=owner,
            lease_expires=expires,
            heartbeat_at=now,
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
        .values(state="running", started_at=utcnow(), stage="infer")
        .execution_options(synchronize_session=False)
    )
    attempt = session.scalar(select(Shard.attempts).where(Shard.job_id == job_id, Shard.index == index))
    return Lease(job_id, index, owner, expires, int(attempt or 0))


def _owned(lease: Lease) -> tuple:
    """The conditions under which ``lease`` still holds: its shard is running, under this owner."""
    return (
        Shard.job_id == lease.job_id,
        Shard.index == lease.index,
        Shard.state == "running",
        Shard.lease_owner == lease.owner,
    )


def heartbeat(session: Session, *, lease: Lease, now: float, lease_seconds: float) -> bool:
    """Extend ``lease``; ``False`` when the worker must stop: the lease is no longer its own (it expired and
    another worker took the shard) or the job was cancelled or finished."""
    result = session.execute(
        update(Shard)
        .where(
            *_owned(lease),
            _job_open(lease.job_id),
        )
        .values(lease_expires=now + lease_seconds, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def complete_shard(session: Session, *, lease: Lease, output_key: str) -> bool:
    """Mark the leased shard done with its output; ``True`` for exactly one caller per job: the one that
    completed the last shard, who must now enqueue the finalisation.

    A worker whose lease was taken over gets ``False`` and changes nothing (the other owner writes the same
    deterministic output under the same key)."""
    # one completion per job at a time: without the row lock, two last shards committing together under
    # READ COMMITTED (PostgreSQL) would each see the other unfinished and neither would finalise
    session.execute(select(Job.id).where(Job.id == lease.job_id).with_for_update())
    done = session.execute(
        update(Shard)
        .where(
            *_owned(lease),
        )
        .values(state="done", output_key=output_key, lease_owner=None, lease_expires=None)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:
        return False
    unfinished = exists().where(Shard.job_id == lease.job_id, Shard.state != "done")
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == lease.job_id,
            Job.finalize_claimed.is_(False),
            Job.state.in_(ACTIVE),
            Job.cancel_requested.is_(False),
            ~unfinished,
        )
        .values(finalize_claimed=True, stage="finalize")
        .execution_options(synchronize_session=False)
    )
    return claimed.rowcount == 1


def fail_shard(session: Session, *, lease: Lease, error: str, max_attempts: int) -> str:
    """Record a failed attempt: ``"requeued"`` while attempts remain, else ``"failed"`` (and the job fails
    with the shard's error); ``"lost"`` when the lease was no longer this owner's."""
    shard = session.scalar(
        select(Shard).where(
            *_owned(lease),
        )
    )
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
        error=f"shard {lease.index} failed {shard.attempts} times; last error: {error}",
    )
    return "failed"


def sweep(session: Session, *, now: float, max_attempts: int) -> list[tuple[int, int]]:
    """Shards whose lease expired go back to the queue (returned as ``(job_id, index)`` to re-enqueue); those
    out of attempts fail their job. Returns the shards to enqueue again."""
    expired = session.scalars(
        select(Shard)
        .join(Job)
        .where(Shard.state == "running", Shard.lease_expires < now, Job.state.in_(ACTIVE))
        .order_by(Shard.job_id, Shard.index)
    ).all()
    requeue: list[tuple[int, int]] = []
    for shard in expired:
        shard.lease_owner, shard.lease_expires = None, None
        if shard.attempts < max_attempts:
            shard.state = "queued"
            requeue.append((shard.job_id, shard.index))
        else:
            shard.state = "failed"
            finish_job(
                session,
                job_id=shard.job_id,
                state="failed",
                error=f"shard {shard.index}: its worker stopped answering {shard.attempts} times",
            )
    queued = session.execute(
        select(Shard.job_id, Shard.index)
        .join(Job)
        .where(Shard.state == "queued", Job.state.in_(ACTIVE), Job.cancel_requested.is_(False))
        .order_by(Shard.job_id, Shard.index)
    ).all()
    return sorted(set(requeue) | {(int(j), int(i)) for j, i in queued})


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
