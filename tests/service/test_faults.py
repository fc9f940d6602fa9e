"""Fault injection: real Redis, Celery workers and API processes, killed while a job runs.

Each test starts what it needs (``Stack`` of test_workers: storage, ledger, one Celery worker; ``Api`` of
test_api when the ledger sweep is needed) and stops every process by its id. The promises: an accepted
image is pseudo-labeled exactly once whatever dies, training resumes from its checkpoint, a job ends in a
recorded state with its reason, and nothing partial is left claiming to be complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image as PILImage
from sqlalchemy import func, select

from service import auth, jobs
from service.db import reading, transaction
from service.models import Image, Job
from tests.service.conftest import free_port
from tests.service.test_api import Api
from tests.service.test_workers import (
    VIEWS,
    Stack,
    _stop,
    finished,
    in_process_pseudo,
    infer_units,
    pool_pid,
    redis_binary,
    redis_url,  # noqa: F401 (a fixture)
    shard_lines,
)

pytestmark = pytest.mark.slow


class Redis:
    """A redis-server with an append-only file in ``folder``, on a fixed loopback port: killed with
    SIGKILL and started again on the same port and file."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            for _ in range(200):
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    pass
                time.sleep(0.1)
            raise AssertionError("redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.close()


def kill_running_unit(stack: Stack, job_id: int, stage: str, not_pid: int | None = None) -> int:
    """SIGKILL the pool process holding a running unit of ``stage`` (another than ``not_pid``'s)."""

    def candidates(job: Job) -> list:
        units = [s for s in job.shards if s.stage == stage and s.state == "running" and s.lease_owner]
        return [s for s in units if pool_pid(s.lease_owner) != not_pid]

    job = stack.wait(job_id, lambda j: bool(candidates(j)))
    pid = pool_pid(candidates(job)[0].lease_owner)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_worker_killed_twice_in_one_job_gives_the_undisturbed_pseudo_labels(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=6)
    try:
        job_id = stack.submit(shard_size=8)
        first = kill_running_unit(stack, job_id, "infer")
        kill_running_unit(stack, job_id, "infer", not_pid=first)  # the pool process Celery started after
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with reading(stack.sessions) as session:
            attempts = [s.attempts for s in infer_units(session.get(Job, job_id))]
        assert sum(attempts) == 3 + 2, attempts  # two attempts lost, each redelivered once
    finally:
        stack.close()
    unlabeled = json.loads((tiny_data / "unlabeled.json").read_text())["images"]
    assert [line["image_id"] for line in shard_lines(stack.root, job_id, 3)] == [im["id"] for im in unlabeled]
    mine = json.loads((stack.root / f"jobs/{job_id}/round_1/pseudo.json").read_text())
    theirs = in_process_pseudo(tmp_path, tiny_data, trained_tiny_model)
    assert mine["images"] == theirs["images"] and mine["annotations"] == theirs["annotations"]
    assert mine["annotations"], "the comparison needs pseudo-instances to compare"


def test_redis_killed_and_restarted_mid_job_the_job_and_a_queued_one_succeed(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, restartable_redis: Redis
) -> None:
    """Redis dies while a shard runs and a second job waits in its queue; with its append-only file the
    queued work survives the restart, and the API's ledger sweep resends what the broker lost."""
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, restartable_redis.url, lease=6)
    stack.env["DISTILL_SWEEP_SECONDS"] = "2"
    api = Api(stack, tmp_path)
    api.start()
    try:
        running_job = stack.submit(shard_size=8)
        queued_job = stack.submit(shard_size=12)
        stack.wait(running_job, lambda j: any(s.state == "running" for s in infer_units(j)))
        time.sleep(1.5)  # the append-only file is written every second
        restartable_redis.kill()
        time.sleep(3)
        restartable_redis.start()
        for job_id in (running_job, queued_job):
            job = stack.wait(job_id, finished)
            assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        assert stack.worker.poll() is None  # the worker rode out the outage
    finally:
        api.close()
        stack.close()
    unlabeled = [im["id"] for im in json.loads((tiny_data / "unlabeled.json").read_text())["images"]]
    for job_id, count in ((running_job, 3), (queued_job, 2)):
        assert [line["image_id"] for line in shard_lines(stack.root, job_id, count)] == unlabeled
        pseudo = json.loads((stack.root / f"jobs/{job_id}/round_1/pseudo.json").read_text())
        assert sorted(im["id"] for im in pseudo["images"]) == sorted(unlabeled)


def test_a_worker_killed_during_finalisation_records_it_once(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    """The pseudo-label unit (a distill job's last) has written pseudo.json but not recorded its outcome
    when its worker dies (a fault-injection pause in workers.tasks); the retry records it once."""
    marker = tmp_path / "paused"
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=6, start=False)
    stack.env |= {"DISTILL_FAULT_PAUSE_AFTER": "pseudo_label", "DISTILL_FAULT_PAUSE_FILE": str(marker)}
    stack.start_worker()
    try:
        job_id = stack.submit(shard_size=12)
        deadline = time.time() + 300
        while not marker.exists():
            assert time.time() < deadline, stack.log_path.read_text()[-3000:]
            time.sleep(0.05)
        assert (stack.root / f"jobs/{job_id}/round_1/pseudo.json").exists()  # the work is done ...
        kill_running_unit(stack, job_id, "pseudo_label")  # ... and not recorded
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with reading(stack.sessions) as session:
            row = session.get(Job, job_id)
            (unit,) = [s for s in row.shards if s.stage == "pseudo_label"]
            assert unit.attempts == 2 and unit.state == "done"
            assert len(row.warnings) == len(set(row.warnings))  # recorded once, not once per attempt
            assert row.metrics["pseudo_label"]["kept_instances"] > 0
    finally:
        stack.close()
    mine = json.loads((stack.root / f"jobs/{job_id}/round_1/pseudo.json").read_text())
    theirs = in_process_pseudo(tmp_path, tiny_data, trained_tiny_model)
    assert mine["annotations"] == theirs["annotations"]


def submit_train(stack: Stack, iterations: int) -> int:
    spec = {
        "out": None, "labeled": "data/labeled.json", "labeled_images": "data/images", "config": "tiny",
        "init": "scratch", "iterations": iterations, "seed": 0,
    }  # fmt: skip

    def make_spec(_session, job_id: int) -> dict:
        return {"datasets": {}, "models": {}, "inputs": {}, "train": {**spec, "out": f"jobs/{job_id}/model"}}

    return jobs.submit(
        stack.sessions, type="train", units=jobs.single_unit("train"), make_spec=make_spec,
        enqueue=lambda job, stage, index, queue: stack.celery.send_task(
            "distill.run_unit", args=[job, stage, index], queue=queue
        ),
    )  # fmt: skip


def test_a_worker_killed_while_training_resumes_from_the_checkpoint(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=6)
    try:
        job_id = submit_train(stack, iterations=100)  # the tiny recipe checkpoints every 20 iterations
        checkpoint = stack.root / f"jobs/{job_id}/model/checkpoint.pt"
        deadline = time.time() + 300
        while not checkpoint.exists():
            assert time.time() < deadline, stack.log_path.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)  # past the checkpoint's atomic rename, still training
        kill_running_unit(stack, job_id, "train")
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with reading(stack.sessions) as session:
            job = session.get(Job, job_id)
            (unit,) = job.shards
            assert unit.attempts == 2
            train = job.metrics["train"]
    finally:
        stack.close()
    assert train["iterations"] == 100
    assert train["resumed_from"] is not None and 20 <= train["resumed_from"] < 100, train
    assert (stack.root / f"jobs/{job_id}/model/weights.pt").is_file()


def test_a_teacher_that_detects_nothing_fails_the_job_with_the_reason(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    blind = tmp_path / "blind"
    shutil.copytree(trained_tiny_model, blind)
    config = yaml.safe_load((blind / "config.yaml").read_text())
    config["score_thresh"] = 1.0  # no detection scores above 1
    (blind / "config.yaml").write_text(yaml.safe_dump(config))
    stack = Stack(tmp_path, tiny_data, blind, redis_url, lease=30)
    try:
        # the model's own threshold in every view (VIEWS would lower it to 0)
        inference = VIEWS.model_copy(update={"view_score_thresh": None})
        job = stack.wait(stack.submit(shard_size=12, inference=inference), finished)
    finally:
        stack.close()
    assert job.state == "failed", job.state
    assert "no pseudo-instances survive" in job.error, job.error


def test_everything_killed_at_once_and_restarted_the_job_completes(
    tmp_path: Path, tiny_data: Path, trained_tiny_model: Path, restartable_redis: Redis
) -> None:
    """API, worker (with its pool) and Redis SIGKILLed together mid-shard, then started again: the API's
    start-up sweep requeues the unit whose lease expired; nothing stays running; every image once."""
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, restartable_redis.url, lease=5)
    stack.env["DISTILL_SWEEP_SECONDS"] = "2"
    api = Api(stack, tmp_path)
    api.start()
    try:
        job_id = stack.submit(shard_size=8)
        stack.wait(job_id, lambda j: any(s.state == "running" for s in infer_units(j)))
        for kill in (api.kill, lambda: os.killpg(stack.worker.pid, signal.SIGKILL), restartable_redis.kill):
            kill()
        stack.worker.wait(timeout=30)
        time.sleep(5)  # past the lease of the unit that was running
        restartable_redis.start()
        api.start()
        stack.start_worker()
        job = stack.wait(job_id, finished)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with reading(stack.sessions) as session:
            row = session.get(Job, job_id)
            assert {s.state for s in row.shards} == {"done"}
            assert sum(s.attempts for s in infer_units(row)) >= 4  # the lost one ran again
    finally:
        api.close()
        stack.close()
    unlabeled = [im["id"] for im in json.loads((tiny_data / "unlabeled.json").read_text())["images"]]
    assert [line["image_id"] for line in shard_lines(stack.root, job_id, 3)] == unlabeled


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs at ``tmp_path/full`` (root with CAP_SYS_ADMIN, else skipped), unmounted after; the test
    shrinks it to what it holds to make the disk full."""
    mount = tmp_path / "full"
    mount.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mount)]
    made = subprocess.run(argv, capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_fails_the_job_with_the_reason_and_leaves_no_complete_looking_artifact(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
    small_tmpfs: Path,
) -> None:
    # storage on the small file system; the ledger and logs beside it
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=30, root=small_tmpfs / "storage")
    try:
        used = shutil.disk_usage(small_tmpfs).used
        # the data and teacher fit; the first shard's predictions do not
        subprocess.run(["mount", "-o", f"remount,size={used + 16 * 1024}", str(small_tmpfs)], check=True)
        job = stack.wait(stack.submit(shard_size=12), finished)
    finally:
        stack.close()
    assert job.state == "failed", job.state
    assert "No space left on device" in job.error, job.error
    round_dir = stack.root / f"jobs/{job.id}/round_1"
    assert not (round_dir / "pseudo.json").exists()
    for shard in (round_dir / "predictions").glob("shard-*"):
        if shard.suffix == ".jsonl":  # a finished shard's stream: every line whole
            for line in shard.read_text().splitlines():
                json.loads(line)


def _noise_archive(path: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buffer = io.BytesIO()
            PILImage.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            info = tarfile.TarInfo(f"noise-{i:05d}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return path


def test_the_api_killed_during_an_upload_leaves_whole_images_and_a_retry_completes_it(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    """SIGKILL while an archive streams in: every image row has its whole file (nothing half-registered);
    the same upload sent again is accepted, the images stored before the kill as duplicates."""
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=30)
    with transaction(stack.sessions) as session:
        token = auth.create_token(session, scope="write")
    archive = _noise_archive(tmp_path / "noise.tar", 1500)
    api = Api(stack, tmp_path)
    api.start()
    client = httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {token}"}, timeout=300)
    try:
        dataset = client.post("/v1/datasets", json={"name": "pile", "kind": "unlabeled"}).json()["id"]

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the API dies under it
                _post_archive(client, dataset, archive)

        upload = threading.Thread(target=send, daemon=True)
        upload.start()

        def stored() -> int:
            with reading(stack.sessions) as session:
                return session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset)) or 0

        deadline = time.time() + 120
        while stored() == 0:
            assert time.time() < deadline and upload.is_alive(), "no image was stored while uploading"
            time.sleep(0.05)
        api.kill()
        upload.join(60)
        before = stored()
        assert 0 < before < 1500, before  # killed mid-upload
        with reading(stack.sessions) as session:
            rows = session.scalars(select(Image).where(Image.dataset_id == dataset)).all()
        for row in rows:  # each registered image is whole: its file holds exactly the recorded bytes
            assert hashlib.sha256((stack.root / row.key).read_bytes()).hexdigest() == row.sha256

        api.start()
        report = _post_archive(client, dataset, archive)
        assert report.status_code == 200, report.text
        accepted = report.json()["accepted"]
        assert len(accepted) == 1500 and report.json()["rejected"] == []
        assert sum(a["duplicate"] for a in accepted) == before
        assert stored() == 1500
        assert client.get(f"/v1/datasets/{dataset}").json()["stats"]["images"] == 1500
    finally:
        client.close()
        api.close()
        stack.close()


def _post_archive(client: httpx.Client, dataset: int, archive: Path) -> httpx.Response:
    with archive.open("rb") as source:
        return client.post(f"/v1/datasets/{dataset}/images", files=[("files", (archive.name, source))])
