"""The HTTP API served by a real uvicorn on a free loopback port, over a real Celery worker and Redis:
tokens and scopes on every route (generated from the OpenAPI document), validation that names the field,
and a pipeline job from uploaded datasets to its downloaded artifacts, with the API killed and restarted
while the job runs — on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from distill import steps
from distill.data.coco import load_coco
from distill.layout import RunLayout
from distill.specs import InferenceSpec, InferSpec, PseudoLabelSpec
from service import auth
from service.db import transaction
from service.models import Model
from tests.service.conftest import free_port
from tests.service.test_workers import Stack, _stop, redis_url  # noqa: F401 (a fixture)

INFERENCE = {"views": "1x:flip", "batch_size": 4, "max_detections": 20, "view_score_thresh": 0.0}


class Api:
    """uvicorn serving the app over the stack's database, storage and broker."""

    def __init__(self, stack: Stack, tmp_path: Path) -> None:
        self.stack, self.port = stack, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = (tmp_path / "api.log").open("a")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.api.main:app", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.stack.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        for _ in range(300):
            try:
                if httpx.get(f"{self.base}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the API did not start")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        self.log.close()


def split_archive(tiny_data: Path, split: str) -> bytes:
    """A .tar.gz of the images a split's json names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for image in load_coco(tiny_data / f"{split}.json").images:
            tar.add(tiny_data / "images" / image["file_name"], arcname=image["file_name"])
    return buffer.getvalue()


def make_dataset(client: httpx.Client, tiny_data: Path, split: str, kind: str) -> int:
    created = client.post("/v1/datasets", json={"name": split, "kind": kind})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    archive = ("images.tar.gz", split_archive(tiny_data, split), "application/gzip")
    uploaded = client.post(f"/v1/datasets/{dataset_id}/images", files=[("files", archive)])
    assert uploaded.status_code == 200 and uploaded.json()["rejected"] == [], uploaded.text
    if kind != "unlabeled":
        coco = ("coco.json", (tiny_data / f"{split}.json").read_bytes(), "application/json")
        annotated = client.put(f"/v1/datasets/{dataset_id}/annotations", files={"file": coco})
        assert annotated.status_code == 200, annotated.text
    return dataset_id


def check_routes_need_a_token(anonymous: httpx.Client) -> set[str]:
    """Every route of the OpenAPI document but /healthz refuses a request without a token or with a bad
    one; returns the operation ids."""
    spec = anonymous.get("/openapi.json").json()
    routes = [(m, p) for p, ops in spec["paths"].items() for m in ops]
    assert len(routes) >= 14
    for method, path in routes:
        if path == "/healthz":
            continue
        url = path.replace("{name}", "x.json")
        for key in ("job_id", "dataset_id", "image_id", "model_id", "schedule_id"):
            url = url.replace(f"{{{key}}}", "1")
        assert anonymous.request(method, url).status_code == 401, (method, path)
        bad = anonymous.request(method, url, headers={"Authorization": "Bearer dst_nope"})
        assert bad.status_code == 401, (method, path)
    return {op["operationId"] for ops in spec["paths"].values() for op in ops.values()}


def wait_for(client: httpx.Client, job_id: int, until, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id}: {job}")


def read_events(client: httpx.Client, job_id: int) -> list[tuple[str, dict]]:
    events, name = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=900) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
                if name == "end":
                    break
    return events


@pytest.mark.slow
def test_a_pipeline_job_from_uploads_to_artifacts_survives_an_api_restart(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
    db_url: str,
) -> None:
    """Once on SQLite and once on a PostgreSQL cluster the tests start (``db_url``'s two params)."""
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120, database=db_url)
    with transaction(stack.sessions) as session:
        writer = auth.create_token(session, scope="write")
        reader = auth.create_token(session, scope="read")
    api = Api(stack, tmp_path)
    api.start()
    as_writer = httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {writer}"}, timeout=60)
    as_reader = httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {reader}"}, timeout=60)
    anonymous = httpx.Client(base_url=api.base)
    try:
        ids = check_routes_need_a_token(anonymous)
        assert {"create_job", "get_job", "job_events", "retry_job", "upload_images", "readyz"} <= ids
        assert as_reader.get("/readyz").json() == {"database": "ok", "storage": "ok", "broker": "ok"}

        labeled = make_dataset(as_writer, tiny_data, "labeled", "labeled")
        unlabeled = make_dataset(as_writer, tiny_data, "unlabeled", "unlabeled")
        test = make_dataset(as_writer, tiny_data, "test", "eval")
        job = {
            "type": "pipeline", "labeled": labeled, "unlabeled": unlabeled, "eval": test,
            "teacher": {"recipe": "tiny", "iterations": 20}, "inference": INFERENCE,
            "student": {"iterations": 8}, "shard_size": 8, "model_name": "tiny-detector",
        }  # fmt: skip

        # validated up front, nothing created for a bad request
        refused = as_reader.post("/v1/jobs", json=job)
        assert refused.status_code == 403 and "needs a write token" in refused.json()["detail"]
        for bad, says in [
            ({**job, "viewz": "paper"}, "viewz"),
            ({**job, "labeled": 999}, "labeled: dataset 999 does not exist"),
            ({**job, "labeled": unlabeled}, "labeled: dataset"),
            ({**job, "teacher": {"recipe": "../../etc/passwd"}}, "unknown recipe"),
            ({**job, "type": "train", "recipe": "tiny"}, "labeled"),
            ({**job, "rounds": -1}, "rounds"),
            ({**job, "teacher": {"model": 12345}}, "teacher.model: model 12345 does not exist"),
        ]:
            answer = as_writer.post("/v1/jobs", json=bad)
            assert answer.status_code == 422 and says in answer.text, (bad, answer.text)
        assert as_reader.get("/v1/jobs").json()["count"] == 0
        assert as_reader.get("/v1/jobs/999").status_code == 404

        created = as_writer.post("/v1/jobs", json=job)
        assert created.status_code == 202 and created.json()["state"] == "queued"
        job_id = created.json()["id"]

        # the API dies while the job trains its teacher; a new API process serves the same job
        wait_for(as_reader, job_id, lambda j: j["state"] == "running")
        api.kill()
        api.start()
        events = read_events(as_reader, job_id)
        final = events[-1][1]
        assert events[-1][0] == "end" and final["state"] == "succeeded", (
            final,
            stack.log_path.read_text()[-3000:],
        )
        assert [s["name"] for s in final["stages"]] == [
            "teacher", "evaluate_teacher", "infer", "pseudo_label", "student", "evaluate_student", "decide",
        ]  # fmt: skip
        assert all(s["state"] == "done" for s in final["stages"])
        infer = next(s for s in final["stages"] if s["name"] == "infer")
        assert infer["units"] == 3 and infer["progress"] == {"done": 24, "total": 24}
        assert len({e[1]["stage"] for e in events}) >= 2  # the stream followed the stages
        decision = final["metrics"]["decide"]
        assert isinstance(decision["promoted"], bool) and "bbox" in decision["metrics"]["student"]
        assert final["datasets"] == {"labeled": labeled, "unlabeled": unlabeled, "eval": test}

        # the pseudo-labels cover every unlabeled image once and equal the in-process steps' on that teacher
        layout = RunLayout(f"jobs/{job_id}").round(1)
        names = {a["name"]: a for a in as_reader.get(f"/v1/jobs/{job_id}/artifacts").json()}
        assert {"round_1/pseudo.json", "round_1/pseudo.calibration.png", "summary.json", "report.md"} <= set(
            names
        )
        assert "round_1/teacher/weights.pt" in names and not names["summary.json"]["partial"]
        assert any(n.startswith("round_1/predictions/shard-") for n in names)
        assert not [n for n in names if n.endswith(".lock")]  # the streams' writer locks are not artifacts
        pseudo = as_reader.get(f"/v1/jobs/{job_id}/artifacts/round_1/pseudo.json")
        assert pseudo.status_code == 200
        mine = pseudo.json()
        unlabeled_names = [im["file_name"] for im in load_coco(tiny_data / "unlabeled.json").images]
        assert sorted(im["file_name"] for im in mine["images"]) == sorted(unlabeled_names)
        teacher = stack.root / layout.teacher
        inputs = stack.root / f"jobs/{job_id}/inputs"
        images = stack.root / f"datasets/{unlabeled}/images"
        local = steps.infer(
            InferSpec(model=str(teacher), images=str(inputs / "unlabeled.json"), images_dir=str(images),
                      out=str(tmp_path / "all.jsonl"), inference=InferenceSpec(**INFERENCE))
        )  # fmt: skip
        steps.pseudo_label(
            PseudoLabelSpec(
                predictions=[local.artifacts["predictions"]],
                unlabeled=str(inputs / "unlabeled.json"),
                labeled=str(inputs / "labeled.json"),
                out=str(tmp_path / "pseudo.json"),
            )
        )
        theirs = json.loads((tmp_path / "pseudo.json").read_text())
        assert mine["annotations"] == theirs["annotations"] and mine["images"] == theirs["images"]
        for name in ("%2e%2e/%2e%2e/distill.db", "..%2f..%2fdistill.db", "inputs/labeled.json", "nope.json"):
            assert as_reader.get(f"/v1/jobs/{job_id}/artifacts/{name}").status_code == 404, name

        # the teacher and the student are registered, the student a child of the teacher, both scored
        with transaction(stack.sessions) as session:
            models = {m.role: m for m in session.query(Model).filter_by(name="tiny-detector")}
            assert (
                set(models) == {"teacher", "student"} and models["student"].parent_id == models["teacher"].id
            )
            assert models["teacher"].job_id == job_id and models["student"].version == 2
            assert "bbox" in models["student"].metrics[str(test)]

        ended = as_writer.post(f"/v1/jobs/{job_id}/cancel")
        assert ended.status_code == 409 and "has ended (succeeded)" in ended.json()["detail"]
        again = as_writer.post(f"/v1/jobs/{job_id}/retry")
        assert again.status_code == 409
        listed = as_reader.get("/v1/jobs", params={"state": "succeeded"}).json()
        assert listed["count"] == 1 and listed["data"][0]["id"] == job_id
    finally:
        for client in (as_writer, as_reader, anonymous):
            client.close()
        api.close()
        stack.close()
    # the logs of the whole run (API access log, worker), flushed now, hold no token nor its secret part
    logs = (tmp_path / "api.log").read_text() + stack.log_path.read_text()
    assert '"POST /v1/jobs HTTP/1.1" 202' in logs and "distill.run_unit" in logs  # they are the logs
    for token in (writer, reader):
        assert token.removeprefix(auth.PREFIX)[:20] not in logs


def test_a_job_whose_first_tasks_were_lost_is_sent_again_by_the_periodic_sweep(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    """The job's commit happened but its tasks never reached Redis (an enqueue that failed): once its stage
    has waited a sweep with the broker queue empty, the API's periodic sweep sends them; each runs once."""
    from distill.storage import Storage
    from service.jobs import submit_distill_job
    from service.models import Job
    from tests.service.test_workers import VIEWS

    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120)
    stack.env["DISTILL_SWEEP_SECONDS"] = "1"
    api = Api(stack, tmp_path)
    api.start()
    try:
        job_id = submit_distill_job(
            stack.sessions, Storage(stack.root), model="models/teacher", unlabeled="data/unlabeled.json",
            unlabeled_images="data/images", labeled="data/labeled.json", inference=VIEWS, shard_size=12,
            enqueue=lambda *unit: None,  # lost
        )  # fmt: skip
        job = stack.wait(job_id, lambda j: j.state in ("succeeded", "failed", "cancelled"), timeout=600)
        assert job.state == "succeeded", (job.error, stack.log_path.read_text()[-3000:])
        with transaction(stack.sessions) as session:
            units = session.get(Job, job_id).shards
            assert [(u.stage, u.state, u.attempts) for u in units] == [
                ("infer", "done", 1), ("infer", "done", 1), ("pseudo_label", "done", 1),
            ]  # fmt: skip
    finally:
        api.close()
        stack.close()
