"""The app in a real (headless) Chromium: upload an X-ray, see it as the model sees it (DICOM too) before submitting,
read the three labels, see the overlay, click a shipped example, survive a bad file (whose name is markup, shown as
text), and see the warning above the labels when the upload is not a chest X-ray.

Skips where Chromium or chromedriver is absent (Debian: apt-get install chromium chromium-driver).
Set SCREENSHOT_DIR to keep the screenshots of the page with a result (an upload; an example clicked).
"""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from benchmarks.common import free_port
from hf_data import DISPLAY_NAMES
from inputs import MARKUP_DICOM, dicom_bytes

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real Chromium driving a served app

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
LABELS = set(DISPLAY_NAMES.values())
TIMEOUT = 60  # seconds; generous, so a busy machine is not mistaken for a broken page


@pytest.fixture(scope="module")
def page_url(tiny_model_dir):
    """The app as `main()` launches it, with its default (shipped) examples, on a free loopback port."""
    args = app.parse_args(["--model", str(tiny_model_dir), "--port", str(free_port())])
    demo = app.build_demo(args.model, args.examples)
    demo.launch(**app.launch_options(args), prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("selenium")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium or chromedriver not installed (/usr/bin/chromium, /usr/bin/chromedriver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,1300",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, TIMEOUT).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "#xray-file input[type=file]")
    )


def upload_and_submit(browser, path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "#xray-file input[type=file]").send_keys(str(path))
    # stem and suffix are shown apart
    WebDriverWait(browser, TIMEOUT).until(lambda driver: path.stem in driver.find_element(By.ID, "xray-file").text)
    click_button(browser, "Submit")


def click_button(browser, text: str):
    """The one button with this text (gradio gives the Interface's buttons no stable id)."""
    from selenium.webdriver.common.by import By

    [button] = [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == text]
    button.click()


def label_names(browser) -> set[str]:
    from selenium.webdriver.common.by import By

    return {element.text for element in browser.find_elements(By.CSS_SELECTOR, "#prediction dt") if element.text}


def wait_for_result(browser) -> set[str]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, TIMEOUT).until(lambda driver: len(label_names(driver)) == 3)
    return label_names(browser)


def warning_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "xray-warning").text


def overlay_loaded(browser) -> bool:
    from selenium.webdriver.common.by import By

    images = browser.find_elements(By.CSS_SELECTOR, "#saliency img")
    return any(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) for image in images
    )


def clear(browser):
    from selenium.webdriver.support.ui import WebDriverWait

    click_button(browser, "Clear")
    WebDriverWait(browser, TIMEOUT).until(lambda driver: not label_names(driver))


def test_upload_shows_three_labels_and_the_overlay(browser, page_url, tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from transformers import pipeline

    from cxr.predictor import classify, load_classifier

    xray = tmp_path / "child-chest.png"
    y, x = np.mgrid[0:480, 0:600]
    Image.fromarray(((np.sin(x / 17.0) + np.cos(y / 11.0) + 2) * 60).astype(np.uint8), "L").save(xray)

    open_page(browser, page_url)
    assert "not a medical device" in browser.page_source
    upload_and_submit(browser, xray)
    assert wait_for_result(browser) == LABELS
    WebDriverWait(browser, TIMEOUT).until(overlay_loaded)

    # The page's bars carry the exact probabilities: the same as Python's pipeline() gives for the same file.
    shown = {
        meter.get_attribute("aria-label"): float(meter.get_attribute("value"))
        for meter in browser.find_elements(By.CSS_SELECTOR, "#prediction meter")
    }
    expected = {
        item["label"]: item["score"]
        for item in pipeline("image-classification", model=str(tiny_model_dir))(str(xray), top_k=3)
    }
    assert shown == pytest.approx(expected, abs=1e-5)
    # The warning is there exactly when the project's predictor flags the file (this one is no real X-ray, the tiny
    # model has only seen synthetic ones, so either can happen).
    [prediction] = classify(load_classifier(tiny_model_dir), [xray])
    assert ("does not look like a pediatric chest X-ray" in warning_text(browser)) == (
        prediction.looks_like_chest_xray is False
    )
    # The bars are headed by the model's 95% prediction set.
    assert prediction.prediction_set_line.startswith("95% set: ")
    assert prediction.prediction_set_line in browser.find_element(By.ID, "prediction").text

    screenshot_dir = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot_dir / "app_result.png"))


def test_a_bad_file_shows_our_message_and_the_next_upload_works(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not an X-ray\n" * 20)
    open_page(browser, page_url)
    upload_and_submit(browser, bad)
    WebDriverWait(browser, TIMEOUT).until(
        lambda driver: driver.find_elements(By.XPATH, "//*[contains(text(), 'is not an image')]")
    )
    assert not label_names(browser)

    clear(browser)
    good = tmp_path / "after.png"
    y, x = np.mgrid[0:200, 0:200]
    Image.fromarray((x + y).astype(np.uint8), "L").save(good)
    upload_and_submit(browser, good)
    assert wait_for_result(browser) == LABELS


def test_a_photo_gets_the_warning_above_the_labels_and_the_check_says_why(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "holiday-photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    open_page(browser, page_url)
    upload_and_submit(browser, photo)
    assert wait_for_result(browser) == LABELS  # the bars stay, under the warning
    WebDriverWait(browser, TIMEOUT).until(
        lambda driver: "does not look like a pediatric chest X-ray" in warning_text(driver)
    )
    warning, labels = browser.find_element(By.ID, "xray-warning"), browser.find_element(By.ID, "prediction")
    assert warning.location["y"] < labels.location["y"]
    check = browser.find_element(By.ID, "xray-check").text
    assert "looks_like_chest_xray" in check and "false" in check and "ood_score" in check


def preview_width(browser) -> int:
    """The natural width of the image shown in the preview ("what the model sees"), 0 while there is none."""
    from selenium.webdriver.common.by import By

    images = browser.find_elements(By.CSS_SELECTOR, "#xray-preview img")
    return max(
        [
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) or 0
            for image in images
        ],
        default=0,
    )


def test_a_dicom_upload_shows_what_the_model_sees_before_submitting(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    y, x = np.mgrid[0:160, 0:200]
    scan = tmp_path / "scan.dcm"
    # 12-bit values, no browser shows this file
    scan.write_bytes(dicom_bytes(((x * 13 + y * 7) % 4096).astype(np.uint16)))
    open_page(browser, page_url)
    assert preview_width(browser) == 0
    browser.find_element(By.CSS_SELECTOR, "#xray-file input[type=file]").send_keys(str(scan))
    # decoded by our loader, before any Submit
    WebDriverWait(browser, TIMEOUT).until(lambda driver: preview_width(driver) == 200)
    assert not label_names(browser)
    click_button(browser, "Submit")
    assert wait_for_result(browser) == LABELS


def test_a_shipped_example_is_a_thumbnail_that_runs_when_clicked(browser, page_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, page_url)
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "button.gallery-item img")
    assert len(thumbnails) == 3
    WebDriverWait(browser, TIMEOUT).until(
        lambda driver: all(driver.execute_script("return arguments[0].naturalWidth", t) for t in thumbnails)
    )
    thumbnails[0].click()
    # the example, shown as the model gets it
    WebDriverWait(browser, TIMEOUT).until(lambda driver: preview_width(driver) == 1024)
    click_button(browser, "Submit")
    assert wait_for_result(browser) == LABELS
    WebDriverWait(browser, TIMEOUT).until(overlay_loaded)
    screenshot_dir = Path(os.environ.get("SCREENSHOT_DIR") or "/nonexistent")
    if os.environ.get("SCREENSHOT_DIR"):
        screenshot_dir.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(screenshot_dir / "app_example_clicked.png"))


def test_markup_in_a_decoder_message_is_shown_as_text_not_rendered(browser, page_url, tmp_path):
    """Gradio renders error messages as HTML; ours quote what the decoder says about the file (here a DICOM's
    Photometric Interpretation, written as tags), which must stay text. (Gradio strips '<' and '>' from uploaded
    file names itself.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "scan.dcm"
    bad.write_bytes(dicom_bytes(np.zeros((160, 200), np.uint16), photometric=MARKUP_DICOM))
    open_page(browser, page_url)
    browser.find_element(By.CSS_SELECTOR, "#xray-file input[type=file]").send_keys(str(bad))
    toast = '[data-testid="toast-text"]'
    WebDriverWait(browser, TIMEOUT).until(
        lambda driver: any("scan.dcm" in e.text for e in driver.find_elements(By.CSS_SELECTOR, toast))
    )
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, toast)]
    # the loader turns markup characters into '?'
    assert any("MONO" in text and "<" not in text for text in texts), texts
    assert not browser.find_elements(By.CSS_SELECTOR, f"{toast} img, {toast} b")
