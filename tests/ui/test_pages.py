"""The dashboard's pages over a real uvicorn (SQLite, a storage folder; no broker needed to read): every
page renders on an empty database and with a failed job; signing in gives an HttpOnly SameSite=Strict
cookie; forms need the session's form token; a read token gets no buttons and is refused anyway; revoking a
token ends its sessions; failed sign-ins are rate-limited; ``next`` cannot leave the site."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service import auth
from service.db import make_engine, session_factory, transaction, upgrade
from service.models import Job, Shard
from tests.service.conftest import free_port
from tests.service.test_api import make_dataset
from tests.service.test_workers import _stop

PAGES = ["/ui/jobs", "/ui/jobs/rows", "/ui/jobs/new", "/ui/datasets", "/ui/models", "/ui/schedules"]


@dataclass
class Dashboard:
    base: str
    sessions: object
    tokens: dict[str, str]
    storage: Path
    clients: list[httpx.Client] = field(default_factory=list)  # closed by the fixture

    def client(self) -> httpx.Client:
        self.clients.append(httpx.Client(base_url=self.base, timeout=30))
        return self.clients[-1]

    def signed_in(self, scope: str) -> httpx.Client:
        client = self.client()
        form = client.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        answer = client.post(
            "/ui/login", data={"token": self.tokens[scope], "csrf": csrf, "next": "/ui/jobs"}
        )
        assert answer.status_code == 303, answer.text
        return client


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    root = tmp_path_factory.mktemp("dashboard")
    database = f"sqlite:///{root / 'distill.db'}"
    upgrade(database)
    engine = make_engine(database)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        tokens = {scope: auth.create_token(session, scope=scope) for scope in ("read", "write")}
    port = free_port()
    env = {**os.environ, "DISTILL_DATABASE_URL": database, "DISTILL_STORAGE_URL": str(root / "storage"),
           "DISTILL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # fmt: skip
    with (root / "api.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.api.main:app", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (root / "api.log").read_text()
            time.sleep(0.1)
        dashboard = Dashboard(base, sessions, tokens, root / "storage")
        yield dashboard
    finally:
        for client in locals().get("dashboard", Dashboard(base, sessions, tokens, root / "storage")).clients:
            client.close()
        _stop(proc)
        engine.dispose()


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_pages_need_a_session_and_render_on_an_empty_database(dashboard: Dashboard) -> None:
    anonymous = dashboard.client()
    for path in [*PAGES, "/ui/jobs/1", "/ui/models/x/history.png", "/ui/datasets/1"]:
        answer = anonymous.get(path)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login?next="), path
    assert anonymous.post("/ui/jobs/1/cancel", data={"csrf": "x"}).status_code == 303
    client = dashboard.signed_in("write")
    texts = {path: client.get(path) for path in PAGES}
    assert all(a.status_code == 200 for a in texts.values()), {p: a.status_code for p, a in texts.items()}
    assert "No jobs yet" in texts["/ui/jobs"].text and "No jobs yet" in texts["/ui/jobs/rows"].text
    assert "No datasets yet" in texts["/ui/datasets"].text
    assert "No models yet" in texts["/ui/models"].text
    assert "No schedules yet" in texts["/ui/schedules"].text
    assert "Content-Security-Policy" in texts["/ui/jobs"].headers
    history = client.get("/ui/models/none/history.png")
    assert history.status_code == 200 and history.content.startswith(b"\x89PNG")
    bad = client.get("/ui/schedules/preview", params={"cron": "61 * * * *"})
    assert "is not a cron expression" in bad.text
    good = client.get("/ui/schedules/preview", params={"cron": "0 3 * * *", "timezone": "Europe/Paris"})
    assert good.text.count("<li>") == 5 and "T03:00:00+01:00" in good.text
    missing = client.get("/ui/jobs/99")
    assert missing.status_code == 404 and "job 99 does not exist" in missing.text and "<html" in missing.text


def test_a_failed_job_renders_with_its_error_and_a_retry_button(dashboard: Dashboard) -> None:
    with transaction(dashboard.sessions) as session:
        job = Job(type="pipeline", state="failed", stage="infer", plan=["teacher", "infer", "decide"],
                  error="infer: out of memory", warnings=["2 images unreadable"])  # fmt: skip
        session.add(job)
        session.flush()
        session.add(Shard(job_id=job.id, stage="teacher", index=0, state="done", attempts=1, queue="gpu",
                          claimed_at=1.0e9, finished_at=1.0e9 + 5))  # fmt: skip
        session.add(Shard(job_id=job.id, stage="infer", index=0, state="failed", attempts=3, queue="gpu",
                          claimed_at=1.0e9 + 6, finished_at=1.0e9 + 9, error="out of memory"))  # fmt: skip
        job_id = job.id
    writer = dashboard.signed_in("write")
    page = writer.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    assert "infer: out of memory" in page.text and "2 images unreadable" in page.text
    assert 'id="retry-job"' in page.text and 'id="cancel-job"' not in page.text
    assert "failed: out of memory" in page.text  # the activity log
    assert writer.get(f"/ui/jobs/{job_id}/live").status_code == 200
    rows = writer.get("/ui/jobs/rows", params={"state": "failed"})
    assert f'id="job-{job_id}"' in rows.text and 'data-state="failed"' in rows.text
    assert f'id="job-{job_id}"' not in writer.get("/ui/jobs/rows", params={"state": "running"}).text
    for kind in ("scores", "classes", "agreement"):
        plot = writer.get(f"/ui/jobs/{job_id}/plots/1/{kind}.png")
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG"), kind
    browser = writer.get(f"/ui/jobs/{job_id}/pseudo")
    assert browser.status_code == 404 and "no pseudo-labels" in browser.text
    refused = writer.post(f"/ui/jobs/{job_id}/retry", data={"csrf": "forged"})
    assert refused.status_code == 403
    reader = dashboard.signed_in("read")
    page = reader.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and 'id="retry-job"' not in page.text
    assert "Start a pipeline job" not in reader.get("/ui/jobs").text
    assert reader.post(f"/ui/jobs/{job_id}/retry", data={"csrf": _csrf(page.text)}).status_code == 403
    with transaction(dashboard.sessions) as session:
        assert session.get(Job, job_id).state == "failed"  # nothing changed


def test_the_pseudo_label_browser_and_a_datasets_ground_truth(dashboard: Dashboard, tiny_data: Path) -> None:
    """A round's pseudo-labels (the labeled split's boxes, with agreements) over stored images: lowest
    agreement first, a class filter, thumbnails with labels drawn, an enlarged view listing the labels;
    and the same grid over an uploaded dataset's ground truth."""
    coco = json.loads((tiny_data / "labeled.json").read_text())
    for number, annotation in enumerate(coco["annotations"]):
        annotation["agreement"] = round(1.0 - (number % 7) / 10, 2)
    with transaction(dashboard.sessions) as session:
        job = Job(type="pipeline", state="succeeded", stage="decide", plan=["pseudo_label"],
                  spec={"config": {"data": {"unlabeled_images": "browse/images"}}})  # fmt: skip
        session.add(job)
        session.flush()
        job_id = job.id
    shutil.copytree(tiny_data / "images", dashboard.storage / "browse" / "images")
    round_dir = dashboard.storage / "jobs" / str(job_id) / "round_1"
    round_dir.mkdir(parents=True)
    (round_dir / "pseudo.json").write_text(json.dumps(coco))
    client = dashboard.signed_in("read")
    page = client.get(f"/ui/jobs/{job_id}/pseudo", params={"round": 1, "sort": "agreement"})
    assert page.status_code == 200, page.text
    shown = [int(i) for i in re.findall(r'data-image="(\d+)"', page.text)]
    lowest = {im["id"]: min((a["agreement"] for a in coco["annotations"] if a["image_id"] == im["id"]),
                            default=None) for im in coco["images"]}  # fmt: skip
    ranked = sorted(lowest, key=lambda i: (lowest[i] is None, lowest[i] or 0.0))
    assert shown == ranked[: len(shown)] and len(shown) == min(24, len(ranked))
    first = client.get(f"/ui/jobs/{job_id}/pseudo/1/{shown[0]}.png", params={"max": 128})
    assert first.status_code == 200 and max(Image.open(io.BytesIO(first.content)).size) <= 128
    one = client.get(f"/ui/jobs/{job_id}/pseudo/1/{shown[0]}")
    count = sum(a["image_id"] == shown[0] for a in coco["annotations"])
    assert one.status_code == 200 and one.text.count("<tr><td>") == max(count, 0) + (count == 0)
    category = coco["categories"][-1]["id"]
    only = client.get(f"/ui/jobs/{job_id}/pseudo", params={"round": 1, "category": category})
    with_class = {a["image_id"] for a in coco["annotations"] if a["category_id"] == category}
    assert {int(i) for i in re.findall(r'data-image="(\d+)"', only.text)} <= with_class

    bearer = {"Authorization": f"Bearer {dashboard.tokens['write']}"}
    writer = httpx.Client(base_url=dashboard.base, headers=bearer, timeout=60)
    dashboard.clients.append(writer)
    dataset_id = make_dataset(writer, tiny_data, "labeled", "labeled")
    page = client.get(f"/ui/datasets/{dataset_id}")
    assert page.status_code == 200 and 'id="per-class"' in page.text
    image_id = int(re.search(r'data-image="(\d+)"', page.text).group(1))
    drawn = client.get(f"/ui/datasets/{dataset_id}/images/{image_id}.png")
    assert drawn.status_code == 200 and drawn.content.startswith(b"\x89PNG")


# last: its rate-limit check locks 127.0.0.1 out of signing in for a while
def test_sign_in_cookie_flags_sign_out_revocation_rate_limit_and_next(dashboard: Dashboard) -> None:
    client = dashboard.client()
    form = client.get("/ui/login", params={"next": "//evil.example/x"})
    answer = client.post("/ui/login", data={"token": dashboard.tokens["read"], "csrf": _csrf(form.text),
                                            "next": "//evil.example/x"})  # fmt: skip
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("distill_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    page = client.get("/ui/jobs")
    assert page.status_code == 200
    assert client.post("/ui/logout", data={"csrf": _csrf(page.text)}).status_code == 303
    assert client.get("/ui/jobs").status_code == 303  # signed out

    no_cookie = dashboard.client()
    refused = no_cookie.post("/ui/login", data={"token": dashboard.tokens["read"], "csrf": "guess"})
    assert refused.status_code == 403  # the login form's own token is missing

    with transaction(dashboard.sessions) as session:
        doomed = auth.create_token(session, scope="write")
    dashboard.tokens["doomed"] = doomed
    victim = dashboard.signed_in("doomed")
    assert victim.get("/ui/jobs").status_code == 200
    with transaction(dashboard.sessions) as session:
        assert auth.revoke(session, auth.authenticate(session, doomed).id)
    assert victim.get("/ui/jobs").status_code == 303  # a revoked token ends its sessions

    guesser = dashboard.client()
    codes = []
    for _ in range(11):
        form = guesser.get("/ui/login")
        codes.append(
            guesser.post("/ui/login", data={"token": "dst_wrong", "csrf": _csrf(form.text)}).status_code
        )
    assert codes[:10] == [401] * 10 and codes[10] == 429
