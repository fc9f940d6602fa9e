"""Thin Celery tasks over :mod:`distill.steps`: they take ids, re-read the job from the ledger, run one unit
of its current stage (:mod:`workers.stages`) and record the outcome there. The ledger, not Celery, decides
who runs what (see :mod:`service.ledger`).

``distill.tick_schedules(now=None)`` (sent by celery beat): start or skip each due schedule slot.

``distill.run_unit(job_id, stage, index)`` (on the unit's queue: ``gpu`` for training, inference and
evaluation, ``cpu`` for calibration and the promotion decision): lease the unit, run it with a heartbeat
that carries progress and cancel requests, complete it; the worker that completes a stage's last unit
enqueues the next stage's units, exactly once, or finishes the job when its plan is over.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from distill.errors import Cancelled, DistillError
from distill.hooks import ProgressEvent, StepContext
from service import ledger
from service.config import Settings
from service.db import make_engine, session_factory, transaction
from service.models import Job, Shard
from service.registry import record_metrics, register_job_models
from service.runtime import Runtime
from service.schedules import apply_gate, tick
from workers import stages
from workers.app import app

logger = logging.getLogger(__name__)

_state: dict = {}


def _runtime():
    """Settings, sessions and storage of this worker process (made once, after the fork)."""
    if "sessions" not in _state:
        settings = Settings()
        _state.update(
            settings=settings,
            sessions=session_factory(make_engine(settings.database)),
            storage=settings.open_storage(),
        )
    return _state["settings"], _state["sessions"], _state["storage"]


def _device(setting: str) -> str:
    """The worker's torch device (CUDA is touched here, in the pool process, never in the parent)."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def send_unit(job_id: int, stage: str, index: int, queue: str, countdown: float | None = None) -> None:
    run_unit.apply_async((job_id, stage, index), queue=queue, countdown=countdown)


class _Heartbeat:
    """The step's cancel check and progress sink: renews the lease (with the latest progress) at most every
    few seconds, and says stop when the lease was lost or the job cancelled."""

    def __init__(self, sessions, lease: ledger.Lease, lease_seconds: float) -> None:
        self.sessions, self.lease, self.lease_seconds = sessions, lease, lease_seconds
        self.last, self.stop = 0.0, False
        self.progress: tuple[int, int] | None = None

    def on_progress(self, event: ProgressEvent) -> None:
        if event.total:
            self.progress = (int(event.done), int(event.total))

    def __call__(self) -> bool:
        now = time.time()
        if not self.stop and now - self.last >= min(2.0, self.lease_seconds / 4):
            try:
                with transaction(self.sessions) as session:
                    self.stop = not ledger.heartbeat(
                        session, lease=self.lease, now=now, lease_seconds=self.lease_seconds,
                        progress=self.progress,
                    )  # fmt: skip
            except SQLAlchemyError:  # a busy or briefly unreachable database: go on, try at the next check
                logger.warning(
                    "heartbeat of %s failed; retrying at the next check", self.lease, exc_info=True
                )
            self.last = now
        return self.stop


@app.task(name="distill.run_unit", bind=True)
def run_unit(self, job_id: int, stage: str, index: int) -> None:
    settings, sessions, storage = _runtime()
    with transaction(sessions) as session:
        lease = ledger.claim_shard(
            session, job_id=job_id, stage=stage, index=index, owner=_owner(), now=time.time(),
            lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
        )  # fmt: skip
        job = session.get(Job, job_id)
        spec = dict(job.spec) if job is not None else None
        counts = _unit_counts(session, job_id)
        held = _held_until(session, job_id, stage, index) if lease is None else None
    if held is not None and held > time.time():
        # a redelivery while the unit's lease is still held (its worker was killed, or is still running):
        # come back when the lease would have expired; the claim then decides
        raise self.retry(countdown=max(1.0, held - time.time() + 1.0), max_retries=None)
    if lease is None or spec is None:
        # done, not the current stage, cancelled, gone, or out of attempts (the sweep fails that job)
        logger.info("unit %s/%d of job %d is not ours to run", stage, index, job_id)
        _end_if_cancelled(sessions, job_id)
        _resend_after_lost_advance(sessions, job_id, stage)
        return
    heartbeat = _Heartbeat(sessions, lease, settings.lease_seconds)
    context = StepContext(progress=heartbeat.on_progress, should_cancel=heartbeat)
    run = stages.UnitRun(
        job_id, stage, index, spec, counts, storage, _device(settings.device), cache=settings.cache_prefix
    )
    try:
        outcome = stages.run_unit(run, context)
    except Cancelled:
        logger.info("unit %s/%d of job %d stopped: cancelled or lease lost", stage, index, job_id)
        _end_if_cancelled(sessions, job_id)
        return
    except Exception as exc:  # recorded in the ledger; the job fails only when the attempts run out
        logger.exception("unit %s/%d of job %d failed", stage, index, job_id)
        _fail(
            sessions,
            settings,
            lease,
            str(exc) if isinstance(exc, DistillError) else f"{type(exc).__name__}: {exc}",
        )
        return
    _fault_pause(stage)
    try:
        _complete(sessions, settings, lease, outcome)
    except Exception as exc:  # nothing of the outcome was kept (one transaction): an attempt that failed
        logger.exception("recording unit %s/%d of job %d failed", stage, index, job_id)
        _fail(sessions, settings, lease, f"recording its outcome failed: {_described(exc)}")


def _fault_pause(stage: str) -> None:
    """A fault-injection point for the tests: with ``DISTILL_FAULT_PAUSE_AFTER=<stage>`` the worker, its
    work on a unit of that stage done but not recorded yet, creates the file ``DISTILL_FAULT_PAUSE_FILE``
    and sleeps ``DISTILL_FAULT_PAUSE_SECONDS`` (default 30), so a test can kill it exactly there."""
    if os.environ.get("DISTILL_FAULT_PAUSE_AFTER") != stage:
        return
    marker = os.environ.get("DISTILL_FAULT_PAUSE_FILE")
    if marker and not os.path.exists(marker):  # the first attempt only: a retry records at once
        open(marker, "w").close()
        time.sleep(float(os.environ.get("DISTILL_FAULT_PAUSE_SECONDS", "30")))


def _described(exc: Exception) -> str:
    """The exception's type and first line (a database error's SQL and parameters left out)."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def _fail(sessions, settings: Settings, lease: ledger.Lease, error: str) -> None:
    """Record a failed attempt of the unit (its job fails when the attempts run out), or send it again."""
    with transaction(sessions) as session:
        result = ledger.fail_shard(session, lease=lease, error=error, max_attempts=settings.max_attempts)
    if result == "requeued":
        queue = stages.QUEUES[stages.parse_stage(lease.stage)[0]]
        send_unit(lease.job_id, lease.stage, lease.index, queue, countdown=2.0)


def _complete(sessions, settings: Settings, lease: ledger.Lease, outcome: stages.Outcome) -> None:
    """Record the unit's outcome and complete it in one transaction; then enqueue the next stage."""
    with transaction(sessions) as session:
        if not ledger.holds(session, lease=lease):
            return  # another worker owns this unit now: it records the same outcome
        # the job row locked before its JSON fields are read: two units completing together (PostgreSQL)
        # each merge into what the other wrote, instead of the second overwriting the first
        job = session.get(Job, lease.job_id, with_for_update=True, populate_existing=True)
        job.skipped = _merged_skipped(job, outcome)  # kept when they fail the job: they are its reason
        if _over_error_budget(session, job, settings.error_budget):
            return  # nothing else of this unit recorded: a retry runs it again from scratch
        if stages.parse_stage(lease.stage)[0] == "decide":
            promotion = apply_gate(session, job, outcome.metrics)
            if promotion is not None:
                outcome.metrics["promotion"] = promotion
                # a refused student does not teach the next round: it could only be refused again
                outcome.stop = outcome.stop or not promotion["promoted"]
        _record(job, lease.stage, outcome)
        register_job_models(session, job, outcome.models)
        if outcome.scored_model is not None:
            eval_dataset = (job.spec.get("datasets") or {}).get("eval", "eval")
            record_metrics(session, outcome.scored_model, eval_dataset, outcome.metrics)
        if outcome.stop:
            ledger.finish_job(session, job_id=job.id, state="succeeded", metrics=job.metrics)
        advance = ledger.complete_shard(session, lease=lease, output_key=outcome.output_key)
        if advance is not None and advance.stage is None:
            ledger.finish_job(session, job_id=job.id, state="succeeded", metrics=job.metrics)
    if advance is None:
        _end_if_cancelled(sessions, lease.job_id)  # a cancel that met the stage's last unit
    elif advance.stage is not None:
        for index, queue in advance.units:
            send_unit(lease.job_id, advance.stage, index, queue)


@app.task(name="distill.tick_schedules", ignore_result=True)
def tick_schedules(now: float | None = None) -> list[int]:
    """Start or skip each due schedule slot (:mod:`service.schedules`); ``now``: unix seconds (default: the
    clock), so a test or an operator can tick a given moment. Returns the ids of the runs it recorded."""
    settings, sessions, storage = _runtime()
    runtime = Runtime(settings, sessions, storage, send_unit)
    return tick(runtime, time.time() if now is None else now)


def _resend_after_lost_advance(sessions, job_id: int, stage: str) -> None:
    """A unit delivered again after it was done: its worker may have died between committing the advance
    and sending the next stage. While that next stage has not started, send its units again (one already
    in the broker then runs once: the second delivery finds it claimed or done)."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in ledger.ACTIVE or job.cancel_requested or job.stage == stage:
            return
        current, plan = job.stage, list(job.plan or [])
        if stage not in plan or plan[plan.index(stage) + 1 : plan.index(stage) + 2] != [current]:
            return  # not the stage just before the current one: that advance was not this unit's
        waiting = [s for s in job.shards if s.stage == current]
        if any(s.attempts or s.state != "queued" for s in waiting):
            return  # the current stage has started: its tasks arrived
        units = [(s.index, s.queue) for s in waiting]
    for index, queue in units:
        send_unit(job_id, current, index, queue)


def _record(job: Job, stage: str, outcome: stages.Outcome) -> None:
    """Merge a unit's warnings and metrics into its job (metrics of a sharded stage are summed: images)."""
    job.warnings = list(dict.fromkeys([*job.warnings, *outcome.warnings]))  # a retried unit says it again
    metrics: dict[str, Any] = dict(job.metrics or {})
    if stage in metrics and stages.parse_stage(stage)[0] == "infer":
        before = metrics[stage]
        metrics[stage] = {k: before.get(k, 0) + v for k, v in outcome.metrics.items()}
    else:
        metrics[stage] = outcome.metrics
    job.metrics = metrics


def _merged_skipped(job: Job, outcome: stages.Outcome) -> list[dict[str, Any]]:
    """The job's skipped images and the unit's, each name once (a retried unit reports its own again)."""
    seen = {s["name"] for s in job.skipped}
    return [*job.skipped, *(s for s in outcome.skipped if s["name"] not in seen)]


def _over_error_budget(session, job: Job, budget: float) -> bool:
    """Fail the job when more than ``budget`` of its unlabeled images could not be read (one bad image
    never fails a job); True when it did."""
    skipped = job.skipped
    if not skipped:
        return False
    total = session.scalar(
        select(func.coalesce(func.sum(Shard.images), 0)).where(Shard.job_id == job.id, Shard.stage == "infer")
    )
    if not total or len(skipped) <= budget * total:
        return False
    names = ", ".join(f"{s['name']} ({s['reason']})" for s in skipped[:5])
    ledger.finish_job(
        session, job_id=job.id, state="failed",
        error=f"{len(skipped)} of {total} images could not be read, over the error budget of "
        f"{budget:.0%} (DISTILL_ERROR_BUDGET): {names}",
    )  # fmt: skip
    return True


def _unit_counts(session, job_id: int) -> dict[str, int]:
    rows = session.execute(
        select(Shard.stage, func.count()).where(Shard.job_id == job_id).group_by(Shard.stage)
    ).all()
    return {str(stage): int(n) for stage, n in rows}


def _end_if_cancelled(sessions, job_id: int) -> None:
    """A cancel request ends the job once its work stops: the worker that sees it records ``cancelled``."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is not None and job.cancel_requested:
            ledger.finish_job(session, job_id=job_id, state="cancelled")


def _held_until(session, job_id: int, stage: str, index: int) -> float | None:
    """When the running unit's current lease expires (None: the unit is not running)."""
    shard = session.scalar(
        select(Shard).where(Shard.job_id == job_id, Shard.stage == stage, Shard.index == index)
    )
    job = session.get(Job, job_id)
    if shard is None or shard.state != "running" or job is None or job.state not in ledger.ACTIVE:
        return None
    return shard.lease_expires
