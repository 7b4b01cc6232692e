"""The Gradio app: every kind of upload gets a prediction or a clear message, a non-X-ray gets a warning, and every
way in agrees."""

import copy
import ipaddress
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import app
from benchmarks.common import free_port
from cxr.images import MAX_FILE_BYTES
from cxr.labels import DISPLAY_NAMES
from cxr.predictor import classify, load_classifier
from cxr.run_record import read_metrics
from helpers import validation_images
from inputs import MARKUP_DICOM, MARKUP_NAME, chest_like, dicom_bytes, encode, png_claiming_size

REPO = Path(__file__).resolve().parents[1]
LABELS = set(DISPLAY_NAMES.values())


# ---- inputs, generated in tmp_path ------------------------------------------------------------------


GOOD = {  # file name -> (bytes, (width, height))
    "gray.jpeg": (lambda: encode(Image.fromarray(chest_like(), "L"), "JPEG"), (300, 240)),
    "rgb.jpg": (lambda: encode(Image.fromarray(chest_like(), "L").convert("RGB"), "JPEG"), (300, 240)),
    "gray.png": (lambda: encode(Image.fromarray(chest_like(), "L"), "PNG"), (300, 240)),
    "rgb.png": (lambda: encode(Image.fromarray(chest_like(), "L").convert("RGB"), "PNG"), (300, 240)),
    "sixteen-bit.png": (lambda: encode(Image.fromarray(chest_like().astype(np.uint16) * 16), "PNG"), (300, 240)),
    "rgba.png": (lambda: encode(Image.fromarray(chest_like(), "L").convert("RGBA"), "PNG"), (300, 240)),
    "large-3000px.jpeg": (lambda: encode(Image.fromarray(chest_like(3000, 2400), "L"), "JPEG"), (3000, 2400)),
    "scan.dcm": (lambda: dicom_bytes(chest_like(200, 160).astype(np.uint16) * 16), (200, 160)),
}
BAD = {  # file name -> (bytes, words the message must contain)
    "tiny-10px.png": (lambda: encode(Image.new("L", (10, 10)), "PNG"), "at least"),
    "notes.txt": (lambda: b"this is a text file, not an X-ray\n" * 20, "not an image"),
    "disguised.png": (lambda: b"this is a text file, not an X-ray\n" * 20, "not an image"),
    "truncated.jpeg": (lambda: encode(Image.fromarray(chest_like(), "L"), "JPEG")[:600], "truncated"),
    # under Pillow's own bomb limit
    "bomb.png": (
        lambda: png_claiming_size(6325, 6325),
        "6325 x 6325 px; images over 40 megapixels",
    ),
    "empty.png": (lambda: b"", "empty"),
    "broken.dcm": (lambda: b"\0" * 128 + b"DICM" + b"\x02\x00" * 40, "DICOM"),
}


def write(folder: Path, name: str, table: dict) -> Path:
    path = folder / name
    path.write_bytes(table[name][0]())
    return path


# ---- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_model_dir):
    return load_classifier(tiny_model_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The app as `main()` launches it (same options), on a free loopback port, without blocking."""
    args = app.parse_args(["--model", str(tiny_model_dir), "--port", str(free_port())])
    demo = app.build_demo(args.model, args.examples)
    demo.launch(**app.launch_options(args), prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


# ---- predict, in process ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD)
def test_every_image_kind_gets_three_labels_an_overlay_and_the_xray_check(classifier, tmp_path, name):
    warning, scores, overlay, check = app.answer_upload(classifier, str(write(tmp_path, name, GOOD)))
    assert set(check) == {"looks_like_chest_xray", "ood_score", "threshold", "score", "prediction_sets"}
    assert set(check["prediction_sets"]) == {"90%", "95%"} and set(check["prediction_sets"]["95%"]) <= LABELS
    assert isinstance(check["looks_like_chest_xray"], bool) and check["score"] == "mahalanobis"
    assert check["looks_like_chest_xray"] == (check["ood_score"] <= check["threshold"])
    assert bool(warning) == (not check["looks_like_chest_xray"])  # the warning shows exactly when the check fails
    assert set(scores) == LABELS
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    width, height = GOOD[name][1]
    assert overlay.mode == "RGB" and max(overlay.size) == 512
    assert overlay.width / overlay.height == pytest.approx(width / height, rel=0.01)


@pytest.mark.parametrize("name", BAD)
def test_bad_uploads_raise_a_clear_ui_error(classifier, tmp_path, name):
    with pytest.raises(gr.Error, match=BAD[name][1]) as raised:
        app.answer_upload(classifier, str(write(tmp_path, name, BAD)))
    assert name in raised.value.message  # says which file


def test_a_non_xray_upload_gets_a_warning_above_the_three_labels(classifier, tmp_path):
    noise = tmp_path / "holiday-photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(noise)
    warning, scores, _, check = app.answer_upload(classifier, str(noise))
    assert "does not look like a pediatric chest X-ray" in warning
    assert check["looks_like_chest_xray"] is False and check["ood_score"] > check["threshold"]
    assert f"{check['ood_score']:.4g}" in warning
    assert set(scores) == LABELS  # the bars stay, under the warning


def test_validation_images_mostly_get_no_warning(classifier, tiny_model_dir):
    """The tiny model's own (synthetic) validation images: the threshold was set to accept ACCEPT_RATE (97 %) of
    them."""
    files = validation_images(tiny_model_dir)
    results = [app.answer_upload(classifier, str(path)) for path in files]
    assert all(bool(warning) != check["looks_like_chest_xray"] for warning, _, _, check in results)
    assert sum(check["looks_like_chest_xray"] for _, _, _, check in results) >= 0.8 * len(files)


def shown(demo: gr.Blocks, *inputs) -> dict:
    """What the page receives for an upload: the /predict event's answer to `inputs`, each value as its output
    component hands it to the browser (`postprocess`), by the component's elem_id."""
    [event] = [fn for fn in demo.fns.values() if fn.api_name == "predict"]
    return {
        component.elem_id: component.postprocess(value)
        for component, value in zip(event.outputs, event.fn(*inputs), strict=True)
    }


def bars_heading(demo: gr.Blocks, check: dict) -> str:
    """The heading the page gives the bars once the check arrives (the check's change event)."""
    [event] = [fn for fn in demo.fns.values() if [type(c) for c in fn.inputs] == [gr.JSON]]
    return event.fn(check).label


def test_the_page_shows_the_warning_the_three_probabilities_in_order_the_overlay_and_the_check(
    classifier, tiny_model_dir, tmp_path
):
    demo = app.build_demo(str(tiny_model_dir))
    xray = write(tmp_path, "gray.png", GOOD)
    page = shown(demo, str(xray), None)
    # the three probabilities, most probable first, summing to one, each the model's own: plain `pipeline` on the
    # same file, which shares none of the app's code after the model folder
    expected = {item["label"]: item["score"] for item in classifier(str(xray), top_k=3)}
    bars = page["prediction"]
    assert [bar.label for bar in bars.confidences] == sorted(expected, key=expected.get, reverse=True)
    assert bars.label == bars.confidences[0].label and set(expected) == LABELS
    assert [bar.confidence for bar in bars.confidences] == pytest.approx(
        sorted(expected.values(), reverse=True), abs=1e-5
    )
    assert sum(bar.confidence for bar in bars.confidences) == pytest.approx(1.0, abs=1e-4)
    check = page["xray-check"].root
    assert check["prediction_sets"] == classify(classifier, [str(xray)])[0].prediction_sets
    assert (page["xray-warning"] == "") == check["looks_like_chest_xray"]
    for label in check["prediction_sets"]["95%"]:  # the bars' heading names the 95 % set
        assert label.lower() in bars_heading(demo, check).lower()
    with Image.open(page["saliency"].path) as overlay:
        assert max(overlay.size) == 512 and overlay.width / overlay.height == pytest.approx(300 / 240, rel=0.01)

    noise = tmp_path / "holiday-photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(noise)
    page = shown(demo, str(noise), None)
    assert page["xray-check"].root["looks_like_chest_xray"] is False
    assert (
        page["xray-warning"].startswith("### ") and "does not look like a pediatric chest X-ray" in page["xray-warning"]
    )
    assert {bar.label for bar in page["prediction"].confidences} == LABELS  # the bars stay, under the warning


def test_no_file_is_a_clear_ui_error(classifier):
    with pytest.raises(gr.Error, match="upload a chest X-ray"):
        app.answer_upload(classifier, None)


def test_grad_cam_from_the_prediction_pass_matches_a_full_backward_pass(classifier):
    """The app's one-pass Grad-CAM (gradient taken at the last block's input only) equals the textbook one."""
    from cxr.features import forward_features
    from cxr.saliency import grad_cam, saliency_overlay

    image = Image.fromarray(chest_like(), "L").convert("RGB")
    pixel_values = classifier.image_processor(image, return_tensors="pt")["pixel_values"].repeat(len(LABELS), 1, 1, 1)
    heat = grad_cam(forward_features(classifier.model, pixel_values, saliency=True), list(range(len(LABELS))))
    assert heat.shape == (len(LABELS), 4, 4)  # scratch-tiny: 32 px input, 8 px patches
    model = copy.deepcopy(classifier.model).requires_grad_(True)
    for index in range(len(LABELS)):
        outputs = model(pixel_values=pixel_values[:1], output_hidden_states=True)
        (gradient,) = torch.autograd.grad(outputs.logits[0, index], outputs.hidden_states[-2])
        tokens = outputs.hidden_states[-2][0, 1:].detach()
        cam = torch.relu(tokens @ gradient[0, 1:].mean(dim=0)).reshape(4, 4).numpy()
        expected = cam / cam.max() if cam.max() > 0 else cam
        np.testing.assert_allclose(heat[index], expected, atol=1e-5)
        assert heat[index].min() >= 0 and heat[index].max() in (0.0, 1.0)

    [prediction] = classify(classifier, [image], saliency=True)
    np.testing.assert_allclose(
        prediction.saliency, heat[classifier.model.config.label2id[prediction.top_label]], atol=1e-5
    )
    overlay = saliency_overlay(image, prediction.saliency)
    assert overlay.size == (512, 410) and overlay.mode == "RGB"


def test_predictions_with_grad_cam_in_parallel_threads_match_one_at_a_time(classifier):
    """The app may serve several requests at once (CONCURRENCY_LIMIT): each one's Grad-CAM must be its own."""
    from concurrent.futures import ThreadPoolExecutor

    images = [Image.fromarray(np.roll(chest_like(), 40 * shift, axis=1), "L").convert("RGB") for shift in range(4)]
    alone = [classify(classifier, [image], saliency=True)[0] for image in images]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda index: classify(classifier, [images[index % 4]], saliency=True)[0], range(200)))
    for index, prediction in enumerate(together):
        expected = alone[index % 4]
        assert prediction.scores == pytest.approx(expected.scores, abs=1e-5)
        np.testing.assert_allclose(prediction.saliency, expected.saliency, atol=1e-5)


def test_overlay_tints_only_where_the_evidence_is():
    from cxr.saliency import saliency_overlay

    image = Image.fromarray(chest_like(), "L").convert("RGB")
    heat = np.zeros((4, 4))
    heat[:, 0] = 1.0  # all the evidence in the left quarter
    overlay = np.asarray(saliency_overlay(image, heat, opacity=0.6), dtype=float)
    assert overlay.shape == (410, 512, 3)
    base = np.asarray(image.resize((512, 410), Image.BILINEAR), dtype=float)
    np.testing.assert_array_equal(overlay[:, -200:], base[:, -200:])  # no evidence: the X-ray as it was
    dark_red = np.array([127.5, 0.0, 0.0])  # the jet colour map at its top
    np.testing.assert_allclose(overlay[:, :40], 0.4 * base[:, :40] + 0.6 * dark_red, atol=2)


def test_an_overlay_being_downloaded_is_never_seen_half_written(tmp_path):
    """Identical answers (two users, one X-ray) share one cached file: saving it again must not truncate it
    under a download in progress (Gradio 6.31's own save rewrites it in place: see
    cxr.workarounds.save_pil_to_cache)."""
    import gradio.processing_utils

    from cxr.workarounds import install_gradio_cache_patch, save_pil_to_cache

    install_gradio_cache_patch()  # as app.build_demo does
    assert gradio.processing_utils.save_pil_to_cache is save_pil_to_cache  # what gr.Image outputs call
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8))
    path = Path(save_pil_to_cache(image, str(tmp_path), format="jpeg"))
    size = path.stat().st_size
    stop = threading.Event()

    def answer_again_and_again():
        while not stop.is_set():
            assert save_pil_to_cache(image, str(tmp_path), format="jpeg") == str(path)

    writer = threading.Thread(target=answer_again_and_again)
    writer.start()
    try:
        sizes_read = {len(path.read_bytes()) for _ in range(2000)}
    finally:
        stop.set()
        writer.join()
    assert sizes_read == {size}
    other = Image.fromarray(np.zeros((400, 500, 3), dtype=np.uint8))
    assert save_pil_to_cache(other, str(tmp_path), format="jpeg") != str(path)


# ---- the served app, through gradio_client ------------------------------------------------------------


@pytest.mark.slow
def test_client_gets_a_prediction_and_a_clear_error_and_the_server_keeps_serving(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served.local_url, verbose=False)
    good, bad = write(tmp_path, "gray.png", GOOD), write(tmp_path, "disguised.png", BAD)

    warning, label, overlay_path, check = client.predict(handle_file(str(good)), api_name="/predict")
    assert {item["label"] for item in label["confidences"]} == LABELS
    assert Image.open(overlay_path).size == (512, 410)
    assert isinstance(check["looks_like_chest_xray"], bool) and isinstance(check["ood_score"], float)
    assert bool(warning) == (not check["looks_like_chest_xray"])

    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(bad)), api_name="/predict")
    _, again, _, _ = client.predict(handle_file(str(write(tmp_path, "scan.dcm", GOOD))), api_name="/predict")
    assert {item["label"] for item in again["confidences"]} == LABELS


def listening_addresses(port: int) -> set[str]:
    """The addresses the kernel has a TCP socket listening on `port` at (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = b"".join(raw[start : start + 4][::-1] for start in range(0, width, 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.slow  # starts a fresh `python app.py`, as a user does
def test_the_app_as_started_listens_on_loopback_only_and_refuses_an_upload_over_the_limit(tiny_model_dir, tmp_path):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the listening sockets from Linux's /proc/net/tcp")
    port, log = free_port(), tmp_path / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "tmp"))
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_SHARE", "XRAY_MODEL"):
        env.pop(name, None)
    server = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--model", str(tiny_model_dir), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not listening_addresses(port):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert listening_addresses(port) == {"127.0.0.1"}  # not reachable from the network unless --host says so
        upload = f"{url}/gradio_api/upload"
        assert httpx.post(upload, files={"files": ("small.png", b"x" * 1024)}, timeout=60).status_code == 200
        too_big = httpx.post(upload, files={"files": ("big.png", bytes(MAX_FILE_BYTES + 1))}, timeout=120)
        assert too_big.status_code == 413 and "maximum allowed size" in too_big.text
        assert "public URL" not in log.read_text()  # no gradio.live link unless --share
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_app_client_and_pipeline_agree(served, classifier, tiny_model_dir, tmp_path):
    from gradio_client import Client, handle_file
    from transformers import pipeline

    path = str(write(tmp_path, "gray.png", GOOD))
    _, in_app, _, check_in_app = app.answer_upload(classifier, path)
    _, label, _, check = Client(served.local_url, verbose=False).predict(handle_file(path), api_name="/predict")
    via_client = {item["label"]: item["confidence"] for item in label["confidences"]}
    via_pipeline = {
        item["label"]: item["score"]
        for item in pipeline("image-classification", model=str(tiny_model_dir))(path, top_k=3)
    }
    for label_name in LABELS:
        assert via_client[label_name] == pytest.approx(in_app[label_name], abs=1e-5)
        assert via_pipeline[label_name] == pytest.approx(in_app[label_name], abs=1e-5)
    assert (
        check.pop("prediction_sets")
        == check_in_app.pop("prediction_sets")
        == classify(classifier, [path])[0].prediction_sets
    )
    assert check == pytest.approx(check_in_app)


# ---- start-up, options and the description ------------------------------------------------------------


@pytest.mark.slow  # starts a fresh `python app.py` process
def test_no_model_exits_with_the_training_command_and_no_traceback(tmp_path):
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio")
    )
    env.pop("XRAY_MODEL", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "app.py"), "--model", str(tmp_path / "no-model-here")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "No trained model" in result.stderr and "python train_vit.py" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_model_comes_from_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("XRAY_MODEL", raising=False)
    assert app.parse_args([]).model == str(Path(app.__file__).resolve().parent / "models" / "swiftformer-xray")
    monkeypatch.setenv("XRAY_MODEL", "someone/vit-xray")
    assert app.parse_args([]).model == "someone/vit-xray"
    assert app.parse_args(["--model", "elsewhere"]).model == "elsewhere"
    options = app.launch_options(app.parse_args([]))
    # gradio reads GRADIO_SERVER_*
    assert options["server_name"] is None and options["server_port"] is None and options["share"] is False


def test_description_names_the_model_its_origin_and_held_out_metrics(tiny_model_dir):
    text = app.describe_model(str(tiny_model_dir))
    summary = read_metrics(tiny_model_dir)
    split = "test" if "test" in summary else "validation"
    assert "not a medical device" in text
    assert str(tiny_model_dir) in text and summary["model_origin"]["description"] in text
    assert f"{split} split" in text
    for words in ("accuracy", "macro-F1", "sensitivity", "specificity", "SYNTHETIC"):
        assert words in text
    assert f"{summary[split]['accuracy']:.1%}" in text
    assert "No chest X-ray check" not in text  # the folder has its out-of-distribution statistics


def test_description_of_a_hub_model_and_of_a_bare_folder(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    assert "unknown" in app.describe_model(str(tmp_path))  # no metrics.json
    assert "No chest X-ray check" in app.describe_model(str(tmp_path)) and "python calibrate.py" in app.describe_model(
        str(tmp_path)
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: str(tiny_model_dir / filename))
    assert "trained from scratch" in app.describe_model("someone/vit-xray")

    def offline(repo_id, filename):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert "unknown" in app.describe_model("someone/vit-xray")


def test_examples_come_from_a_folder_the_user_names(tiny_model_dir, tmp_path):
    for name in ("gray.png", "scan.dcm"):
        write(tmp_path, name, GOOD)
    (tmp_path / "notes.txt").write_text("not an example")
    # images go to the preview (thumbnails), DICOM, which no browser shows, to the file input
    assert app.find_examples(str(tmp_path)) == [[None, str(tmp_path / "gray.png")], [str(tmp_path / "scan.dcm"), None]]
    assert app.find_examples(None) == []
    with pytest.raises(SystemExit, match="not a folder"):
        app.find_examples(str(tmp_path / "missing"))
    assert app.build_demo(str(tiny_model_dir), str(tmp_path)).examples is not None


def test_three_credited_example_xrays_ship_and_are_offered_by_default(monkeypatch):
    files = sorted(app.EXAMPLES_DIR.glob("*.jpeg"))
    assert [path.name for path in sorted(app.EXAMPLES_DIR.iterdir())] == sorted(
        [path.name for path in files] + ["README.md"]
    )
    assert len(files) == 3
    classes = {
        "normal"
        if "NORMAL" in path.name or path.name.startswith("IM-")
        else "bacterial"
        if "bacteria" in path.name
        else "viral"
        for path in files
    }
    assert classes == {"normal", "bacterial", "viral"}
    for path in files:
        assert path.stat().st_size <= 200 * 1024
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L" and max(image.size) <= 1024
    credit = " ".join((app.EXAMPLES_DIR / "README.md").read_text().split())
    assert "CC BY 4.0" in credit and "Kermany" in credit and "2018" in credit
    assert all(path.name in credit for path in files)
    monkeypatch.delenv("XRAY_EXAMPLES", raising=False)
    assert app.parse_args([]).examples == str(app.EXAMPLES_DIR)
    assert app.find_examples(app.parse_args([]).examples) == [[None, str(path)] for path in files]


def test_the_file_picker_offers_images_and_dicom_and_the_preview_takes_a_paste(tiny_model_dir, tmp_path):
    demo = app.build_demo(str(tiny_model_dir))
    upload, seen = demo.input_components
    assert isinstance(upload, gr.File) and {".dcm", ".png", ".jpeg", ".jpg"} <= set(upload.file_types)
    # handed over unconverted
    assert isinstance(seen, gr.Image) and "clipboard" in seen.sources and seen.image_mode is None
    # a pasted X-ray is answered as the same file would be; when both are given, the file wins
    xray, pasted, other = write(tmp_path, "gray.png", GOOD), tmp_path / "pasted.png", tmp_path / "other.png"
    shutil.copy(xray, pasted)
    Image.fromarray(np.roll(chest_like(), 80, axis=1), "L").save(other)
    by_file, by_paste = shown(demo, str(xray), None)["prediction"], shown(demo, None, str(pasted))["prediction"]
    assert by_paste == by_file
    assert shown(demo, str(other), str(pasted))["prediction"] == shown(demo, str(other), None)["prediction"] != by_file


@pytest.mark.parametrize("name", ["scan.dcm", "sixteen-bit.png", "large-3000px.jpeg"])
def test_the_preview_is_the_image_as_the_loader_decodes_it(classifier, tmp_path, name):
    from cxr.images import load_image
    from cxr.models import input_size

    path = write(tmp_path, name, GOOD)
    shown = app.preview(classifier, str(path))
    decoded = load_image(str(path), draft_size=input_size(classifier.image_processor))
    assert max(shown.size) <= app.PREVIEW_SIDE and shown.mode == "RGB"
    assert shown.width / shown.height == pytest.approx(decoded.width / decoded.height, rel=0.02)
    np.testing.assert_allclose(np.asarray(shown, dtype=float).mean(), np.asarray(decoded, dtype=float).mean(), atol=2)
    if max(decoded.size) <= app.PREVIEW_SIDE:
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(decoded))
    assert app.preview(classifier, None) is None


def test_error_messages_are_plain_text_even_when_the_file_name_is_markup(classifier, tmp_path):
    """Gradio renders an error message as HTML: nothing from an upload (its name, its decoder's words) may become
    markup."""
    path = tmp_path / MARKUP_NAME
    path.write_text("not an image\n" * 20)
    for call in (app.answer_upload, app.preview):
        with pytest.raises(gr.Error) as raised:
            call(classifier, str(path))
        message = raised.value.message
        assert "<" not in message and ">" not in message
        assert "img src=x onerror=alert(1)" in message and "bold.png" in message and "not an image" in message
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(dicom_bytes(np.zeros((160, 200), np.uint16), photometric=MARKUP_DICOM))
    with pytest.raises(gr.Error) as raised:
        app.answer_upload(classifier, str(scan))
    assert "MONO" in raised.value.message and "<" not in raised.value.message
    # The loader already keeps markup out of its own messages; the app escapes whatever else an error may quote.
    assert app.plain_error("<b>x</b> & <img src=y>").message == "&lt;b&gt;x&lt;/b&gt; &amp; &lt;img src=y&gt;"


def test_uploads_are_decoded_in_a_worker_capped_in_time(classifier, tmp_path, monkeypatch):
    """A stranger's file is decoded in a worker process with time and memory caps (cxr.images, isolate=True)."""
    import cxr.images

    path = write(tmp_path, "gray.png", GOOD)
    monkeypatch.setattr(cxr.images, "DECODE_SECONDS", 1e-6)  # no decode finishes in time, so the cap must show
    for call in (app.answer_upload, app.preview):
        with pytest.raises(gr.Error, match="took longer than"):
            call(classifier, str(path))


def test_the_bars_are_headed_by_the_95_percent_prediction_set():
    sets = {"90%": ["Bacterial pneumonia"], "95%": ["Bacterial pneumonia", "Viral pneumonia"]}
    assert app.prediction_set_heading({"prediction_sets": sets}) == "95% set: bacterial or viral pneumonia"
    assert app.prediction_set_heading({"prediction_sets": None}) == "Prediction"  # a folder without conformal.json


@pytest.mark.slow
def test_a_pasted_image_is_classified_and_a_file_wins_over_it(served, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served.local_url, verbose=False)
    normal_like, photo = write(tmp_path, "gray.png", GOOD), tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    _, pasted, _, pasted_check = client.predict(None, handle_file(str(photo)), api_name="/predict")
    _, both, _, both_check = client.predict(handle_file(str(normal_like)), handle_file(str(photo)), api_name="/predict")
    # the one-input call still works
    _, alone, _, alone_check = client.predict(handle_file(str(normal_like)), api_name="/predict")
    assert {item["label"] for item in pasted["confidences"]} == LABELS
    assert both == alone and both_check == alone_check and pasted_check != alone_check
    preview = client.predict(handle_file(str(write(tmp_path, "scan.dcm", GOOD))), api_name="/preview")
    assert Image.open(preview).size == (200, 160)  # the DICOM as decoded, which no browser can show


@pytest.mark.slow
def test_a_full_queue_refuses_the_next_request_at_once(tiny_model_dir, monkeypatch):
    """CONCURRENCY_LIMIT requests run, QUEUE_SIZE wait, and one more is refused ("queue is full"), not queued."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    monkeypatch.setattr(app, "QUEUE_SIZE", 2)  # small, so the test needs few requests; build_demo reads it
    release = threading.Event()
    monkeypatch.setattr(
        app, "answer_upload", lambda classifier, path: (release.wait(120), ("", {"Normal": 1.0}, None, {}))[1]
    )
    demo = app.build_demo(str(tiny_model_dir), examples=None)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)

    def submit_and_wait_for(status):
        job = client.submit(xray, api_name="/predict")
        deadline = time.monotonic() + 60
        while job.status().code != status and not job.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        return job

    try:
        client = Client(demo.local_url, verbose=False)
        xray = handle_file(str(app.EXAMPLES_DIR / "NORMAL2-IM-0772-0001.jpeg"))
        running = [submit_and_wait_for(Status.PROCESSING) for _ in range(app.CONCURRENCY_LIMIT)]
        waiting = [submit_and_wait_for(Status.IN_QUEUE) for _ in range(app.QUEUE_SIZE)]
        assert [job.status().code for job in running + waiting] == [Status.PROCESSING] * len(running) + [
            Status.IN_QUEUE
        ] * len(waiting)
        one_more = submit_and_wait_for(Status.FINISHED)
        assert one_more.done(), f"the request past the queue's limit was not refused: {one_more.status().code}"
        with pytest.raises(Exception, match="(?i)queue is full"):
            one_more.result()
        release.set()
        # the accepted ones are answered
        assert all(job.result(timeout=60)[1]["label"] == "Normal" for job in running + waiting)
    finally:
        release.set()
        demo.close()


def test_the_app_refuses_a_temporary_folder_holding_files_not_its_own(tmp_path, monkeypatch):
    """Gradio serves what its temporary folder holds to anyone who asks by path: a shared one (/tmp) must not start."""
    own = tmp_path / "own"
    (own / ("a" * 64)).mkdir(parents=True)
    (own / ("a" * 64) / "image.webp").write_bytes(b"x")
    (own / "tmpab_c12de").write_bytes(b"")
    (own / "vibe_edit_history").mkdir()
    app.check_temp_dir(own)  # what Gradio itself leaves there
    app.check_temp_dir(tmp_path / "not-yet")  # Gradio creates it
    for intruder in ("id_rsa", "tmp-notes", "B" * 64):
        shared = tmp_path / f"shared-{intruder}"
        shutil.copytree(own, shared)
        (shared / intruder).write_text("private")
        with pytest.raises(SystemExit, match=f"not Gradio's.*{intruder}.*GRADIO_TEMP_DIR"):
            app.check_temp_dir(shared)
    nested = tmp_path / "nested"
    shutil.copytree(own, nested)
    (nested / ("a" * 64) / "keys").mkdir()
    (nested / ("a" * 64) / "link").symlink_to("/etc/passwd")
    with pytest.raises(SystemExit):
        app.check_temp_dir(nested)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "shared-id_rsa"))
    with pytest.raises(SystemExit, match="dedicated, empty folder"):  # main checks before loading any model
        app.main(["--model", str(tmp_path / "no-model-here")])


def test_the_model_of_a_space_comes_from_its_front_matter(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("---\nsdk: gradio\nmodels:\n  - owner/name\n---\n# A Space\n")
    assert app.space_model(tmp_path) == "owner/name"
    assert app.space_model(tmp_path / "no-readme") is None
    assert app.space_model(app.EXAMPLES_DIR.parent) is None  # the repository's own README has no front matter
