"""Headless chromium (Debian's chromium + chromedriver, driven by Selenium) and the few page actions the
browser tests share: wait with a screenshot on failure, type into a gradio field, read a panel's data-*
attributes. Screenshots go to test-artifacts/."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
needs_browser = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason=NO_BROWSER)


@contextlib.contextmanager
def headless_chromium(height: int = 2000, page_load_timeout: float = 60) -> Iterator:
    """A Selenium driver over headless chromium (skips the test without selenium); quits on leaving."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(NO_BROWSER)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size=1400,{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser():
    with headless_chromium() as driver:
        yield driver


def wait_for(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception as error:
        shot = f"sdcustom-failed-{int(time.time())}.png"
        screenshot(driver, shot)
        raise AssertionError(f"timed out waiting for {what} (screenshot: {shot})") from error


def field(driver, elem_id: str):
    """The text or number input of a component; waits, as newer gradio renders an accordion's content on opening."""
    from selenium.webdriver.common.by import By

    selector = f"#{elem_id} textarea, #{elem_id} input"
    return wait_for(driver, lambda d: (d.find_elements(By.CSS_SELECTOR, selector) or [None])[0], 20, f"the field {elem_id}")


def type_into(driver, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element = field(driver, elem_id)
    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)
    element.send_keys(Keys.TAB)


def open_accordion(driver, title: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//*[contains(@class,'label-wrap')][.//*[normalize-space()='{title}']]").click()


def panel_state(driver, elem_id: str) -> dict:
    """data-* attributes of the first element carrying data-state inside the component `elem_id`."""
    return driver.execute_script(
        "const root = document.getElementById(arguments[0]);"
        "const node = root && root.querySelector('[data-state]');"
        "return node ? Object.assign({}, node.dataset, {text: node.textContent}) : {};", elem_id)


def screenshot(driver, name: str) -> Path:
    driver.execute_script("window.scrollTo(0, 0)")
    path = ARTIFACTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def click(driver, elem_id: str) -> None:
    driver.execute_script("document.getElementById(arguments[0]).click()", elem_id)
