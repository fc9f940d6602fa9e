"""The job ledger on a real SQLite file (WAL) and a real PostgreSQL, migrated by Alembic: compare-and-set
claims, leases that expire, exactly one caller advancing a job to its next stage even when the last shards
complete at the same moment in different processes, only the current stage's units claimable, progress
summed per stage, and the sweep that leaves nothing "running" after a crash."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import inspect, select

from service import ledger
from service.db import make_engine, session_factory, transaction, upgrade
from service.models import Job, Shard

LEASE = 60.0


@pytest.fixture
def sessions(db_url: str):
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def new_job(sessions, shards: int = 3) -> int:
    with transaction(sessions) as session:
        return ledger.create_job(session, type="distill", spec={"views": "1x"}, shard_images=[4] * shards).id


def claim(
    sessions, job_id: int, index: int, owner: str, now: float = 1000.0, max_attempts: int = 3,
    stage: str = "infer",
):  # fmt: skip
    with transaction(sessions) as session:
        return ledger.claim_shard(
            session, job_id=job_id, stage=stage, index=index, owner=owner, now=now, lease_seconds=LEASE,
            max_attempts=max_attempts,
        )  # fmt: skip


def test_migrations_create_the_schema_and_are_idempotent(db_url: str) -> None:
    upgrade(db_url)  # again: nothing to do
    engine = make_engine(db_url)
    names = set(inspect(engine).get_table_names())
    assert {"jobs", "shards", "api_tokens", "datasets", "images", "models", "alembic_version"} <= names
    if db_url.startswith("sqlite"):
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_a_shard_is_leased_to_one_owner_until_its_lease_expires(sessions) -> None:
    job_id = new_job(sessions)
    first = claim(sessions, job_id, 0, "worker-a")
    assert first is not None and first.attempt == 1 and first.expires == 1000.0 + LEASE
    assert claim(sessions, job_id, 0, "worker-b", now=1010.0) is None  # still a's
    with transaction(sessions) as session:
        assert ledger.heartbeat(session, lease=first, now=1050.0, lease_seconds=LEASE)  # a renews to 1110
        assert session.get(Job, job_id).state == "running"
    assert claim(sessions, job_id, 0, "worker-b", now=1100.0) is None
    second = claim(sessions, job_id, 0, "worker-b", now=1111.0)  # a went silent: b takes over
    assert second is not None and second.attempt == 2
    with transaction(sessions) as session:
        assert not ledger.heartbeat(session, lease=first, now=1112.0, lease_seconds=LEASE)  # a must stop
        assert not ledger.complete_shard(session, lease=first, output_key="late")  # and changes nothing
        shard = session.scalar(select(Shard).where(Shard.job_id == job_id, Shard.index == 0))
        assert shard.state == "running" and shard.lease_owner == "worker-b" and shard.output_key is None
    third = claim(sessions, job_id, 0, "worker-c", now=1200.0)
    assert third is not None and third.attempt == 3
    assert claim(sessions, job_id, 0, "worker-d", now=1300.0) is None  # out of attempts


def test_the_last_shard_to_complete_advances_the_job_once(sessions) -> None:
    job_id = new_job(sessions, shards=2)
    leases = [claim(sessions, job_id, i, f"w{i}") for i in range(2)]
    assert claim(sessions, job_id, 0, "early", stage="pseudo_label") is None  # not the current stage
    with transaction(sessions) as session:
        assert ledger.complete_shard(session, lease=leases[1], output_key="job/1") is None
    with transaction(sessions) as session:
        advance = ledger.complete_shard(session, lease=leases[0], output_key="job/0")
        assert advance == ledger.Advance("pseudo_label", ((0, "cpu"),))
    with transaction(sessions) as session:
        assert ledger.complete_shard(session, lease=leases[0], output_key="job/0") is None  # a redelivery
        job = session.get(Job, job_id)
        assert job.stage == "pseudo_label" and job.plan == ["infer", "pseudo_label"]
        infer = [s for s in job.shards if s.stage == "infer"]
        assert [s.output_key for s in infer] == ["job/0", "job/1"]
    last = claim(sessions, job_id, 0, "cpu-worker", stage="pseudo_label")
    with transaction(sessions) as session:
        assert ledger.complete_shard(session, lease=last, output_key="pseudo.json") == ledger.Advance(None)
        assert session.get(Job, job_id).stage == "done"


def test_progress_is_the_current_stages_units_summed(sessions) -> None:
    job_id = new_job(sessions, shards=2)  # 4 images each
    leases = [claim(sessions, job_id, i, f"w{i}") for i in range(2)]
    with transaction(sessions) as session:
        assert ledger.heartbeat(session, lease=leases[0], now=1001.0, lease_seconds=LEASE, progress=(3, 4))
        assert ledger.heartbeat(session, lease=leases[1], now=1001.0, lease_seconds=LEASE, progress=(1, 4))
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert (job.progress_done, job.progress_total) == (4, 8)
        ledger.complete_shard(session, lease=leases[0], output_key="a")
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert (job.progress_done, job.progress_total) == (5, 8)  # a done unit counts whole


def _complete_at_once(db_url: str, job_id: int, index: int, barrier, results) -> None:
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    lease = claim(sessions, job_id, index, f"proc-{index}")
    barrier.wait()
    with transaction(sessions) as session:
        results.put((index, ledger.complete_shard(session, lease=lease, output_key=f"k{index}")))
    engine.dispose()


@pytest.mark.parametrize("round_", range(3))
def test_shards_completing_together_in_separate_processes_finalise_exactly_once(
    db_url: str, sessions, round_: int
) -> None:
    shards = 6
    job_id = new_job(sessions, shards=shards)
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(shards), context.Queue()
    procs = [
        context.Process(target=_complete_at_once, args=(db_url, job_id, i, barrier, results))
        for i in range(shards)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    answers = dict(results.get(timeout=10) for _ in range(shards))
    assert sorted(answers) == list(range(shards))
    advanced = [i for i, answer in answers.items() if answer is not None]
    assert len(advanced) == 1 and answers[advanced[0]].stage == "pseudo_label", answers


def test_the_sweep_requeues_expired_work_and_fails_what_ran_out_of_attempts(sessions) -> None:
    job_id = new_job(sessions, shards=2)
    other = new_job(sessions, shards=1)
    claim(sessions, job_id, 0, "crashed", now=1000.0, max_attempts=2)
    claim(sessions, job_id, 1, "alive", now=1000.0, max_attempts=2)
    with transaction(sessions) as session:
        again = ledger.sweep(session, now=1030.0, max_attempts=2)  # nothing expired yet
    assert again == [(other, "infer", 0, "gpu")]  # the never-started job's shard is (re)enqueued
    with transaction(sessions) as session:
        assert ledger.sweep(session, now=1030.0, max_attempts=2, all_queued=False) == []
    with transaction(sessions) as session:
        again = ledger.sweep(session, now=1061.0, max_attempts=2, all_queued=False)
    assert again == [(job_id, "infer", 0, "gpu"), (job_id, "infer", 1, "gpu")]  # only what it put back
    claim(sessions, job_id, 0, "crashed-again", now=1100.0, max_attempts=2)
    with transaction(sessions) as session:
        ledger.sweep(session, now=1200.0, max_attempts=2)
        job = session.get(Job, job_id)
        assert job.state == "failed" and "stopped answering 2 times" in job.error and job.finished_at


def test_a_cancelled_job_leases_nothing_and_tells_its_workers_to_stop(sessions) -> None:
    job_id = new_job(sessions)
    lease = claim(sessions, job_id, 0, "w")
    with transaction(sessions) as session:
        assert ledger.request_cancel(session, job_id=job_id)
    assert claim(sessions, job_id, 1, "w2") is None
    with transaction(sessions) as session:
        assert not ledger.heartbeat(session, lease=lease, now=1001.0, lease_seconds=LEASE)
        assert ledger.finish_job(session, job_id=job_id, state="cancelled")
        assert not ledger.finish_job(session, job_id=job_id, state="failed", error="late")  # first wins
        assert session.get(Job, job_id).state == "cancelled"
        assert not ledger.request_cancel(session, job_id=job_id)
    queued = new_job(sessions)
    with transaction(sessions) as session:
        assert ledger.request_cancel(session, job_id=queued)
        assert session.get(Job, queued).state == "cancelled"


def test_a_shard_that_keeps_failing_fails_its_job_with_the_error(sessions) -> None:
    job_id = new_job(sessions, shards=1)
    for attempt in (1, 2):
        lease = claim(sessions, job_id, 0, f"w{attempt}", max_attempts=2)
        with transaction(sessions) as session:
            outcome = ledger.fail_shard(session, lease=lease, error="CUDA out of memory", max_attempts=2)
        assert outcome == ("requeued" if attempt == 1 else "failed")
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        assert job.state == "failed"
        assert job.error == "infer shard 0 failed 2 times; last error: CUDA out of memory"


def test_a_cancel_no_worker_will_record_is_ended_by_the_sweep_and_a_retry_goes_on_after_it(sessions) -> None:
    """A cancel that meets the stage's last unit (the stage is done, the job may not advance) or whose
    worker died: no worker would ever write "cancelled", so the sweep does; a retry then resumes at the
    first stage with work left."""
    job_id = new_job(sessions, shards=2)
    first, last = claim(sessions, job_id, 0, "a"), claim(sessions, job_id, 1, "b")
    with transaction(sessions) as session:
        ledger.complete_shard(session, lease=first, output_key="a")
        assert ledger.request_cancel(session, job_id=job_id)
        assert ledger.complete_shard(session, lease=last, output_key="b") is None
    with transaction(sessions) as session:
        assert ledger.sweep(session, now=1001.0, max_attempts=3) == []
        job = session.get(Job, job_id)
        assert (job.state, job.stage) == ("cancelled", "infer")
    with transaction(sessions) as session:
        assert ledger.retry_job(session, job_id=job_id) == [("pseudo_label", 0, "cpu")]
        job = session.get(Job, job_id)
        assert (job.state, job.stage, job.cancel_requested) == ("queued", "pseudo_label", False)

    other = new_job(sessions, shards=1)
    claim(sessions, other, 0, "dies", now=1000.0)
    with transaction(sessions) as session:
        assert ledger.request_cancel(session, job_id=other)
        ledger.sweep(session, now=1030.0, max_attempts=3)  # its lease still holds: its worker may stop it
        assert session.get(Job, other).state == "running"
    with transaction(sessions) as session:
        units = ledger.sweep(session, now=1061.0, max_attempts=3)
        assert units == [(job_id, "pseudo_label", 0, "cpu")]  # the retried job's, none of the cancelled
        assert session.get(Job, other).state == "cancelled"
