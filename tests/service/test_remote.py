"""``distill remote`` against the real API on a real uvicorn (a thread of this process, on a free loopback
port), with an ``enqueue`` that records the units a job queues instead of sending them to Celery — no
broker or worker is needed: the tests play the workers' part in the database. The server is stopped by the
fixture that started it; the CLI runs through typer's CliRunner with its config under the test's folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from sqlalchemy import update
from typer.testing import CliRunner

from service import auth, ledger
from service.api.main import create_app
from service.config import Settings
from service.db import make_engine, session_factory, transaction, upgrade
from service.models import Job, Shard
from service.registry import register_model
from service.remote import Client, RemoteError, parse_events
from service.remote_cli import app
from tests.service.conftest import free_port


@dataclass
class Service:
    url: str
    storage: Path
    sessions: object
    writer: str
    reader: str
    enqueued: list[tuple[int, str, int, str]] = field(default_factory=list)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    settings = Settings(data_dir=tmp_path / "var", sweep_seconds=3600)
    upgrade(settings.database)
    engine = make_engine(settings.database)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        writer = auth.create_token(session, scope="write", name="test")
        reader = auth.create_token(session, scope="read", name="test")
    port = free_port()
    recorded: list[tuple[int, str, int, str]] = []
    api = create_app(settings, enqueue=lambda *unit: recorded.append(unit))
    server = uvicorn.Server(
        uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", ws="none", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield Service(f"http://127.0.0.1:{port}", Path(settings.storage), sessions, writer, reader, recorded)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.dispose()
    assert not thread.is_alive()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``cli(*args)`` → the CliRunner result; the login file lives under tmp_path/config."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DISTILL_REMOTE_URL", raising=False)
    monkeypatch.delenv("DISTILL_REMOTE_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})

    return invoke


def _login(cli, service: Service) -> None:
    result = cli("login", service.url, "--token", service.writer)
    assert result.exit_code == 0, result.output


def _images(tiny_data: Path, split: str) -> Path:
    return tiny_data / "images" / split


def test_login_stores_the_token_0600_and_refuses_a_wrong_one(cli, service: Service, tmp_path: Path) -> None:
    config = tmp_path / "config" / "distill" / "remote.json"
    wrong = cli("login", service.url, "--token", "dst_wrong")
    assert wrong.exit_code == 2
    assert "refused the token (HTTP 401" in wrong.output and "nothing stored" in wrong.output
    assert not config.exists()

    result = cli("login", service.url + "/", "--token", service.writer)
    assert result.exit_code == 0, result.output
    assert f"logged in to {service.url} (ready)" in result.output
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"url": service.url, "token": service.writer}
    assert not [p for p in config.parent.iterdir() if p.name != "remote.json"]  # no temporary file left

    assert cli("datasets").exit_code == 0  # the stored login
    bad = cli("datasets", env={"DISTILL_REMOTE_TOKEN": "dst_nope"})  # the environment overrides it
    assert bad.exit_code == 2 and "HTTP 401" in bad.output and "log in again" in bad.output
    other = cli("datasets", "--url", "http://127.0.0.1:1")  # the stored token is not sent elsewhere
    assert other.exit_code == 2 and "no token for http://127.0.0.1:1" in other.output
    down = cli("datasets", "--url", "http://127.0.0.1:1", "--token", "dst_x")
    assert down.exit_code == 1 and "no answer from http://127.0.0.1:1" in down.output
    prompted = CliRunner().invoke(app, ["login", service.url], input=f"{service.reader}\n")
    assert prompted.exit_code == 0, prompted.output
    assert json.loads(config.read_text())["token"] == service.reader
    assert cli("logout").exit_code == 0 and not config.exists()
    assert "not logged in" in cli("logout").output


def test_upload_a_folder_then_a_bad_file(cli, service: Service, tiny_data: Path, tmp_path: Path) -> None:
    _login(cli, service)
    folder = _images(tiny_data, "labeled")
    (tmp_path / "notes.txt").write_text("not an image")
    result = cli("upload", str(folder), "--dataset", "lab", "--kind", "labeled", "--batch-files", "5")
    assert result.exit_code == 0, result.output
    assert "created dataset 'lab' (labeled" in result.output
    assert "dataset lab (id 1): 12 accepted, 0 duplicate, 0 rejected" in result.output
    with Client(service.url, service.reader) as client:
        (dataset,) = client.datasets()
        assert (dataset["name"], dataset["kind"], dataset["stats"]["images"]) == ("lab", "labeled", 12)
        names = {i["name"] for i in client.list_images(dataset["id"])["data"]}
    assert names == {p.name for p in folder.glob("*.png")}

    again = cli("upload", str(folder), "--dataset", "lab")
    assert again.exit_code == 0 and "0 accepted, 12 duplicate, 0 rejected" in again.output
    wrong_kind = cli("upload", str(folder), "--dataset", "lab", "--kind", "eval")
    assert wrong_kind.exit_code == 2 and "exists and is labeled, not eval" in wrong_kind.output

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = tmp_path / "fresh.png"
    shutil.copy(_images(tiny_data, "test") / "000001.png", good)
    mixed = cli("upload", str(bad), str(good), "--dataset", "lab")
    assert mixed.exit_code == 1, mixed.output
    assert "1 accepted, 0 duplicate, 1 rejected" in mixed.output
    line = next(line for line in mixed.output.splitlines() if "rejected broken.png:" in line)
    assert len(line.split("rejected broken.png:", 1)[1].strip()) > 5  # the server's reason
    missing = cli("upload", str(tmp_path / "nope"), "--dataset", "lab")
    assert missing.exit_code == 2 and "nope: no such file or directory" in missing.output


def test_upload_streams_and_reports_bytes(service: Service, tiny_data: Path) -> None:
    files = sorted(_images(tiny_data, "unlabeled").glob("*.png"))[:3]
    sent: list[int] = []
    with Client(service.url, service.writer) as client:
        dataset = client.create_dataset("u", "unlabeled")
        report = client.upload_images(dataset["id"], [(f.name, f) for f in files], on_bytes=sent.append)
        assert [a["name"] for a in report["accepted"]] == [f.name for f in files]
        assert sum(sent) == sum(f.stat().st_size for f in files)
        with pytest.raises(RemoteError) as error:
            client.create_dataset("u", "unlabeled")
        assert error.value.status == 409 and "u" in error.value.detail
        with pytest.raises(RemoteError) as error:
            client.create_dataset("bad name!", "unlabeled")
        assert error.value.status == 422 and error.value.detail.startswith("name: ")


def _datasets(cli, tiny_data: Path) -> None:
    labeled = cli("upload", str(tiny_data / "images"), "--dataset", "lab", "--kind", "labeled",
                  "--annotations", str(tiny_data / "labeled.json"))  # fmt: skip
    assert labeled.exit_code == 0, labeled.output
    assert "12 accepted" in labeled.output and "annotations put (12 images" in labeled.output
    unlabeled = cli("upload", str(_images(tiny_data, "unlabeled")), "--dataset", "unl")
    assert unlabeled.exit_code == 0 and "24 accepted" in unlabeled.output, unlabeled.output


def _submit(cli, tmp_path: Path) -> int:
    config = tmp_path / "round.yaml"
    config.write_text(
        yaml.safe_dump(
            {"data": {"labeled": "x.json"}, "inference": {"views": "1x:flip", "batch_size": 2}, "seed": 7}
        )
    )
    result = cli("run", "pipeline", "--labeled", "lab", "--unlabeled", "unl", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "leaving out data (datasets come from --labeled" in result.output
    return int(result.stdout.strip())


def test_run_pipeline_then_jobs_cancel_retry(cli, service: Service, tiny_data: Path, tmp_path: Path) -> None:
    _login(cli, service)
    _datasets(cli, tiny_data)
    job_id = _submit(cli, tmp_path)
    assert service.enqueued and {u[0] for u in service.enqueued} == {job_id}
    with Client(service.url, service.reader) as client:
        job = client.get_job(job_id)
    assert job["state"] == "queued" and job["datasets"] == {"labeled": 1, "unlabeled": 2}
    assert {u[1] for u in service.enqueued} == {job["stages"][0]["name"]}  # its first stage's units
    with transaction(service.sessions) as session:
        config = session.get(Job, job_id).spec["config"]
    assert config["seed"] == 7 and config["inference"]["batch_size"] == 2

    listed = cli("jobs")
    assert listed.exit_code == 0
    row = next(line for line in listed.output.splitlines() if f" {job_id} " in f" {line} ")
    assert "pipeline" in row and "queued" in row
    assert f" {job_id} " not in cli("jobs", "--state", "succeeded").output

    cancelled = cli("cancel", str(job_id))
    assert cancelled.exit_code == 0 and f"job {job_id} cancelled" in cancelled.output
    assert "cancelled" in cli("jobs", "--state", "cancelled").output
    again = cli("cancel", str(job_id))
    assert again.exit_code == 2 and "has ended (cancelled)" in again.output
    retried = cli("retry", str(job_id))
    assert retried.exit_code == 0 and f"job {job_id} queued again" in retried.output, retried.output

    unknown = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "999")
    assert unknown.exit_code == 2 and "teacher: model 999 does not exist" in unknown.output
    no_dataset = cli("run", "pipeline", "--labeled", "nope", "--unlabeled", "unl")
    assert no_dataset.exit_code == 2 and "no dataset 'nope'" in no_dataset.output
    assert cli("annotations", "unl", str(tmp_path / "none.json")).exit_code == 2


def test_run_distill_with_a_teacher_by_name(cli, service: Service, tiny_data: Path, tmp_path: Path) -> None:
    _login(cli, service)
    _datasets(cli, tiny_data)
    with transaction(service.sessions) as session:
        for version in (1, 2):
            register_model(session, name="teach", key=f"models/teach/{version}", backend="torchvision",
                           source="upload", role="imported")  # fmt: skip
    config = tmp_path / "views.yaml"
    config.write_text(yaml.safe_dump({"inference": {"views": "1x"}, "student": {"iterations": 5}}))
    result = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "teach",
                 "--config", str(config))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "leaving out student (a distill job takes no student)" in result.output
    job_id = int(result.stdout.strip())
    with transaction(service.sessions) as session:
        job = session.get(Job, job_id)
        assert (job.type, job.spec["parent_model_id"]) == ("distill", 2)  # the latest version
        assert job.spec["config"]["teacher"]["model"] == "models/teach/2"
    pinned = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "teach:1")
    with transaction(service.sessions) as session:
        assert session.get(Job, int(pinned.stdout.strip())).spec["parent_model_id"] == 1
    missing = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "other")
    assert missing.exit_code == 2 and "--teacher-model 'other': no such model" in missing.output
    listed = cli("models")
    assert listed.exit_code == 0 and "teach" in listed.output

    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"not a tarball")
    with Client(service.url, service.writer) as client, pytest.raises(RemoteError) as error:
        client.upload_model("m", bad)
    assert error.value.status == 422 and error.value.detail


def _finish(service: Service, job_id: int, state: str, **values) -> None:
    """Play the workers: the first stage's units done, then the job's end state."""
    with transaction(service.sessions) as session:
        job = session.get(Job, job_id)
        first = job.plan[0]
        session.execute(
            update(Shard)
            .where(Shard.job_id == job_id, Shard.stage == first)
            .values(state="done", done=Shard.images)
        )
        started = update(Job).where(Job.id == job_id).values(state="running", started_at=job.created_at)
        session.execute(started)
        assert ledger.finish_job(session, job_id=job_id, state=state, **values)


def test_watch_exits_with_the_jobs_end(cli, service: Service, tiny_data: Path, tmp_path: Path) -> None:
    _login(cli, service)
    _datasets(cli, tiny_data)
    first = _submit(cli, tmp_path)
    with transaction(service.sessions) as session:
        plan = session.get(Job, first).plan

    # finished while the watch follows its event stream
    metrics = {
        "teacher": {"final_loss": {"total": 1.5}, "iterations": 5},
        "evaluate_teacher": {"bbox": {"AP": 0.125, "AP50": 0.5}},
        "decide": {"promoted": True, "primary": {"metric": "bbox/AP", "teacher": 0.125, "student": 0.25}},
    }
    timer = threading.Timer(1.5, _finish, (service, first, "succeeded"), {"metrics": metrics})
    timer.start()
    try:
        watched = cli("watch", str(first))
    finally:
        timer.join()
    assert watched.exit_code == 0, watched.output
    lines = watched.output.splitlines()
    assert any(line.split()[:2] == ["done", plan[0]] for line in lines), watched.output
    assert all(any(name in line for line in lines) for name in plan)  # every stage, done or not
    assert f"job {first} succeeded" in watched.output
    assert "evaluate_teacher: bbox AP 12.5" in watched.output
    assert "decide: bbox/AP teacher 12.5, student 25.0 -> promoted" in watched.output
    assert "final_loss" not in watched.output  # training losses stay in GET /v1/jobs/{id}

    failed = _submit(cli, tmp_path)
    _finish(service, failed, "failed", error="student: the loss became NaN")
    result = cli("watch", str(failed))
    assert result.exit_code == 1 and "failed" in result.output
    assert "student: the loss became NaN" in result.output

    cancelled = _submit(cli, tmp_path)
    assert cli("cancel", str(cancelled)).exit_code == 0
    result = cli("watch", str(cancelled))
    assert result.exit_code == 130 and f"job {cancelled} cancelled" in result.output
    assert cli("watch", "999").exit_code == 2


def test_download_one_artifact_or_all(cli, service: Service, tiny_data: Path, tmp_path: Path) -> None:
    _login(cli, service)
    _datasets(cli, tiny_data)
    job_id = _submit(cli, tmp_path)
    folder = service.storage / "jobs" / str(job_id)
    pseudo = b'{"images": []}' * 10_000
    (folder / "pseudo.json").write_bytes(pseudo)
    (folder / "round1").mkdir()
    (folder / "round1" / "metrics.json").write_text('{"bbox/AP": 0.5}')
    _finish(service, job_id, "succeeded")

    one = cli("download", str(job_id), "pseudo.json", "--out", str(tmp_path / "one"))
    assert one.exit_code == 0, one.output
    assert (tmp_path / "one" / "pseudo.json").read_bytes() == pseudo
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["pseudo.json"]  # no .part left

    every = cli("download", str(job_id))  # default: ./job-ID
    assert every.exit_code == 0, every.output
    out = tmp_path / f"job-{job_id}"
    assert (out / "pseudo.json").read_bytes() == pseudo
    assert (out / "round1" / "metrics.json").read_text() == '{"bbox/AP": 0.5}'
    assert not (out / "inputs").exists()  # the job's input snapshots are not artifacts

    unknown = cli("download", str(job_id), "secrets.txt")
    assert unknown.exit_code == 2 and "no artifact 'secrets.txt'" in unknown.output
    assert "pseudo.json" in unknown.output


def test_datasets_table(cli, service: Service, tiny_data: Path) -> None:
    _login(cli, service)
    _datasets(cli, tiny_data)
    table = cli("datasets")
    assert table.exit_code == 0
    row = next(line for line in table.output.splitlines() if " lab " in line)
    assert "labeled" in row and "12" in row and "yes: 42 instances" in row


# ---- the client alone, over httpx's mock transport ----


def test_ids_the_database_cannot_hold_are_a_422_not_a_500(service: Service) -> None:
    huge = 2**70
    headers = {"Authorization": f"Bearer {service.writer}"}
    with httpx.Client(base_url=service.url, headers=headers) as client:
        for method, path, body in [
            ("GET", f"/v1/jobs/{huge}", None),
            ("GET", f"/v1/datasets/{huge}", None),
            ("GET", f"/v1/models/{huge}", None),
            ("POST", "/v1/jobs", {"type": "distill", "labeled": huge, "unlabeled": huge, "teacher": huge}),
        ]:
            answer = client.request(method, path, json=body)
            assert answer.status_code == 422, (path, answer.text)
            assert "out of range" in answer.json()["detail"], path
        assert client.get("/v1/jobs/12345").status_code == 404  # an id in range is still just missing


def test_event_stream_parsing() -> None:
    lines = ["event: job", 'data: {"a":', "data: 1}", "", ": ping", "", "event: end", "data: {}", "id: 3"]
    events = list(parse_events(iter(lines)))
    assert [(e.event, e.data) for e in events] == [("job", '{"a":\n1}'), ("end", "{}")]
    assert events[1].id == "3"


def test_follow_reconnects_and_falls_back_to_get() -> None:
    """A dropped stream: the job is read once by GET, then the stream is opened again, until ``end``."""
    calls: list[str] = []
    running = {"id": 1, "state": "running", "stage": "infer", "progress": {"done": 1, "total": 4}}
    done = {**running, "state": "succeeded", "progress": {"done": 4, "total": 4}}

    class Drop(httpx.SyncByteStream):
        def __iter__(self):
            yield f"event: job\ndata: {json.dumps(running)}\n\n".encode()
            raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/events"):
            if calls.count(request.url.path) == 1:
                return httpx.Response(200, stream=Drop(), headers={"content-type": "text/event-stream"})
            body = f"event: job\ndata: {json.dumps(done)}\n\nevent: end\ndata: {json.dumps(done)}\n\n"
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=running)

    with Client("http://x", "t", transport=httpx.MockTransport(handler)) as client:
        states = [job["state"] for job in client.follow(1, sleep=lambda s: None)]
    assert states == ["running", "running", "succeeded"]
    assert calls == ["/v1/jobs/1/events", "/v1/jobs/1", "/v1/jobs/1/events"]


def test_remote_errors_carry_status_and_detail() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs":
            detail = [{"loc": ["body", "pipeline", "viewz"], "msg": "Extra inputs are not permitted"}]
            return httpx.Response(422, json={"detail": detail})
        return httpx.Response(404, json={"detail": "job 5 does not exist"})

    with Client("http://x", "t", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(RemoteError) as error:
            client.get_job(5)
        assert (error.value.status, error.value.detail) == (404, "job 5 does not exist")
        assert str(error.value) == "GET /v1/jobs/5: HTTP 404: job 5 does not exist"
        with pytest.raises(RemoteError) as error:
            client.create_job({"type": "pipeline"})
        assert error.value.detail == "pipeline.viewz: Extra inputs are not permitted"
        with pytest.raises(RemoteError) as error:  # 404 is not retried: follow gives up at once
            list(client.follow(5, sleep=lambda s: None))
        assert error.value.status == 404


def test_the_client_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, service.remote, service.remote_cli; print(sorted(m for m in sys.modules if m in "
    code += "('torch', 'sqlalchemy', 'distill', 'numpy', 'PIL', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    command = [sys.executable, "-m", "distill.cli", "remote", "--help"]  # the entry point registers it
    shown = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "120"}
    )
    assert "login" in shown.stdout and "watch" in shown.stdout and "download" in shown.stdout
