"""Gradio demo: upload a pediatric chest X-ray, get Normal / Bacterial pneumonia / Viral pneumonia probabilities.

    python app.py                                   # serves outputs/vit-xray (what train_vit.py writes)
    python app.py --model outputs/quick --examples ~/xrays   # another model folder, with example files
    XRAY_MODEL=your-name/vit-xray python app.py     # a model on the Hugging Face Hub (e.g. in a Space)

A research demo, not a medical device. This file is the Interface only: every upload goes through the
project's one image loader (`cxr.images.load_image`), the model folder is loaded once by
`cxr.predict.load_classifier` (the same `pipeline("image-classification")` Python users call, with the folder's
out-of-distribution statistics), and the overlay comes from `cxr.saliency`. Run `python app.py --help` for every option.

Outputs, in order (the API at /predict returns the same four): a warning (Markdown, empty unless the upload
does not look like a pediatric chest X-ray), the three probabilities (Label), the Grad-CAM overlay (Image),
and the check itself (JSON: looks_like_chest_xray, ood_score, threshold, score).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. When other programs want the cores (a load test's clients on the
# same machine, a training run beside the demo), spinning threads starve each other: one prediction of the small
# model took 856 ms instead of 73 ms on 2 busy cores. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gradio as gr  # noqa: E402 (after the environment setting above)
from gradio import processing_utils
from PIL import Image
from transformers import Pipeline

from cxr.images import MAX_FILE_BYTES, ImageLoadError, load_image
from cxr.models import DEFAULT_MODEL_DIR, input_size
from cxr.predict import IMAGE_SUFFIXES, ModelNotFoundError, classify, load_classifier, model_summary
from cxr.saliency import saliency_overlay

# Serving limits, chosen for a small CPU box (2 cores); see the README's security notes.
# - Two predictions at a time: while one is in Python (decoding, the overlay, Gradio's own per-request work), the
#   other keeps torch busy. With the small scratch model on 2 cores and 20 clients (benchmarks.load) that answered
#   16.1 requests/s against 13.6 for one at a time, p95 1.4 s against 1.7 s, with server memory 708 MiB at the end.
#   More would not help on 2 cores; a worst-case upload (40 megapixels) needs ~0.8 GB while it decodes, so each
#   extra slot is that much memory in the worst case. Raise it on a machine with more cores.
# - At most QUEUE_SIZE uploads wait their turn (about 7-10 s of work at 0.2-0.3 s each); one more is refused at once
#   ("queue is full") rather than queued without bound, holding memory and making every later answer later.
# - api_open=False closes the REST routes that would skip the queue and its limits; the page and gradio_client
#   use the queue anyway.
CONCURRENCY_LIMIT = 2
QUEUE_SIZE = 32
# Gradio keeps every upload (and each overlay it sends back) as a file in its cache folder (GRADIO_TEMP_DIR, by default
# /tmp/gradio). Every DELETE_CACHE[0] seconds the files older than DELETE_CACHE[1] seconds are deleted, and all of
# them when the server stops; files offered as --examples are kept.
DELETE_CACHE = (60, 120)

# The held-out figures the description quotes from metrics.json, in order.
FIGURES = {"accuracy": "accuracy {:.1%}", "macro_f1": "macro-F1 {:.3f}", "pneumonia_sensitivity": "pneumonia sensitivity {:.1%}", "pneumonia_specificity": "specificity {:.1%}"}

ARTICLE = """
**Reading the output.** The bars are the model's probabilities for the three classes, calibrated on held-out
X-rays (temperature scaling); they always sum to 100 %, even for an image that is not a chest X-ray at all.
So every upload is also checked against the training X-rays (the distance of the model's internal features to
them): an upload that does not look like a pediatric chest X-ray gets a warning above the bars, and its bars
mean nothing. The check lets through 97 % of the validation X-rays, so a few real ones are flagged too.
The overlay is Grad-CAM: a coarse map (one value per image patch) of where the evidence for the top class came
from. It is not an outline of a lesion; a model that learned a shortcut (a text marker, the image border) shows that shortcut.
"""

NOT_AN_XRAY = (
    "### ⚠ This does not look like a pediatric chest X-ray\n"
    "The model was trained only on frontal chest X-rays of young children, and this image is unlike all of them "
    "(out-of-distribution score {score:.4g}, above the threshold {threshold:.4g}). "
    "The probabilities below mean nothing for it. If it is a chest X-ray, check that it is the right way up, "
    "not inverted (bones should be bright), and not a photo of a screen."
)


def save_pil_to_cache(image: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's `processing_utils.save_pil_to_cache`, made safe for identical answers at the same time.

    Gradio 6.31 names a cached image after the hash of its bytes and rewrites that file in place on every answer.
    Two users uploading the same X-ray (a class clicking one example) get byte-identical overlays, so one user's
    download could read the file while the other's answer had just truncated it: 6 of 300 requests failed that
    way with 20 clients sending one image (benchmarks.load). Here an existing copy is reused, and a new one is
    written under a temporary name and renamed into place, as Gradio already does for files
    (`processing_utils.save_file_to_cache`)."""
    data = processing_utils.encode_pil_to_bytes(image, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if path.exists():
        os.utime(path)  # the cache clean-up ages files by their time: this answer needs the copy for a while yet
        return str(path)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as staging:
        staging.write(data)
    os.replace(staging.name, path)
    return str(path)


processing_utils.save_pil_to_cache = save_pil_to_cache  # gr.Image outputs call it through this module attribute


def predict(classifier: Pipeline, path: str | None) -> tuple[str, dict[str, float], Image.Image, dict]:
    """One uploaded file -> (warning, {label: probability} for the three classes, saliency overlay, the X-ray check).

    The warning is Markdown, empty unless the upload does not look like a chest X-ray; the check is
    {looks_like_chest_xray, ood_score, threshold, score}, with None values for a model folder without
    out-of-distribution statistics. Unreadable files raise gr.Error."""
    if not path:
        raise gr.Error("No file: upload a chest X-ray (JPEG, PNG or DICOM) first.", print_exception=False)
    try:  # decoded once (as `classify` decodes), for both the prediction and the overlay
        image = load_image(path, draft_size=input_size(classifier.image_processor))
    except ImageLoadError as error:
        raise gr.Error(str(error), print_exception=False) from error
    [prediction] = classify(classifier, [image], top_k=3, names=[Path(path).name], saliency=True)
    if prediction.error:
        raise gr.Error(prediction.error, print_exception=False)
    detector = getattr(classifier, "ood_detector", None)
    check = {
        "looks_like_chest_xray": prediction.looks_like_chest_xray,
        "ood_score": prediction.ood_score,
        "threshold": detector.threshold if detector else None,
        "score": detector.score_name if detector else None,
    }
    warning = NOT_AN_XRAY.format(score=prediction.ood_score, threshold=detector.threshold) if prediction.looks_like_chest_xray is False else ""
    return warning, prediction.scores, saliency_overlay(image, prediction.saliency), check


def describe_model(model: str, has_xray_check: bool | None = None) -> str:
    """Markdown: the not-a-medical-device notice, which model is served, its held-out metrics from metrics.json,
    and a note where the model has no chest X-ray check (`has_xray_check`; by default, what metrics.json says)."""
    summary = read_summary(model)
    lines = [
        "**Research demo, not a medical device.** Do not use it to diagnose, treat or triage anyone; "
        "its predictions can be confidently wrong."
    ]
    origin = summary.get("model_origin", {}).get("description", "origin unknown (no metrics.json with the model)")
    lines.append(f"**Model:** `{model}`, {origin}.")
    split = "test" if "test" in summary else "validation" if "validation" in summary else None
    if split:
        count = sum(summary.get("data", {}).get("counts", {}).get(split, {}).values())
        images = f", {count} images" if count else ""
        figures = ", ".join(text.format(summary[split][key]) for key, text in FIGURES.items() if key in summary[split])
        lines.append(f"**Held-out {split} split{images}:** {figures}.")
    else:
        lines.append("**Held-out metrics:** none found with this model, so its accuracy is unknown.")
    if not (has_xray_check if has_xray_check is not None else summary.get("ood")):
        lines.append(
            "**No chest X-ray check with this model** (its folder has no out-of-distribution statistics): any image gets "
            "three probabilities. Add the check with `python -m cxr.reliability MODEL_DIR --data_dir DATA`."
        )
    if summary.get("data", {}).get("synthetic"):
        lines.append(
            "**Warning: this model was trained on SYNTHETIC stand-in images, not X-rays.** "
            "It only shows that the demo works; its predictions mean nothing."
        )
    return "\n\n".join(lines)


def read_summary(model: str) -> dict:
    """metrics.json of a local model folder, or of a Hub model (fetched on its own); empty if there is none."""
    if Path(model).expanduser().is_dir():
        return model_summary(model)
    try:
        from huggingface_hub import hf_hub_download

        return model_summary(Path(hf_hub_download(model, "metrics.json")).parent)
    except Exception:  # a Hub model without metrics.json, or offline: the description says so
        return {}


def find_examples(folder: str | None) -> list[list[str]]:
    """The image and DICOM files in `folder` (sorted), one example row each; none without a folder."""
    if not folder:
        return []
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SystemExit(f"--examples: '{folder}' is not a folder.")
    return [[str(file)] for file in sorted(path.iterdir()) if file.suffix.lower() in IMAGE_SUFFIXES]


def build_demo(model: str = DEFAULT_MODEL_DIR, examples: str | None = None) -> gr.Interface:
    """The Interface for `model` (a local folder or Hub id), loaded once here, with its queue limits (CONCURRENCY_LIMIT,
    QUEUE_SIZE) and upload clean-up (DELETE_CACHE); raises ModelNotFoundError if the model is absent."""
    classifier = load_classifier(model)

    def classify_xray(xray: str | None) -> tuple[str, dict[str, float], Image.Image, dict]:
        return predict(classifier, xray)

    demo = gr.Interface(
        fn=classify_xray,
        # gr.File hands the uploaded file to our loader byte for byte (gr.Image would re-open it with Pillow,
        # which cannot read DICOM); the loader itself decides what is an image.
        inputs=gr.File(label="Chest X-ray: JPEG, PNG or DICOM (.dcm)", type="filepath", elem_id="xray-file"),
        outputs=[
            gr.Markdown(elem_id="xray-warning"),
            gr.Label(num_top_classes=3, label="Prediction", elem_id="prediction"),
            gr.Image(type="pil", format="jpeg", label="Regions that drove the top prediction (Grad-CAM, coarse)", elem_id="saliency"),
            gr.JSON(label="Chest X-ray check (out-of-distribution score; higher = less like the training X-rays)", elem_id="xray-check"),
        ],
        examples=find_examples(examples) or None,
        cache_examples=False,
        title="Pediatric chest X-ray: normal, bacterial or viral pneumonia",
        description=describe_model(model, has_xray_check=classifier.ood_detector is not None),
        article=ARTICLE,
        flagging_mode="never",
        api_name="predict",
        delete_cache=DELETE_CACHE,
        analytics_enabled=False,  # no usage telemetry or version check sent to gradio's servers: nothing leaves this machine
    )
    return demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE, api_open=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get("XRAY_MODEL", DEFAULT_MODEL_DIR),
        help="Model folder written by train_vit.py, or a Hugging Face Hub id (owner/name). "
        f"Default: the XRAY_MODEL environment variable, else {DEFAULT_MODEL_DIR}.",
    )
    parser.add_argument(
        "--examples",
        default=os.environ.get("XRAY_EXAMPLES"),
        metavar="DIR",
        help="A folder of X-rays (JPEG, PNG, DICOM) to offer as clickable examples (copied into gradio's cache at "
        "start-up, so anyone who can reach the app can download them). Default: the XRAY_EXAMPLES environment variable, else none.",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="Address to listen on. Default: the GRADIO_SERVER_NAME environment variable, else 127.0.0.1 "
        "(this machine only); 0.0.0.0 makes it reachable from the network.",
    )
    parser.add_argument("--port", type=int, default=None, help="Port. Default: the GRADIO_SERVER_PORT environment variable, else 7860 (or the next free one).")
    parser.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link (off by default; anyone with the link can use the app).")
    return parser.parse_args(argv)


def launch_options(args: argparse.Namespace) -> dict:
    """Arguments for `demo.launch`: host and port left to gradio (and its environment variables) unless given."""
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_FILE_BYTES,  # the same limit the image loader enforces
        run_history=False,  # gradio would keep each user's uploads and results in their browser (or a Hub bucket they connect)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        demo = build_demo(args.model, args.examples)
    except ModelNotFoundError as error:
        raise SystemExit(f"app.py: {error}") from None  # the message says how to train one; no traceback
    demo.launch(**launch_options(args))


if __name__ == "__main__":
    main()
