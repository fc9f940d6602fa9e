"""The dashboard in a real Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium; skipped
where they are not installed): sign in through the form with the keyboard only, watch a job's progress bar
reach 100 % without the page reloading (the ledger advances underneath), and see the schedule form validate a
cron as it is typed. Screenshots of each page go to ``runs/screenshots/``, each page's controls labelled."""

from __future__ import annotations

from service.db import transaction
from service.models import Job
from tests.ui.conftest import shot
from tests.ui.test_pages import Dashboard, dashboard  # noqa: F401 (a fixture)


def test_sign_in_watch_progress_live_and_validate_a_cron(browser, dashboard: Dashboard) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(f"{dashboard.base}/ui/jobs")
    assert "/ui/login" in browser.current_url
    shot(browser, "login")
    wait.until(lambda b: b.find_elements(By.ID, "token"))
    focused = browser.switch_to.active_element  # signing in needs only the keyboard: type, then Enter
    assert focused.get_attribute("id") == "token"
    focused.send_keys(dashboard.tokens["write"], Keys.ENTER)
    table = wait.until(lambda b: b.current_url.endswith("/ui/jobs") and b.find_elements(By.ID, "jobs"))
    assert "No jobs yet" in table[0].text
    shot(browser, "jobs-empty")

    with transaction(dashboard.sessions) as session:
        job = Job(type="train", state="running", stage="train", plan=["train"], progress_total=10)
        session.add(job)
        session.flush()
        job_id = job.id
    browser.get(f"{dashboard.base}/ui/jobs/{job_id}")
    browser.execute_script("window.notReloaded = true")
    assert float(browser.find_element(By.ID, "job-progress").get_attribute("value")) == 0
    with transaction(dashboard.sessions) as session:
        session.get(Job, job_id).state = "succeeded"
    wait.until(lambda b: float(b.find_element(By.ID, "job-progress").get_attribute("value")) == 100)
    assert browser.find_element(By.ID, "job-state").text == "succeeded"
    assert browser.execute_script("return window.notReloaded === true")  # updated in place
    shot(browser, "job-detail")

    browser.get(f"{dashboard.base}/ui/schedules")
    cron = browser.find_element(By.ID, "s-cron")
    cron.send_keys("61 * * * *")
    error = wait.until(lambda b: b.find_elements(By.ID, "cron-error"))
    assert "is not a cron expression" in error[0].text
    cron.clear()
    cron.send_keys("0 3 * * *")
    runs = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#next-runs li"))
    assert len(runs) == 5 and all("03:00:00" in r.text for r in runs)
    shot(browser, "schedules")
