"""A real Chromium for the browser tests: Debian's ``chromium`` + ``chromium-driver`` driven by Selenium
(skipped where they are not installed), and screenshots of each page written to ``runs/screenshots/`` —
each after checking the page's accessibility basics: every control labelled, every table with headers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "screenshots"

# controls a screen reader could not name: no <label>, no aria-label, and (buttons) no text
UNLABELLED = """
return Array.from(document.querySelectorAll('input, select, textarea, button')).filter(el => {
  if (el.type === 'hidden' || (el.labels && el.labels.length) || el.getAttribute('aria-label')) return false;
  const text = el.tagName === 'BUTTON' ? el.textContent : (el.type === 'submit' ? el.value : '');
  return !(text || '').trim();
}).map(el => el.outerHTML.slice(0, 160));
"""
HEADERLESS_TABLES = (
    "return Array.from(document.querySelectorAll('table')).filter(t => !t.querySelector('th')).length"
)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()  # stops chromedriver and the browser it started


def shot(browser, name: str) -> Path:
    """A screenshot of the whole page (not only the window) as a test artifact, once the page is found to
    label its controls and head its tables."""
    unlabelled = browser.execute_script(UNLABELLED)
    assert not unlabelled, f"{name}: controls without a label: {unlabelled}"
    assert browser.execute_script(HEADERLESS_TABLES) == 0, f"{name}: a table without header cells"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, max(1000, min(int(height), 6000)))
    path = SCREENSHOTS / f"{name}.png"
    browser.save_screenshot(str(path))
    browser.set_window_size(1280, 1000)
    return path
