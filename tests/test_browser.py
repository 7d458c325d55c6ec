"""One real-browser test: headless Chromium (Debian's chromium + chromedriver, driven by selenium) opens the
demo, runs an example, checks that every panel renders, and takes a screenshot (into the test's tmp dir, or to the
path in ``$FREQMEDCLIP_SCREENSHOT``, e.g. ``assets/screenshot.png`` when refreshing the README's picture, which is
then taken of the shipped ensemble)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from _demo_support import decisive_model, write_nifti
from PIL import Image

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
                ".ci/run installs them with apt-get", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements.txt)")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import app  # noqa: E402
from freqmedclip.demo.session import DemoSession, find_domain_reference, load_session  # noqa: E402
from freqmedclip.inference.predictor import Predictor  # noqa: E402
from freqmedclip.modeling.backbone import load_clip_backbone  # noqa: E402

SCREENSHOT_TARGET = os.environ.get("FREQMEDCLIP_SCREENSHOT")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1600,1300")


@pytest.fixture(scope="module")
def shipped_backbone():
    return load_clip_backbone("local-dir:assets/backbones/mini-clip")


@pytest.fixture(scope="module")
def session(shipped_backbone) -> DemoSession:
    """The shipped ensemble when refreshing the README's screenshot, else two small random models on the shipped
    backbone (so the shipped domain reference applies to them)."""
    if SCREENSHOT_TARGET:
        return load_session()
    return DemoSession(Predictor([decisive_model(shipped_backbone, seed) for seed in (0, 1)]),
                       domain_reference=find_domain_reference(shipped_backbone.weights_sha256))


@pytest.fixture(scope="module")
def url(session):
    demo = app.build_demo(session)
    demo.queue(default_concurrency_limit=2)
    _, address, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                                allowed_paths=[str(app.EXAMPLES_DIR)])
    yield address
    demo.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _shown(driver, selector: str) -> list:
    """Displayed elements matching a CSS selector whose images (if any) have really loaded."""
    found = [e for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]
    return [e for e in found if e.tag_name != "img" or (e.get_property("naturalWidth") or 0) > 0]


def _wait_for(driver, selector: str, count: int = 1, timeout: float = 90.0) -> list:
    def ready(d):
        errors = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".toast-body") if e.text.strip()]
        assert not errors, f"the app showed an error: {errors}"
        return len(_shown(d, selector)) >= count
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(ready, f"{count} x {selector} never rendered")
    return _shown(driver, selector)


def _tab(driver, name: str) -> None:
    buttons = [b for b in driver.find_elements(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']")
               if b.is_displayed()]
    buttons[0].click()


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _segment(driver) -> None:
    driver.execute_script("window.scrollTo(0, 0);")
    driver.find_element(By.ID, "segment-button").click()


def test_page_runs_an_example_and_every_panel_renders(url, session, browser, tmp_path, shipped_backbone):
    start = time.perf_counter()
    browser.get(url)
    thumbnails = _wait_for(browser, "#examples img", count=3)              # the examples, with thumbnails, on top
    assert thumbnails[0].location["y"] < 400
    assert "Trained on" in _text(browser, "training-data") or "not recorded" in _text(browser, "training-data")
    thumbnails[0].click()                                                  # brain_whole_tumour.png
    preview = _wait_for(browser, "#input-preview img")[0]
    assert "PNG 224x224" in browser.find_element(By.ID, "input-info").text
    assert not _shown(browser, "#ct-window") and not _shown(browser, "#nifti-axis")   # no CT window for a PNG
    prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    prompt.clear()
    prompt.send_keys("brain tumour")                                       # not in the example's workbench list
    _segment(browser)

    for selector in ("#fused-mask img", "#probability img", "#uncertainty img"):
        _wait_for(browser, selector)
    verdict = browser.find_element(By.ID, "verdict").text
    assert verdict.startswith(("Found", "No target found")) and f"{session.n_members} checkpoints" in verdict
    _wait_for(browser, "#exports a")
    assert "_mask-" in browser.find_element(By.ID, "exports").text                  # the PNG mask to download
    assert "total" in browser.find_element(By.ID, "timing").text
    screenshot = Path(SCREENSHOT_TARGET) if SCREENSHOT_TARGET else tmp_path / "screenshot.png"
    tmp = screenshot.with_name(f".{screenshot.name}.{os.getpid()}.png")
    browser.save_screenshot(str(tmp))
    shutil.move(tmp, screenshot)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    _tab(browser, "Explanations")
    for selector in ("#cam-semantic img", "#cam-frequency img", "#branch-semantic img", "#branch-frequency img",
                     *(f"#band-{band} img" for band in ("LL", "LH", "HL", "HH"))):
        _wait_for(browser, selector)
    page = browser.find_element(By.TAG_NAME, "body").text
    for note in ("Grad-CAM on S1", "Grad-CAM on F3", "Eq. 18", "LL the local mean"):       # panel captions
        assert note in page, note
    found = verdict.startswith("Found")
    assert ("logit per token" if found else "Nothing to explain") in _text(browser, "cam-semantic-note")

    _tab(browser, "Prompt workbench")
    _wait_for(browser, "#bench-masks img", count=6)                       # the main prompt, 4 prompts, the control
    assert "Text reliance" in _wait_for(browser, "#reliance")[0].text
    _wait_for(browser, "#iou table")
    WebDriverWait(browser, 30).until(lambda d: "#1 brain tumour" in _text(d, "iou"))   # the typed main prompt
    assert "control: a purple elephant" in _text(browser, "iou")
    assert "mean p in mask" in _wait_for(browser, "#stats table")[0].text

    _tab(browser, "FFBI explorer")
    ActionChains(browser).move_to_element_with_offset(preview, 30, -40).click().perform()
    WebDriverWait(browser, 90).until(lambda d: "Token (row" in d.find_element(By.ID, "ffbi-caption").text)
    assert len(_wait_for(browser, "#ffbi-to-frequency img")) == len(_wait_for(browser, "#ffbi-to-semantic img")) == 1
    assert _text(browser, "ffbi-caption").count("max ratio") == 2 and "uniform" in _text(browser, "ffbi-note")

    # an empty prediction: the explanations say so and draw no heat map (a model that never finds anything)
    predictor = session.predictor
    session.predictor = Predictor([decisive_model(shipped_backbone, empty=True)])
    try:
        _tab(browser, "Segmentation")                                      # (hidden text reads as "")
        _segment(browser)
        WebDriverWait(browser, 90).until(lambda d: "No target found" in _text(d, "verdict"))
        _tab(browser, "Explanations")
        WebDriverWait(browser, 30).until(lambda d: "Nothing to explain" in _text(d, "cam-semantic-note"))
        assert "Nothing to explain" in _text(browser, "cam-frequency-note")
    finally:
        session.predictor = predictor

    # pure noise: the out-of-distribution warning beside the verdict
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(noise)
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Clear']").click()
    WebDriverWait(browser, 30).until(lambda d: not _text(d, "input-info").strip())
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(noise))
    WebDriverWait(browser, 90).until(lambda d: "PNG 224x224" in _text(d, "input-info"))
    _tab(browser, "Segmentation")
    WebDriverWait(browser, 30).until(lambda d: not _shown(d, "#fused-mask img"))         # old results cleared
    assert not _text(browser, "verdict").strip() and _shown(browser, "#verdict")
    _segment(browser)
    WebDriverWait(browser, 90).until(lambda d: "Outside the training data" in _text(d, "domain-warning"))

    # a NIfTI upload replaces the example: the slice slider appears at the middle slice
    volume = write_nifti(tmp_path / "volume.nii.gz", np.random.default_rng(0).normal(size=(64, 48, 9)).astype("f4"))
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Clear']").click()
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(volume))
    WebDriverWait(browser, 90).until(lambda d: "NIFTI 48x64" in d.find_element(By.ID, "input-info").text)
    assert "slice 5/9" in browser.find_element(By.ID, "input-info").text
    assert not _text(browser, "verdict").strip() and not _text(browser, "domain-warning").strip()   # cleared
    assert _shown(browser, "#nifti-axis") and not _shown(browser, "#ct-window")   # an MRI-like volume: axis only
    assert time.perf_counter() - start < 360
