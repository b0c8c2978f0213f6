"""The tab as a page in a real headless browser (Debian chromium + chromedriver, driven by Selenium) through
the standalone server: fill a tiny dataset folder, Train, watch progress advance, see the result panel name
the new file; then cancel a second run and see a clean cancellation. Screenshots go to test-artifacts/.

Skipped (with the reason) where chromium, chromedriver, selenium or gradio are missing; CI installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def server(tmp_path, tiny_checkpoint, image_folder):
    pytest.importorskip("gradio")
    from http_helpers import free_port

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    for item in tiny_checkpoint.parent.glob("tiny*"):
        (shutil.copytree if item.is_dir() else shutil.copyfile)(item, models / "Stable-diffusion" / item.name)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    # the page reads images only inside the models folder and the --data-root folders
    process = subprocess.Popen([sys.executable, "-m", "lib_sdcustom.ui", "--models-dir", str(models), "--port", str(port),
                                "--data-root", str(image_folder)],
                               cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if "SD Customize is ready at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(120):
            pytest.fail("the standalone server did not start:\n" + "".join(lines[-30:]))
        yield f"http://127.0.0.1:{port}/", models, image_folder, lines
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


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


def screenshot(driver, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def click(driver, elem_id: str) -> None:
    driver.execute_script("document.getElementById(arguments[0]).click()", elem_id)


def train_and_watch(driver, name: str, steps: int) -> list[int]:
    """Start a run; return the running steps seen, once one beyond 0 has been seen."""
    type_into(driver, "sdcustom_name", name)
    type_into(driver, "sdcustom_opt_training_steps", str(steps))
    click(driver, "sdcustom_train")
    seen: list[int] = []

    def advanced(d) -> bool:
        state = panel_state(d, "sdcustom_progress")
        if state.get("state") == "running" and state.get("step", "0") != "0" and state.get("text", "").find(name) >= 0:
            seen.append(int(state["step"]))
        return len(set(seen)) >= 2 or (seen and panel_state(d, "sdcustom_result").get("state") == "finished")

    wait_for(driver, advanced, 120, f"progress of {name} to advance")
    return seen


def test_train_then_cancel_in_a_real_browser(server, browser):
    url, models, images, log = server
    browser.get(url)
    wait_for(browser, lambda d: d.execute_script("return !!document.getElementById('sdcustom_folder')"), 60, "the tab")

    type_into(browser, "sdcustom_folder", str(images))
    click(browser, "sdcustom_check")
    wait_for(browser, lambda d: "4</b> images" in d.find_element("id", "sdcustom_dataset").get_attribute("innerHTML"),
             60, "the dataset summary")
    type_into(browser, "sdcustom_token", "sks")
    open_accordion(browser, "Images and captions")
    for name, value in (("data_resolution", 64), ("data_min_bucket", 64), ("data_max_bucket", 128)):
        type_into(browser, f"sdcustom_opt_{name}", str(value))
    open_accordion(browser, "Images and captions")  # closed again: a shorter page for the screenshots
    open_accordion(browser, "Training")
    for name, value in (("training_sample_steps", 2), ("training_save_state_every", 0)):
        type_into(browser, f"sdcustom_opt_{name}", str(value))

    seen = train_and_watch(browser, "browser_lora", 120)
    assert seen and all(0 < step <= 120 for step in seen)
    result = wait_for(browser, lambda d: panel_state(d, "sdcustom_result").get("state") == "finished"
                      and panel_state(d, "sdcustom_result"), 180, "the result panel")
    target = models.resolve() / "Lora" / "browser_lora.safetensors"
    assert result["file"] == str(target) and target.is_file()
    assert "<lora:browser_lora:0.8>" in result["text"]
    wait_for(browser, lambda d: "<polyline" in d.find_element("id", "sdcustom_chart").get_attribute("innerHTML"),
             30, "the loss chart")
    wait_for(browser, lambda d: panel_state(d, "sdcustom_progress").get("state") == "finished", 30, "the progress panel")
    screenshot(browser, "sdcustom-tab-finished.png")

    train_and_watch(browser, "browser_cancel", 5000)
    click(browser, "sdcustom_cancel")
    cancelled = wait_for(browser, lambda d: panel_state(d, "sdcustom_result").get("state") == "cancelled"
                         and panel_state(d, "sdcustom_result"), 120, "the cancellation")
    assert "cancelled at step" in cancelled["text"]
    wait_for(browser, lambda d: panel_state(d, "sdcustom_progress").get("state") == "cancelled", 30, "the progress panel")
    assert not (models / "Lora" / "browser_cancel.safetensors").exists()
    screenshot(browser, "sdcustom-tab-cancelled.png")
    assert not [line for line in log if "Traceback" in line], "".join(log[-40:])
