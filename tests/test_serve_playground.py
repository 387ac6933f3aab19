"""The playground page in a real headless browser (Debian's chromium + chromedriver via selenium).

Loads the page from a live server, checks the browser console stays clean, moves a steer's
slider with the keyboard, presses Generate, and waits for the unsteered and steered
continuations (which must differ) and the token-level explanation. Saves docs/playground.png.

The model is a tiny random one by default (fast); set STEERPORT_PLAYGROUND_MODEL=smollm2-135m to
drive the real catalog model with the shipped steers (how docs/playground.png was made).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from steerport.serve.app import ServerState
from steerport.serve.limits import Limits
from steerport.serve.live import live_server
from steerport.steer import Steer
from tests.serve_fixtures import tiny_steers
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("STEERPORT_PLAYGROUND_MODEL", "tiny")


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("the playground test needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def server(catalog_model):
    if MODEL == "tiny":
        lm = tiny_model("llama")
        all_steers = tiny_steers(lm)
        steers = {"pos": all_steers["pos"], "love": all_steers["love"]}
        slider, prompt, value = "pos", "The movie was", 3.0
    else:
        lm = catalog_model(MODEL)
        d = ROOT / "benchmarks" / "steers"
        steers = {"positive": Steer.load(d / "smollm2-135m-sst2-positive.st"),
                  "detox": Steer.load(d / "smollm2-135m-paradetox-nontoxic.st")}
        slider, prompt, value = "positive", "The weather this weekend", 2.0  # inside the fluent range
    state = ServerState.build(lm, steers, model_name=MODEL, limits=Limits(window_ms=50))
    state.engine.call(lambda: None, background=True).result(timeout=600)  # after the keyword jobs
    with live_server(state) as url:
        yield url, slider, prompt, value


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _browser_paths()
    profile = tempfile.mkdtemp(prefix="steerport-chromium-")
    opts = Options()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_playground_generates_steered_and_unsteered(server, browser, tmp_path):
    url, slider_name, prompt, value = server
    browser.get(url + "/")
    wait = WebDriverWait(browser, 120)
    slider = wait.until(EC.presence_of_element_located((By.ID, f"steer-{slider_name}")))
    assert browser.title == "steerport playground"
    assert "positive" in browser.find_element(By.ID, "steers").text  # what the sign means
    wait.until(lambda d: "raises:" in d.find_element(By.ID, "steers").text)  # LM-Steer keywords shown
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    slider.click()
    for _ in range(round(value / 0.5)):  # move the slider up with the keyboard, as a user would (step 0.5)
        slider.send_keys(Keys.ARROW_RIGHT)
    assert float(slider.get_attribute("value")) == value
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("24")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
    plain = browser.find_element(By.CSS_SELECTOR, "#plain .gen").text
    steered = browser.find_element(By.CSS_SELECTOR, "#steered .gen").text
    assert plain.strip() and steered.strip()
    assert plain != steered
    explained = browser.find_element(By.ID, f"explain-{slider_name}")
    assert explained.find_elements(By.CSS_SELECTOR, "span.tok")
    assert _severe(browser) == []
    # the README's picture comes from the real model; the tiny model's screenshot stays in the test's folder
    shot = ROOT / "docs" / "playground.png" if MODEL != "tiny" else tmp_path / "playground.png"
    shot.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
