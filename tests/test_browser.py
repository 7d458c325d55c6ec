"""One real-browser test: headless Chromium (Debian's chromium + chromedriver, driven by selenium) opens the
demo, runs the first example (a real brain MRI), checks that every panel renders, switches the model set, and takes
a screenshot (into the test's tmp dir, or to the path in ``$FREQMEDCLIP_SCREENSHOT``, e.g. ``assets/screenshot.png``
when refreshing the README's picture, which is then taken of the shipped real-data ensemble on that real example)."""

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
from freqmedclip.demo.examples import load_examples  # noqa: E402
from freqmedclip.demo.session import (  # noqa: E402
    MODEL_SETS,
    PHANTOM_MODELS,
    REAL_MODELS,
    DemoSession,
    ModelSets,
    find_domain_reference,
    load_session,
    open_model_sets,
)
from freqmedclip.inference.predictor import Predictor  # noqa: E402
from freqmedclip.modeling.backbone import load_clip_backbone  # noqa: E402

SCREENSHOT_TARGET = os.environ.get("FREQMEDCLIP_SCREENSHOT")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1600,1300")
DECISIVE = "Two decisive test models"       # the first set when not refreshing the screenshot


@pytest.fixture(scope="module")
def shipped_backbone():
    return load_clip_backbone("local-dir:assets/backbones/mini-clip-real")


@pytest.fixture(scope="module")
def models(shipped_backbone) -> ModelSets:
    """The shipped sets (opening on the real-data ensemble) when refreshing the README's screenshot, else two small
    random models on the shipped backbone (so the shipped domain reference applies to them) with the shipped
    phantom set as the second choice."""
    if SCREENSHOT_TARGET:
        sets = open_model_sets()
        assert sets.initial == REAL_MODELS, "the README's screenshot shows the real-data ensemble"
        return sets
    decisive = DemoSession(Predictor([decisive_model(shipped_backbone, seed) for seed in (0, 1)]),
                           domain_reference=find_domain_reference(shipped_backbone.weights_sha256,
                                                                  ["brain", "breast", "lung"]))
    return ModelSets({DECISIVE: lambda: decisive,
                      PHANTOM_MODELS: lambda: load_session(search=MODEL_SETS[PHANTOM_MODELS])}, DECISIVE, decisive)


@pytest.fixture(scope="module")
def session(models) -> DemoSession:
    return models.default


@pytest.fixture(scope="module")
def url(models):
    demo = app.build_demo(models)
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


def test_page_runs_an_example_and_every_panel_renders(url, models, session, browser, tmp_path, shipped_backbone):
    start = time.perf_counter()
    browser.get(url)
    examples = load_examples(app.EXAMPLES_DIR)
    thumbnails = _wait_for(browser, "#examples img", count=len(examples))  # the examples, with thumbnails, on top
    assert thumbnails[0].location["y"] < 400
    assert "Trained on" in _text(browser, "training-data") or "not recorded" in _text(browser, "training-data")
    if SCREENSHOT_TARGET:
        assert "real patients from public datasets" in _text(browser, "training-data")
    credits = _text(browser, "example-credits")                            # the real examples' sources, licences
    assert "CC BY-NC-SA 4.0" in credits and "CC BY 3.0" in credits and "Phantom examples" in credits
    assert examples[0].real and examples[0].dataset == "lgg"
    thumbnails[0].click()                                                  # lgg_tumour.png, a real brain MRI
    preview = _wait_for(browser, "#input-preview img")[0]
    assert "PNG 224x224" in browser.find_element(By.ID, "input-info").text
    assert not _shown(browser, "#ct-window") and not _shown(browser, "#nifti-axis")   # no CT window for a PNG
    prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    prompt.clear()
    prompt.send_keys("lower-grade glioma")       # a training phrasing of lgg, not in the example's workbench list
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
    WebDriverWait(browser, 30).until(lambda d: "#1 lower-grade glioma" in _text(d, "iou"))   # the typed main prompt
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

    # the Models selector: the phantom set is one choice away, and the header says what it was trained on. The
    # noise below runs on it: its reference flags noise (the real backbone's does not, tests/test_demo_truth.py)
    other = PHANTOM_MODELS
    assert other in models.names and models.initial != other
    browser.execute_script("window.scrollTo(0, 0);")
    browser.find_element(By.CSS_SELECTOR, "#models input").click()
    WebDriverWait(browser, 30).until(lambda d: _shown(d, f"li[aria-label='{other}']"))
    _shown(browser, f"li[aria-label='{other}']")[0].click()
    WebDriverWait(browser, 120).until(lambda d: "Now serving" in _text(d, "model-status"))
    assert "Not real patients" in _text(browser, "training-data") and "synthetic phantoms" in _text(browser,
                                                                                                  "training-data")
    _tab(browser, "Segmentation")
    WebDriverWait(browser, 30).until(lambda d: not _shown(d, "#fused-mask img"))   # the other set's results cleared
    _segment(browser)                                                      # the same image, the phantom ensemble
    WebDriverWait(browser, 90).until(lambda d: "3 checkpoints" in _text(d, "verdict"))

    # pure noise: the out-of-distribution warning beside the verdict (phantom set)
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

    assert time.perf_counter() - start < 420
