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

import pytest
from browser_helpers import (ROOT, browser, click, needs_browser, open_accordion, panel_state,  # noqa: F401 - fixture
                             screenshot, type_into, wait_for)

pytestmark = [needs_browser]


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
