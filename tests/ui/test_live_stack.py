"""The dashboard in a real Chromium over a live stack on the ``tiny`` preset — uvicorn, a Celery worker,
Redis, SQLite, a storage folder: sign in, start a pipeline job from the form and watch its progress bar
reach 100 % without a reload, open its calibration plot and its pseudo-label browser (the drawn thumbnails
load), cancel a second job while it runs, promote a model version and roll it back after a confirmation,
and create a schedule — refused with an invalid cron, then created with its next runs shown. Every page is
screenshotted to ``runs/screenshots/live-*.png``; every process the test starts is stopped by its id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from service import auth
from service.db import transaction
from tests.service.test_api import Api, make_dataset
from tests.service.test_schedule_flow import model_archive
from tests.service.test_workers import Stack, redis_url  # noqa: F401 (a fixture)
from tests.ui.conftest import shot

SETTINGS = {
    "inference": {"views": "1x:flip", "batch_size": 4, "max_detections": 20, "view_score_thresh": 0.0},
    "shard_size": 8,
}


def _loaded(browser, css: str) -> list:
    """The images matching ``css`` once every one has loaded (naturalWidth > 0, i.e. a decoded PNG)."""
    script = (
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;"
    )
    return browser.execute_script(script, css)


@pytest.mark.slow
def test_a_job_started_cancelled_browsed_promoted_and_scheduled_from_the_dashboard(
    browser,
    tmp_path: Path,
    tiny_data: Path,
    trained_tiny_model: Path,
    redis_url: str,  # noqa: F811
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def waiting(timeout: float) -> WebDriverWait:
        """Waits that look again when the live fragment replaced an element between finding and reading."""
        return WebDriverWait(browser, timeout, 0.5, ignored_exceptions=[StaleElementReferenceException])

    stack = Stack(tmp_path, tiny_data, trained_tiny_model, redis_url, lease=120)
    with transaction(stack.sessions) as session:
        writer = auth.create_token(session, scope="write", name="ops")
    api = Api(stack, tmp_path)
    api.start()
    client = httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {writer}"}, timeout=60)
    wait = waiting(60)

    def by_id(name: str):
        return wait.until(lambda b: b.find_elements(By.ID, name))[0]

    def fill_job_form(student_iterations: int) -> None:
        browser.get(f"{api.base}/ui/jobs/new")
        for field, dataset in (("labeled", labeled), ("unlabeled", unlabeled), ("eval", test)):
            Select(by_id(f"f-{field}")).select_by_value(str(dataset))
        Select(by_id("f-teacher")).select_by_value("tiny")
        by_id("f-student-iterations").send_keys(str(student_iterations))
        by_id("f-model-name").send_keys("tiny")
        by_id("f-settings").send_keys(json.dumps(SETTINGS))

    def state() -> str:
        return browser.find_element(By.ID, "job-state").text

    try:
        labeled = make_dataset(client, tiny_data, "labeled", "labeled")
        unlabeled = make_dataset(client, tiny_data, "unlabeled", "unlabeled")
        test = make_dataset(client, tiny_data, "test", "eval")
        uploaded = client.post(
            "/v1/models", data={"name": "tiny"}, files={"archive": model_archive(trained_tiny_model)}
        )
        assert uploaded.status_code == 201 and uploaded.json()["promoted"], uploaded.text

        # sign in
        browser.get(f"{api.base}/ui/jobs")
        assert "/ui/login" in browser.current_url
        by_id("token").send_keys(writer)
        by_id("sign-in").click()
        assert "No jobs yet" in by_id("jobs").text

        # a job from the form: a bad settings JSON is refused with the reason, the good one starts
        fill_job_form(student_iterations=8)
        by_id("f-settings").send_keys("}")
        by_id("start-job").click()
        assert "more settings: not JSON" in by_id("form-errors").text
        assert client.get("/v1/jobs").json()["count"] == 0
        fill_job_form(student_iterations=8)
        shot(browser, "live-job-new")
        by_id("start-job").click()
        wait.until(lambda b: "/ui/jobs/new" not in b.current_url and b.find_elements(By.ID, "job-progress"))
        job_id = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])
        browser.execute_script("window.notReloaded = true")
        progress = []

        def advanced(b) -> bool:
            progress.append(float(b.find_element(By.ID, "job-progress").get_attribute("value")))
            return state() in ("succeeded", "failed", "cancelled")

        waiting(900).until(advanced)
        assert state() == "succeeded", (by_id("job-live").text, stack.log_path.read_text()[-3000:])
        assert progress[-1] == 100 and len(set(progress)) >= 3, progress  # it moved, in steps, to 100
        assert browser.execute_script("return window.notReloaded === true")  # updated in place
        verdict, reason = by_id("decision-1").text.split(": ", 1)
        assert verdict in ("Promoted", "Not promoted")  # the decision and why, AP to 4 places
        assert re.fullmatch(
            r"the student (beat|did not beat) the teacher on bbox/AP: \d\.\d{4} vs \d\.\d{4}", reason
        )
        assert by_id("ap-table-1").find_elements(By.CSS_SELECTOR, "tbody tr")
        wait.until(lambda b: _loaded(b, ".plots img") == 4)  # calibration, scores, classes, agreement
        shot(browser, "live-job-detail")

        # the calibration plot alone, then the pseudo-label browser: drawn thumbnails of the unlabeled images
        plot = by_id("calibration-plot-1").get_attribute("src")
        assert httpx.get(plot, cookies=browser_cookies(browser)).headers["content-type"] == "image/png"
        by_id("browse-round-1").click()
        grid = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image-grid li[data-image]"))
        unlabeled_images = json.loads((tiny_data / "unlabeled.json").read_text())["images"]
        assert len(grid) == min(24, len(unlabeled_images))
        wait.until(lambda b: _loaded(b, "#image-grid img") == len(grid))
        shot(browser, "live-pseudo-browser")
        grid[0].find_element(By.TAG_NAME, "a").click()
        wait.until(lambda b: _loaded(b, "#large-image") == 1)
        shot(browser, "live-pseudo-image")

        # a second job, cancelled while it runs
        fill_job_form(student_iterations=5000)
        by_id("start-job").click()
        wait.until(lambda b: "/ui/jobs/new" not in b.current_url and b.find_elements(By.ID, "job-state"))
        second = int(browser.current_url.rstrip("/").rsplit("/", 1)[1])
        waiting(300).until(lambda b: state() == "running")
        wait.until(lambda b: b.find_element(By.ID, "cancel-job").click() or True)
        waiting(300).until(lambda b: state() == "cancelled")
        assert client.get(f"/v1/jobs/{second}").json()["state"] == "cancelled"
        assert by_id("retry-job")  # a cancelled job can be retried where it stopped
        shot(browser, "live-job-cancelled")
        browser.get(f"{api.base}/ui/jobs")
        states = {j: by_id(f"job-{j}").get_attribute("data-state") for j in (job_id, second)}
        assert states == {job_id: "succeeded", second: "cancelled"}, states
        shot(browser, "live-jobs")

        # promote the version that is not promoted, then roll that promotion back
        browser.get(f"{api.base}/ui/models")
        before = by_id("promoted-tiny").text
        other = {"v1": 2, "v2": 1}[before]
        by_id(f"promote-tiny-{other}").click()
        assert f"Promote tiny v{other}?" in browser.find_element(By.TAG_NAME, "h1").text
        shot(browser, "live-promote-confirm")
        by_id("reason").send_keys("looks better on the browser")
        by_id("confirm").click()
        assert wait.until(lambda b: b.find_element(By.ID, "promoted-tiny").text == f"v{other}")
        assert "looks better on the browser" in by_id("history-tiny").text
        shot(browser, "live-models")
        by_id("rollback-tiny").click()
        by_id("reason").send_keys("undo")
        by_id("confirm").click()
        assert wait.until(lambda b: b.find_element(By.ID, "promoted-tiny").text == before)
        models = client.get("/v1/models").json()["data"]
        promoted = [m for m in models if m["name"] == "tiny" and m["promoted"]]
        assert [f"v{m['version']}" for m in promoted] == [before]

        # a schedule: an invalid cron is refused on submit, a valid one is created with its next runs
        browser.get(f"{api.base}/ui/schedules")

        def fill_schedule(cron: str) -> None:
            by_id("s-name").clear()
            by_id("s-name").send_keys("nightly")
            by_id("s-cron").clear()
            by_id("s-cron").send_keys(cron)
            Select(by_id("s-model")).select_by_value("tiny")
            for field, dataset in (("labeled", labeled), ("unlabeled", unlabeled), ("eval", test)):
                Select(by_id(f"s-{field}")).select_by_value(str(dataset))

        fill_schedule("61 * * * *")
        by_id("create-schedule").click()
        assert "is not a cron expression" in by_id("form-errors").text
        assert client.get("/v1/schedules").json()["count"] == 0
        fill_schedule("30 2 * * 1")
        by_id("create-schedule").click()
        runs = wait.until(
            lambda b: "/ui/schedules/" in b.current_url and b.find_elements(By.CSS_SELECTOR, "#next-runs li")
        )
        assert len(runs) == 5 and all("02:30:00" in r.text for r in runs)
        assert by_id("schedule-state").text == "active"
        shot(browser, "live-schedule")
        by_id("toggle-schedule").click()
        assert wait.until(lambda b: b.find_element(By.ID, "schedule-state").text == "paused")

        # the remaining pages, as screenshots of a populated stack
        for name, path in [("live-datasets", "/ui/datasets"), ("live-dataset", f"/ui/datasets/{labeled}"),
                           ("live-schedules", "/ui/schedules")]:  # fmt: skip
            browser.get(f"{api.base}{path}")
            wait.until(lambda b: b.find_elements(By.TAG_NAME, "h1"))
            if name == "live-dataset":
                wait.until(lambda b: _loaded(b, "#image-grid img") > 0)
            shot(browser, name)
    finally:
        client.close()
        api.close()
        stack.close()


def browser_cookies(browser) -> dict[str, str]:
    return {c["name"]: c["value"] for c in browser.get_cookies()}
