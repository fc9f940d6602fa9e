"""Thin Celery tasks over :mod:`distill.steps`: they take ids, re-read the job from the ledger, run one step
and record the outcome there. The ledger, not Celery, decides who runs what (see :mod:`service.ledger`).

- ``distill.infer_shard(job_id, index)`` (gpu queue): lease the shard, run the ``infer`` step on its images
  with a heartbeat that also carries cancel requests, complete it; the worker that completes the last shard
  enqueues the finalisation, exactly once.
- ``distill.finalize(job_id)`` (cpu queue): the ``pseudo_label`` step over every shard's output, then the
  job's end state.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from sqlalchemy import select

from distill import steps
from distill.errors import Cancelled, DistillError
from distill.hooks import StepContext
from distill.specs import InferSpec, PseudoLabelSpec
from distill.storage import Storage
from service import ledger
from service.config import Settings
from service.db import make_engine, session_factory, transaction
from service.models import Job, Shard
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
            storage=Storage(settings.storage),
        )
    return _state["settings"], _state["sessions"], _state["storage"]


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat:
    """The step's cancel check: renews the lease at most every few seconds, and says stop when the lease
    was lost or the job cancelled."""

    def __init__(self, sessions, lease: ledger.Lease, lease_seconds: float) -> None:
        self.sessions, self.lease, self.lease_seconds = sessions, lease, lease_seconds
        self.last, self.stop = 0.0, False

    def __call__(self) -> bool:
        now = time.time()
        if not self.stop and now - self.last >= min(5.0, self.lease_seconds / 4):
            with transaction(self.sessions) as session:
                self.stop = not ledger.heartbeat(
                    session, lease=self.lease, now=now, lease_seconds=self.lease_seconds
                )
            self.last = now
        return self.stop


@app.task(name="distill.infer_shard", bind=True)
def infer_shard(self, job_id: int, index: int) -> None:
    settings, sessions, storage = _runtime()
    with transaction(sessions) as session:
        lease = ledger.claim_shard(
            session, job_id=job_id, index=index, owner=_owner(), now=time.time(),
            lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
        )  # fmt: skip
        job = session.get(Job, job_id)
        spec = dict(job.spec) if job is not None else None
        count = len(job.shards) if job is not None else 0
        held = _held_until(session, job_id, index) if lease is None else None
    if held is not None and held > time.time():
        # a redelivery while the shard's lease is still held (its worker was killed, or is still running):
        # come back when the lease would have expired; the claim then decides
        raise self.retry(countdown=max(1.0, held - time.time() + 1.0), max_retries=None)
    if lease is None or spec is None:
        # done, cancelled, gone, or expired with no attempts left (the sweep fails that job)
        logger.info("shard %d of job %d is not ours to run", index, job_id)
        _end_if_cancelled(sessions, job_id)
        return
    out = f"jobs/{job_id}/shards/{index:05d}.jsonl"
    infer = InferSpec.model_validate({**spec["infer"], "out": out, "shard": (index, count)})
    context = StepContext(should_cancel=_Heartbeat(sessions, lease, settings.lease_seconds))
    try:
        steps.infer(infer, storage, context)
    except Cancelled:
        logger.info("shard %d of job %d stopped: cancelled or lease lost", index, job_id)
        _end_if_cancelled(sessions, job_id)
        return
    except Exception as exc:  # recorded in the ledger; the job fails only when the attempts run out
        logger.exception("shard %d of job %d failed", index, job_id)
        error = str(exc) if isinstance(exc, DistillError) else f"{type(exc).__name__}: {exc}"
        with transaction(sessions) as session:
            outcome = ledger.fail_shard(session, lease=lease, error=error, max_attempts=settings.max_attempts)
        if outcome == "requeued":
            infer_shard.apply_async((job_id, index), countdown=2.0)
        return
    with transaction(sessions) as session:
        last = ledger.complete_shard(session, lease=lease, output_key=out)
        _add_progress(session, job_id)
    if last:  # this commit completed the job's last shard: enqueue the finalisation, once
        finalize.delay(job_id)


def _end_if_cancelled(sessions, job_id: int) -> None:
    """A cancel request ends the job once its work stops: the worker that sees it records ``cancelled``."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is not None and job.cancel_requested:
            ledger.finish_job(session, job_id=job_id, state="cancelled")


def _held_until(session, job_id: int, index: int) -> float | None:
    """When the running shard's current lease expires (None: the shard is not running)."""
    shard = session.scalar(select(Shard).where(Shard.job_id == job_id, Shard.index == index))
    job = session.get(Job, job_id)
    if shard is None or shard.state != "running" or job is None or job.state not in ledger.ACTIVE:
        return None
    return shard.lease_expires


def _add_progress(session, job_id: int) -> None:
    """Images done = the images of the job's done shards."""
    job = session.get(Job, job_id)
    job.progress_done = sum(s.images for s in job.shards if s.state == "done")


@app.task(name="distill.finalize")
def finalize(job_id: int) -> None:
    _settings, sessions, storage = _runtime()
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.state not in ledger.ACTIVE:
            return
        spec = dict(job.spec)
        outputs = [s.output_key for s in job.shards]
    pseudo = PseudoLabelSpec.model_validate({**spec["pseudo_label"], "predictions": outputs})
    try:
        result = steps.pseudo_label(pseudo, storage)
    except DistillError as exc:
        with transaction(sessions) as session:
            ledger.finish_job(session, job_id=job_id, state="failed", error=str(exc))
        return
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        job.warnings = result.warnings
        ledger.finish_job(session, job_id=job_id, state="succeeded", metrics=result.metrics)
