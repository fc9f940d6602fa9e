"""``distill remote`` against the real API on a real uvicorn (a thread of this process, on a free loopback
port), with an ``enqueue`` that records the units a job queues instead of sending them to Celery — no
broker or worker is needed: the tests play the workers' part in the database. The server is stopped by the
fixture that started it; the CLI runs through typer's CliRunner with its config under the test's folder."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import stat
import tarfile
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
from service.models import Job, ScheduleRun, Shard
from service.registry import register_model
from service.remote import Client, RemoteError, parse_events
from service.remote_cli import _schedule_pipeline, app
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
    only_bad = cli("upload", str(bad), "--dataset", "lab")  # the server's 422 still carries the report
    assert only_bad.exit_code == 1 and "0 accepted, 0 duplicate, 1 rejected" in only_bad.output, (
        only_bad.output
    )
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
        # a name is its promoted version (the first, until another is promoted), recorded on the job
        assert (job.type, job.spec["parent_model_id"]) == ("distill", 1)
        assert job.spec["config"]["teacher"]["model"] == "models/teach/1"
        assert job.spec["models"]["teacher"] == {"id": 1, "name": "teach", "version": 1, "by": "promoted"}
    pinned = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "teach:2")
    with transaction(service.sessions) as session:
        assert session.get(Job, int(pinned.stdout.strip())).spec["parent_model_id"] == 2
    missing = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "other")
    assert missing.exit_code == 2 and "teacher: 'other' is not a registered model name" in missing.output
    unknown = cli("run", "distill", "--labeled", "lab", "--unlabeled", "unl", "--teacher-model", "teach:7")
    assert unknown.exit_code == 2 and "--teacher-model 'teach:7': no such model" in unknown.output
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


def _table(output: str) -> list[list[str]]:
    """The body rows of the rich tables in ``output``, as their cells."""
    lines = [line for line in output.splitlines() if line.startswith("│")]
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines]


def _model_archive(model_dir: Path, out: Path) -> Path:
    """A .tar.gz of the model's loading files inside one folder (what POST /v1/models takes)."""
    with tarfile.open(out, "w:gz") as archive:
        for name in ("config.yaml", "weights.pt", "meta.json"):
            archive.add(model_dir / name, arcname=f"tiny/{name}")
    return out


def test_models_promote_history_rollback(cli, service: Service, tiny_config, tmp_path: Path) -> None:
    from distill.models.torchvision import TorchvisionDetector

    _login(cli, service)
    untrained = TorchvisionDetector(tiny_config).save(tmp_path / "model")  # promotion needs no training
    archive = _model_archive(untrained, tmp_path / "tiny.tar.gz")
    with Client(service.url, service.writer) as client:
        v1, v2 = (client.upload_model("tiny", archive) for _ in range(2))
    assert (v1["version"], v1["promoted"], v2["version"], v2["promoted"]) == (1, True, 2, False)

    def promoted() -> dict[str, str]:  # version -> the `promoted` column of `distill remote models`
        listed = cli("models")
        assert listed.exit_code == 0, listed.output
        return {row[2]: row[3] for row in _table(listed.output) if row[1] == "tiny"}

    assert promoted() == {"1": "yes", "2": "no"}
    result = cli("models", "promote", "tiny", "2", "--reason", "x")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"promoted tiny v2 (model {v2['id']}) (was v1)"
    assert promoted() == {"1": "no", "2": "yes"}
    again = cli("models", "promote", "tiny", "2")
    assert again.exit_code == 2 and "HTTP 409: tiny v2 is already the promoted version" in again.output
    missing = cli("models", "promote", "tiny", "9")
    assert missing.exit_code == 2 and "HTTP 404: tiny has no version 9" in missing.output
    unknown = cli("models", "history", "nope")
    assert unknown.exit_code == 2 and "no model is registered as 'nope'" in unknown.output
    # the group's --token serves its subcommands: a read token may look, not promote
    read = cli("models", "--token", service.reader, "promote", "tiny", "1")
    assert read.exit_code == 2 and "HTTP 403" in read.output, read.output

    history = cli("models", "--token", service.reader, "history", "tiny")
    assert history.exit_code == 0, history.output
    assert history.output.splitlines()[0] == f"tiny: promoted v2 (model {v2['id']})"
    rows = _table(history.output)  # when, action, version, previous, undone, by, reason; the newest first
    assert [r[1:5] + r[6:] for r in rows] == [
        ["promote", "v2", "v1", "", "x"],
        ["promote", "v1", "", "", "first version"],
    ]
    assert re.fullmatch(r"token \d+", rows[0][5]) and rows[1][5] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", rows[0][0])

    back = cli("models", "rollback", "tiny", "--reason", "v2 misses [bikes]")
    assert back.exit_code == 0, back.output
    assert back.output.strip() == f"rolled back tiny to v1 (model {v1['id']}); v2 is no longer promoted"
    assert promoted() == {"1": "yes", "2": "no"}
    rows = _table(cli("models", "history", "tiny").output)
    assert [r[1:5] + r[6:] for r in rows] == [
        ["rollback", "v1", "v2", "", "v2 misses [bikes]"],
        ["promote", "v2", "v1", "yes", "x"],
        ["promote", "v1", "", "", "first version"],
    ]
    twice = cli("models", "rollback", "tiny")
    assert twice.exit_code == 2, twice.output
    assert "HTTP 409: tiny v1 has no earlier promoted version to roll back to" in twice.output
    with Client(service.url, service.reader) as client:
        found = client.promotions("tiny")
    assert found["promoted"]["id"] == v1["id"] and len(found["history"]) == 3


NEXT_RUN = r"\d{4}-\d\d-\d\d 03:00\+0[12]:00"  # 03:00 in Paris: CET or CEST


def test_schedule_create_list_pause_runs_delete(
    cli, service: Service, tiny_data: Path, tmp_path: Path
) -> None:
    _login(cli, service)
    _datasets(cli, tiny_data)
    evaluation = cli("upload", str(tiny_data / "images"), "--dataset", "ev", "--kind", "eval",
                     "--annotations", str(tiny_data / "test.json"))  # fmt: skip
    assert evaluation.exit_code == 0, evaluation.output
    with transaction(service.sessions) as session:  # the schedule needs only the name registered
        teacher = register_model(session, name="tiny", key="models/tiny/1", backend="torchvision",
                                 source="upload", role="imported").id  # fmt: skip
    with Client(service.url, service.reader) as client:
        eval_id = client.find_dataset("ev")["id"]
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"iterations": 9}, "student": {"iterations": 5}, "seed": 3}))
    create = ["schedule", "create", "nightly", "--timezone", "Europe/Paris", "--model", "tiny",
              "--labeled", "lab", "--unlabeled", "unl", "--eval", str(eval_id)]  # fmt: skip

    for bad, says in [
        (["--cron", "61 * * * *"], "cron: '61 * * * *' is not a cron expression"),
        (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], "timezone: 'Mars/Olympus'"),
        (["--cron", "0 3 * * *", "--model", "nope"], "model: no model is registered as 'nope'"),
        (["--cron", "0 3 * * *", "--eval", "nope"], "no dataset 'nope'"),
    ]:
        refused = cli(*create, *bad)
        assert refused.exit_code == 2 and says in refused.output, (bad, refused.output)
    assert cli("schedule", "list").output.count("nightly") == 0

    made = cli(*create, "--cron", "0 3 * * *", "--min-new-images", "4", "--min-gain", "0.01",
               "--config", str(config))  # fmt: skip
    assert made.exit_code == 0, made.output
    schedule_id = int(made.stdout.strip())
    assert "leaving out teacher" in made.output
    assert f"schedule 'nightly' (id {schedule_id}): 0 3 * * * in Europe/Paris" in made.output
    runs_at = re.findall(r"next run (.+)", made.output)
    assert len(runs_at) == 5 and all(re.fullmatch(NEXT_RUN, t) for t in runs_at), made.output
    with Client(service.url, service.reader) as client:
        stored = client.get_schedule(schedule_id)
    assert (stored["labeled"], stored["unlabeled"], stored["eval"]) == (1, 2, eval_id)
    assert stored["pipeline"]["seed"] == 3 and stored["pipeline"]["student"]["iterations"] == 5
    assert stored["promotion"] == {"metric": "bbox/AP", "min_gain": 0.01} and stored["min_new_images"] == 4
    taken = cli(*create, "--cron", "0 4 * * *")
    assert taken.exit_code == 2 and "HTTP 409: a schedule is already named 'nightly'" in taken.output

    def listed() -> list[str]:
        result = cli("schedule", "list")
        assert result.exit_code == 0, result.output
        (row,) = _table(result.output)
        return row

    row = listed()
    assert row[:6] == [str(schedule_id), "nightly", "0 3 * * *", "Europe/Paris", "tiny", "no"]
    assert row[6] == runs_at[0]
    paused = cli("schedule", "pause", "nightly")  # by name
    assert paused.exit_code == 0 and paused.output.strip() == f"schedule nightly (id {schedule_id}) paused"
    assert listed()[5:] == ["yes", ""]  # no next run while paused
    resumed = cli("schedule", "resume", str(schedule_id))  # by id
    assert resumed.exit_code == 0, resumed.output
    assert re.fullmatch(rf"schedule nightly \(id {schedule_id}\) resumed; next run {NEXT_RUN}",
                        resumed.output.strip())  # fmt: skip
    assert listed()[5] == "no"

    empty = cli("schedule", "runs", "nightly")
    assert empty.exit_code == 0, empty.output
    assert empty.output.strip() == f"schedule nightly (id {schedule_id}): no runs yet"

    # two runs recorded as a tick would: a skipped slot, then one that started a job the gate promoted from
    job = cli("run", "pipeline", "--labeled", "lab", "--unlabeled", "unl", "--eval", "ev")
    job_id = int(job.stdout.strip())
    with transaction(service.sessions) as session:
        decide = next(s for s in session.get(Job, job_id).plan if s.partition("@")[0] == "decide")
    decision = {
        "promoted": True, "primary": {"metric": "bbox/AP", "teacher": 0.125, "student": 0.25},
        "promotion": {"promoted": True, "name": "tiny", "model_id": 7, "version": 2, "reason": "beat v1"},
    }  # fmt: skip
    _finish(service, job_id, "succeeded", metrics={decide: decision})
    with transaction(service.sessions) as session:
        slot = dt.datetime(2030, 1, 1, 2, 0, tzinfo=dt.UTC)  # 03:00 in Paris
        session.add(ScheduleRun(schedule_id=schedule_id, slot=slot, state="skipped",
                                reason="3 new images, fewer than 4", images=3, new_images=3))  # fmt: skip
        session.add(ScheduleRun(schedule_id=schedule_id, slot=slot + dt.timedelta(days=1), state="started",
                                job_id=job_id, teacher_id=teacher, images=24, new_images=21))  # fmt: skip
    result = cli("schedule", "runs", str(schedule_id))
    assert result.exit_code == 0, result.output
    assert _table(result.output) == [  # the newest first, slots in the schedule's zone
        ["2030-01-02 03:00+01:00", "started", str(job_id), "succeeded", "v1", "24/21",
         "bbox/AP 12.5 -> 25.0", "yes: v2", "beat v1"],
        ["2030-01-01 03:00+01:00", "skipped", "", "", "", "3/3", "", "", "3 new images, fewer than 4"],
    ]  # fmt: skip
    assert cli("schedule", "runs", "nightly", "--limit", "1").output.strip().endswith("1 of 2 runs (--limit)")
    with Client(service.url, service.reader) as client:
        runs = client.schedule_runs(schedule_id)
    assert [r["state"] for r in runs] == ["started", "skipped"] and runs[0]["decision"]["promoted"] is True

    deleted = cli("schedule", "delete", "nightly")
    assert deleted.exit_code == 0 and deleted.output.strip() == f"deleted schedule nightly (id {schedule_id})"
    assert _table(cli("schedule", "list").output) == []
    gone = cli("schedule", "pause", "nightly")
    assert gone.exit_code == 2 and "no schedule 'nightly'" in gone.output


def test_schedule_pipeline_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"pipeline": {"rounds": 2, "student": {"iterations": 4}}, "seed": 1}))
    assert _schedule_pipeline(nested) == {"rounds": 2, "student": {"iterations": 4}, "seed": 1}
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"data": {"labeled": "x"}, "inference": {"views": "1x"}, "model_name": "m"}))
    assert _schedule_pipeline(flat) == {"inference": {"views": "1x"}}
    assert "leaving out data, model_name" in capsys.readouterr().err
    assert _schedule_pipeline(None) == {}


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
