"""The HTTP API served by a real uvicorn on a free loopback port, over a real Celery worker and Redis:
tokens and scopes on every route, validation that names the field, a distill job from submission to its
downloaded pseudo-labels."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service import auth
from service.db import transaction
from tests.service.conftest import free_port
from tests.service.test_workers import Stack, _stop, redis_url  # noqa: F401 (a fixture)

JOB = {
    "type": "distill",
    "model": "models/teacher",
    "unlabeled": "data/unlabeled.json",
    "unlabeled_images": "data/images",
    "labeled": "data/labeled.json",
    "inference": {"views": "1x:flip", "batch_size": 4, "max_detections": 20, "view_score_thresh": 0.0},
    "shard_size": 12,
}


@pytest.mark.slow
def test_the_api_guards_every_route_validates_and_runs_a_distill_job(
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120)
    with transaction(stack.sessions) as session:
        writer = auth.create_token(session, scope="write")
        reader = auth.create_token(session, scope="read")
    port = free_port()
    api_log = (tmp_path / "api.log").open("w")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=stack.env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        as_writer = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {writer}"})
        as_reader = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {reader}"})
        anonymous = httpx.Client(base_url=base)

        # every route in the OpenAPI document but /healthz refuses without a token (401) or a bad one
        spec = anonymous.get("/openapi.json").json()
        routes = [(m, p) for p, ops in spec["paths"].items() for m in ops]
        assert len(routes) >= 7
        for method, path in routes:
            if path == "/healthz":
                continue
            url = path.replace("{job_id}", "1").replace("{name}", "pseudo.json")
            assert anonymous.request(method, url).status_code == 401, (method, path)
            bad = anonymous.request(method, url, headers={"Authorization": "Bearer dst_nope"})
            assert bad.status_code == 401, (method, path)
        ids = {op["operationId"] for ops in spec["paths"].values() for op in ops.values()}
        assert {"create_job", "get_job", "list_jobs", "cancel_job", "get_artifact", "readyz"} <= ids

        assert as_reader.get("/readyz").json() == {"database": "ok", "storage": "ok"}
        refused = as_reader.post("/v1/jobs", json=JOB)
        assert refused.status_code == 403 and "needs a write token" in refused.json()["detail"]
        unknown = as_writer.post("/v1/jobs", json={**JOB, "viewz": "paper"})
        assert unknown.status_code == 422 and "viewz" in unknown.text
        missing = as_writer.post("/v1/jobs", json={**JOB, "model": "models/nope"})
        assert (
            missing.status_code == 422 and missing.json()["detail"] == "model: models/nope is not in storage"
        )
        escape = as_writer.post("/v1/jobs", json={**JOB, "labeled": "../etc/passwd"})
        assert escape.status_code == 422 and "may not contain '..'" in escape.json()["detail"]
        assert as_reader.get("/v1/jobs/999").status_code == 404

        created = as_writer.post("/v1/jobs", json=JOB)
        assert created.status_code == 202 and created.json()["state"] == "queued"
        job_id = created.json()["id"]
        deadline = time.time() + 600
        while time.time() < deadline:
            job = as_reader.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        assert job["state"] == "succeeded", (job, stack.log_path.read_text()[-2000:])
        assert job["progress"] == {"done": 24, "total": 24} and job["metrics"]["kept_instances"] > 0
        listed = as_reader.get("/v1/jobs", params={"state": "succeeded"}).json()
        assert listed["count"] == 1 and listed["data"][0]["id"] == job_id

        names = {a["name"] for a in as_reader.get(f"/v1/jobs/{job_id}/artifacts").json()}
        assert {"pseudo.json", "calibration.json", "calibration.png", "predictions-00000.jsonl"} <= names
        pseudo = as_reader.get(f"/v1/jobs/{job_id}/artifacts/pseudo.json")
        assert pseudo.content == (stack.root / f"jobs/{job_id}/pseudo.json").read_bytes()
        assert as_reader.get(f"/v1/jobs/{job_id}/artifacts/secrets.txt").status_code == 404
        ended = as_writer.post(f"/v1/jobs/{job_id}/cancel")
        assert ended.status_code == 409 and "has ended (succeeded)" in ended.json()["detail"]
        for client in (as_writer, as_reader, anonymous):
            client.close()
    finally:
        _stop(api)
        api_log.close()
        stack.close()
