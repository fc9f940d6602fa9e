"""Scheduled retraining over a live stack — uvicorn, two Celery workers, two celery beat processes, Redis,
and SQLite or PostgreSQL — on the tiny preset, with a controllable clock: the test sends
``distill.tick_schedules`` for chosen moments (what beat sends with the real time).

Two slots start two pipeline jobs with the promoted model as teacher; a slot while the previous run goes and a
slot without enough new images are recorded skips; a student that does not beat the promoted version by
``min_gain`` stays unpromoted; a promotion and its rollback are recorded with who and why, and the next run
uses the rolled-back version; the second run infers only the images that arrived since the first (the
inference cache); and two beat processes ticking every second record each minute of an every-minute
schedule once. On PostgreSQL, every process reaches storage over SFTP (``sftp_server``)."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from distill.data.coco import load_coco
from service import auth
from service.db import transaction
from tests.service.conftest import sftp_server  # noqa: F401 (a fixture)
from tests.service.test_api import Api, make_dataset
from tests.service.test_workers import Stack, _stop, redis_url  # noqa: F401 (a fixture)

INFERENCE = {"views": "1x:flip", "batch_size": 4, "max_detections": 20, "view_score_thresh": 0.0}


def images_archive(tiny_data: Path, names: list[str]) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            tar.add(tiny_data / "images" / name, arcname=name)
    return ("images.tar.gz", buffer.getvalue(), "application/gzip")


def model_archive(model_dir: Path) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("config.yaml", "weights.pt", "meta.json"):
            tar.add(model_dir / name, arcname=f"tiny/{name}")
    return ("tiny.tar.gz", buffer.getvalue(), "application/gzip")


def celery(stack: Stack, *args: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", *args, "-l", "info"],
            env=stack.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def wait_until(what, timeout: float = 600, message: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out: {message}")


@pytest.mark.slow
def test_scheduled_retraining_runs_each_slot_once_gates_promotion_and_rolls_back(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
    db_url: str,
    request: pytest.FixtureRequest,
) -> None:
    """On PostgreSQL the storage is a non-local fsspec URL too: SFTP to a real sshd over the same folder."""
    storage = None
    if db_url.startswith("postgresql"):
        sftp = request.getfixturevalue("sftp_server")
        storage = (sftp.url(tmp_path / "storage"), sftp.options)
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120, database=db_url,
                  storage=storage)  # fmt: skip
    stack.env["DISTILL_SCHEDULE_TICK_SECONDS"] = "1"
    with transaction(stack.sessions) as session:
        writer = auth.create_token(session, scope="write", name="ops")
        writer_id = auth.authenticate(session, writer).id
    api = Api(stack, tmp_path)
    api.start()
    client = httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {writer}"}, timeout=60)
    procs = [celery(stack, "worker", "-Q", "cpu", "-c", "1", "-n", "cpu@%h", "--without-gossip",
                    "--without-mingle", "--without-heartbeat", log=tmp_path / "cpu-worker.log")]  # fmt: skip

    def tick(moment: dt.datetime) -> None:
        stack.celery.send_task("distill.tick_schedules", kwargs={"now": moment.timestamp()}, queue="cpu")

    def runs(schedule_id: int) -> list[dict]:
        return client.get(f"/v1/schedules/{schedule_id}/runs").json()["data"][::-1]  # oldest first

    def job(job_id: int) -> dict:
        return client.get(f"/v1/jobs/{job_id}").json()

    def ended(job_id: int) -> dict:
        final = wait_until(lambda: (j := job(job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
                           message=f"job {job_id}")  # fmt: skip
        assert final["state"] == "succeeded", (final["error"], stack.log_path.read_text()[-3000:])
        return final

    try:
        labeled = make_dataset(client, tiny_data, "labeled", "labeled")
        test = make_dataset(client, tiny_data, "test", "eval")
        unlabeled_names = [im["file_name"] for im in load_coco(tiny_data / "unlabeled.json").images]
        unlabeled = client.post("/v1/datasets", json={"name": "arrivals", "kind": "unlabeled"}).json()["id"]
        first, later = unlabeled_names[:16], unlabeled_names[16:]
        uploaded = client.post(
            f"/v1/datasets/{unlabeled}/images", files=[("files", images_archive(tiny_data, first))]
        )
        assert uploaded.status_code == 200, uploaded.text
        v1 = client.post(
            "/v1/models", data={"name": "tiny"}, files={"archive": model_archive(trained_tiny_model)}
        )
        assert v1.status_code == 201 and v1.json()["promoted"], v1.text  # a name's first version is promoted
        v1 = v1.json()

        schedule = {
            "name": "nightly", "cron": "0 3 29 2 *", "timezone": "Europe/Paris", "model": "tiny",
            "labeled": labeled, "unlabeled": unlabeled, "eval": test, "min_new_images": 4,
            "pipeline": {"inference": INFERENCE, "student": {"iterations": 8}, "shard_size": 8},
            "promotion": {"metric": "bbox/AP", "min_gain": 1.0},  # 100 AP points: the student cannot win
        }  # fmt: skip
        for bad, says in [
            ({"cron": "61 * * * *"}, "cron: '61 * * * *' is not a cron expression"),
            ({"cron": "0 3 30 2 *"}, "never fires"),
            ({"timezone": "Mars/Olympus"}, "timezone: 'Mars/Olympus' is not an IANA time zone"),
            ({"model": "nope"}, "model: no model is registered as 'nope'"),
            ({"eval": unlabeled}, "eval: dataset"),
            ({"promotion": {"metric": "bbox/APX"}}, "bbox/APX"),
            ({"pipeline": {"views": "paper"}}, "views"),
        ]:
            answer = client.post("/v1/schedules", json={**schedule, **bad})
            assert answer.status_code == 422 and says in answer.text, (bad, answer.text)
        created = client.post("/v1/schedules", json=schedule)
        assert created.status_code == 201, created.text
        nightly = created.json()
        slots = [dt.datetime.fromisoformat(t) for t in nightly["next_runs"]]
        assert nightly["next_runs"][0] == "2028-02-29T03:00:00+01:00" and len(slots) == 5
        assert client.post("/v1/schedules", json=schedule).status_code == 409

        # an every-minute schedule that always skips, ticked by two beat processes at once
        every = client.post(
            "/v1/schedules",
            json={**schedule, "name": "every-minute", "cron": "* * * * *", "min_new_images": 10**6},
        ).json()
        procs += [celery(stack, "beat", "-s", str(tmp_path / f"beat{i}"), log=tmp_path / f"beat{i}.log")
                  for i in range(2)]  # fmt: skip

        # slot 1, ticked twice (two beats would): one run, one job, the promoted version as its teacher
        tick(slots[0] + dt.timedelta(seconds=1))
        tick(slots[0] + dt.timedelta(seconds=2))
        run1 = wait_until(lambda: runs(nightly["id"]), message="the first run")[0]
        assert run1["state"] == "started" and run1["images"] == 16 and run1["new_images"] == 16
        assert run1["teacher"] == {"id": v1["id"], "name": "tiny", "version": 1}
        job1 = wait_until(lambda: (j := job(run1["job_id"]))["state"] == "running" and j, message="job 1")
        assert job1["models"]["teacher"] == {"id": v1["id"], "name": "tiny", "version": 1, "by": "promoted"}
        assert job1["schedule"]["run"] == run1["id"]

        # slot 2 while job 1 runs: skipped, and said why
        tick(slots[1] + dt.timedelta(seconds=1))
        skipped = wait_until(lambda: len(r := runs(nightly["id"])) == 2 and r[1], message="slot 2")
        assert skipped["state"] == "skipped" and f"job {run1['job_id']}) is still" in skipped["reason"]

        job1 = ended(run1["job_id"])
        assert job1["metrics"]["infer"] == {"images": 16, "cached": 0, "inferred": 16}
        run1 = runs(nightly["id"])[0]
        assert run1["job_state"] == "succeeded" and run1["decision"]["promoted"] is False
        assert {"teacher", "student"} <= set(run1["decision"]["metrics"])
        assert run1["promotion"]["promoted"] is False and "did not beat" in run1["promotion"]["reason"]
        versions = {m["version"]: m for m in client.get("/v1/models", params={"name": "tiny"}).json()["data"]}
        assert set(versions) == {1, 2} and versions[1]["promoted"] and not versions[2]["promoted"]
        assert versions[2]["parent_id"] == v1["id"] and versions[2]["role"] == "student"
        lineage = versions[2]["info"]  # what the student was made from: the inputs' content and the config
        assert (
            lineage["inputs"]["unlabeled"]["images"] == 16 and len(lineage["inputs"]["eval"]["sha256"]) == 64
        )
        assert lineage["config"]["evaluation"] == {"primary": "bbox/AP", "min_gain": 1.0}
        assert versions[2]["metrics"][str(test)]["bbox"]["AP"] >= 0  # scored on the eval dataset

        # slot 3 without new images: skipped
        tick(slots[2] + dt.timedelta(seconds=1))
        skipped = wait_until(lambda: len(r := runs(nightly["id"])) == 3 and r[2], message="slot 3")
        assert skipped["state"] == "skipped" and skipped["reason"].startswith("0 new unlabeled images since")

        # a person promotes v2, then rolls it back: both recorded with who and why
        promoted = client.post("/v1/models/tiny/promote", json={"version": 2, "reason": "try the student"})
        assert promoted.status_code == 200 and promoted.json()["previous"]["version"] == 1, promoted.text
        assert client.post("/v1/models/tiny/promote", json={"version": 2}).status_code == 409
        rolled = client.post("/v1/models/tiny/rollback", json={"reason": "worse on site B"})
        assert rolled.status_code == 200 and rolled.json()["model"]["version"] == 1, rolled.text
        history = client.get("/v1/models/tiny/promotions").json()
        assert history["promoted"]["version"] == 1
        assert [(h["action"], h["model"]["version"], h["undone"]) for h in history["history"]] == [
            ("rollback", 1, False), ("promote", 2, True), ("promote", 1, False),
        ]  # fmt: skip
        assert history["history"][0]["created_by"] == writer_id and history["history"][1]["reason"] == (
            "try the student"
        )
        assert client.post("/v1/models/tiny/rollback", json={}).status_code == 409  # nothing before v1

        # new images arrive; slot 4 starts job 2 with the rolled-back teacher, inferring only the new images
        uploaded = client.post(
            f"/v1/datasets/{unlabeled}/images", files=[("files", images_archive(tiny_data, later))]
        )
        assert uploaded.status_code == 200, uploaded.text
        tick(slots[3] + dt.timedelta(seconds=1))
        run4 = wait_until(lambda: len(r := runs(nightly["id"])) == 4 and r[3], message="slot 4")
        assert run4["state"] == "started" and run4["new_images"] == len(later) and run4["images"] == 24
        job2 = ended(run4["job_id"])
        assert job2["models"]["teacher"]["version"] == 1
        assert job2["metrics"]["infer"] == {"images": 24, "cached": 16, "inferred": len(later)}
        assert [r["state"] for r in runs(nightly["id"])] == ["started", "skipped", "skipped", "started"]

        # an edit changes only what it names (nested objects merged), and counts slots afresh
        client.patch(f"/v1/schedules/{nightly['id']}", json={"promotion": {"metric": "bbox/AP50"}})
        edited = client.patch(f"/v1/schedules/{nightly['id']}", json={"promotion": {"min_gain": 0.5},
                                                                      "pipeline": {"rounds": 2}})  # fmt: skip
        assert edited.status_code == 200, edited.text
        edited = edited.json()
        assert edited["promotion"] == {"metric": "bbox/AP50", "min_gain": 0.5}
        assert edited["pipeline"]["rounds"] == 2 and edited["pipeline"]["inference"]["views"] == "1x:flip"
        assert edited["updated_at"] > nightly["updated_at"]
        bad = client.patch(f"/v1/schedules/{nightly['id']}", json={"cron": "every night"})
        assert bad.status_code == 422 and "cron" in bad.text

        # paused: no next runs; the beats' every-minute slots were each recorded once, all skipped
        def real_minutes() -> list[dict]:  # the slots the beats ticked (the test's ticks are years ahead)
            return [r for r in runs(every["id"]) if r["slot"] < "2027"]

        minutes = wait_until(real_minutes, timeout=90, message="a minute of the beats")
        assert all(r["state"] == "skipped" and "needs 1000000" in r["reason"] for r in minutes)
        stamps = [dt.datetime.fromisoformat(r["slot"]) for r in minutes]
        assert all(s.second == 0 for s in stamps) and len(set(stamps)) == len(stamps)
        assert all(b - a == dt.timedelta(minutes=1) for a, b in itertools.pairwise(stamps))
        paused = client.patch(f"/v1/schedules/{every['id']}", json={"paused": True}).json()
        assert paused["paused"] and paused["next_runs"] == []
        for i in range(2):
            assert "Sending due task tick-schedules" in (tmp_path / f"beat{i}.log").read_text(), i
    finally:
        for proc in procs:
            _stop(proc)
        client.close()
        api.close()
        stack.close()
