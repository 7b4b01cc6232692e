"""Gradio demo: upload a pediatric chest X-ray, get Normal / Bacterial pneumonia / Viral pneumonia probabilities.

    python app.py                                   # serves the model that ships with the code (models/)
    python app.py --model outputs/swiftformer-xray  # a model you trained with train_vit.py
    python app.py --model outputs/quick --examples ~/xrays   # another model folder, with example files
    XRAY_MODEL=your-name/swiftformer-xray python app.py   # a model on the Hugging Face Hub (e.g. in a Space)

A research demo, not a medical device. This file is the Interface only: every upload goes through the
project's one image loader (`cxr.images.load_image`), the model folder is loaded once by
`cxr.predictor.load_classifier` (the same `pipeline("image-classification")` Python users call, with the folder's
out-of-distribution statistics), and the overlay comes from `cxr.saliency`. Run `python app.py --help` for every option.

Inputs: a file (any format the loader reads, DICOM included) or an image pasted or dropped into the preview, which
shows the X-ray as the loader decoded it. The API at /predict takes the file and, optionally, the pasted image
(the file wins when both are given), and returns four outputs, in order: a warning (Markdown, empty unless the
upload does not look like a pediatric chest X-ray), the three probabilities (Label; the page heads the bars with the
95% prediction set), the Grad-CAM overlay (Image), and the check itself (JSON: looks_like_chest_xray, ood_score,
threshold, score, prediction_sets). /preview returns the decoded X-ray.
Error messages are plain text: markup in them (from a file name or a decoder) is escaped.
"""

from __future__ import annotations

import argparse
import html
import os
import re
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, so a busy machine's cores are not starved; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gradio as gr  # noqa: E402 (after the environment setting above)
from PIL import Image
from transformers import Pipeline

from cxr.conformal import LEVELS, describe_set, level_name
from cxr.images import IMAGE_SUFFIXES, MAX_FILE_BYTES, ImageLoadError, load_image, start_decode_workers
from cxr.models import SHIPPED_MODEL_DIR, input_size
from cxr.predictor import ModelNotFoundError, classify, load_classifier, model_summary
from cxr.saliency import saliency_overlay
from cxr.serving import BACKEND_CONCURRENCY_LIMIT, load_backend_classifier
from cxr.workarounds import install_gradio_cache_patch

# Serving limits for a small CPU box; docs/deployment.md has the measurements behind them.
CONCURRENCY_LIMIT = (
    2  # one prediction in Python while the other keeps torch busy; each slot may hold a worst-case decode
)
QUEUE_SIZE = 32  # beyond this, "queue is full" at once instead of unbounded waiting and memory
DELETE_CACHE = (60, 120)  # every minute, delete uploads and overlays older than two minutes (and all of them at exit)
PREVIEW_SIDE = (
    768  # the preview of what the model sees is shown at most this large (the model itself reads far fewer pixels)
)
APP_DIR = Path(__file__).resolve().parent  # where app.py (and a Space's README.md) lie
EXAMPLES_DIR = APP_DIR / "examples"  # the X-rays that ship with the demo (examples/README.md credits them)
# What Gradio itself leaves in its temporary folder: hash-named folders of cached files, upload staging files,
# one folder.
GRADIO_OWN_ENTRY = re.compile(r"[0-9a-f]{64}|tmp[a-z0-9_]{8}|vibe_edit_history")

DICOM_SUFFIXES = {".dcm", ".dicom"}

# The held-out figures the description quotes from metrics.json, in order.
FIGURES = {
    "accuracy": "accuracy {:.1%}",
    "macro_f1": "macro-F1 {:.3f}",
    "pneumonia_sensitivity": "pneumonia sensitivity {:.1%}",
    "pneumonia_specificity": "specificity {:.1%}",
}

ARTICLE = """
**Reading the output.** The bars are the model's probabilities for the three classes, calibrated on held-out
X-rays (temperature scaling); they always sum to 100 %, even for an image that is not a chest X-ray at all.
So every upload is also checked against the training X-rays (the distance of the model's internal features to
them): an upload that does not look like a pediatric chest X-ray gets a warning above the bars, and its bars
mean nothing. The check lets through 97 % of the validation X-rays, so a few real ones are flagged too.
The heading above the bars is the 95 % prediction set: the labels that together contain the true one for 95 % of
X-rays of each class, for X-rays like the ones the sets were fitted on (the model card says which). At another
hospital or with other equipment that promise may not hold until the model is checked and recalibrated there
(`site_check.py`, `calibrate.py --site_dir`).
The overlay is Grad-CAM: a coarse map (one value per image patch) of where the evidence for the top class came
from. It is not an outline of a lesion; a model that learned a shortcut (a text marker, the image border) shows that \
shortcut.
"""

NOT_AN_XRAY = (
    "### ⚠ This does not look like a pediatric chest X-ray\n"
    "The model was trained only on frontal chest X-rays of young children, and this image is unlike all of them "
    "(out-of-distribution score {score:.4g}, above the threshold {threshold:.4g}). "
    "The probabilities below mean nothing for it. If it is a chest X-ray, check that it is the right way up, "
    "not inverted (bones should be bright), and not a photo of a screen."
)


def plain_error(message: str) -> gr.Error:
    """A gr.Error that shows `message` as text: Gradio renders error messages as HTML, and ours can quote a file's
    name or its decoder's words, so markup in them is escaped."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def decode(classifier: Pipeline, path: str) -> Image.Image:
    """The upload as the model will see it (the project's one loader, at the model's draft size), or a plain
    gr.Error."""
    try:
        # In a worker capped in memory and time: a stranger's file may cost more than its header admits.
        return load_image(path, draft_size=input_size(classifier.image_processor), isolate=True)
    except ImageLoadError as error:
        raise plain_error(str(error)) from error


def preview(classifier: Pipeline, path: str | None) -> Image.Image | None:
    """The uploaded file decoded as `answer_upload` will decode it (DICOM, 16-bit, EXIF rotation), shown at most
    PREVIEW_SIDE pixels a side; None for no file."""
    if not path:
        return None
    image = decode(classifier, path)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return image


def answer_upload(classifier: Pipeline, path: str | None) -> tuple[str, dict[str, float], Image.Image, dict]:
    """One uploaded file -> (warning, {label: probability} for the three classes, saliency overlay, the X-ray check).

    The warning is Markdown, empty unless the upload does not look like a chest X-ray; the check is
    {looks_like_chest_xray, ood_score, threshold, score, prediction_sets}, with None values for a model folder without
    out-of-distribution statistics (or without conformal.json). Unreadable files raise gr.Error."""
    if not path:
        raise plain_error("No file: upload a chest X-ray (JPEG, PNG or DICOM) or paste one first.")
    image = decode(classifier, path)  # decoded once (as `classify` decodes), for both the prediction and the overlay
    [prediction] = classify(classifier, [image], top_k=3, names=[Path(path).name], saliency=True)
    if prediction.error:
        raise plain_error(prediction.error)
    detector = getattr(classifier, "ood_detector", None)
    check = {
        "looks_like_chest_xray": prediction.looks_like_chest_xray,
        "ood_score": prediction.ood_score,
        "threshold": detector.threshold if detector else None,
        "score": detector.score_name if detector else None,
        "prediction_sets": prediction.prediction_sets,
    }
    warning = (
        NOT_AN_XRAY.format(score=prediction.ood_score, threshold=detector.threshold)
        if prediction.looks_like_chest_xray is False
        else ""
    )
    return warning, prediction.scores, saliency_overlay(image, prediction.saliency), check


def prediction_set_heading(check: dict) -> str:
    """The heading of the bars: the widest stored prediction set ("95% set: bacterial or viral pneumonia"), else
    "Prediction"."""
    sets = check.get("prediction_sets") or {}
    return describe_set(sets.get(level_name(LEVELS[-1]))) or "Prediction"


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
            "**No chest X-ray check with this model** (its folder has no out-of-distribution statistics): "
            "any image gets "
            "three probabilities. Add the check with `python calibrate.py MODEL_DIR --data_dir DATA`."
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


def find_examples(folder: str | Path | None) -> list[list[str | None]]:
    """One example row (file, pasted image) per image or DICOM file in `folder`, sorted; none without a folder.
    Images go to the preview (shown as thumbnails), DICOM files, which a browser cannot show, to the file input."""
    if not folder:
        return []
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SystemExit(f"--examples: '{folder}' is not a folder.")
    files = [file for file in sorted(path.iterdir()) if file.suffix.lower() in IMAGE_SUFFIXES]
    return [[str(file), None] if file.suffix.lower() in DICOM_SUFFIXES else [None, str(file)] for file in files]


def build_demo(
    model: str | Path = SHIPPED_MODEL_DIR, examples: str | Path | None = EXAMPLES_DIR, backend: str | None = None
) -> gr.Interface:
    """The Interface for `model` (a local folder or Hub id), loaded once here, with its queue limits (CONCURRENCY_LIMIT,
    QUEUE_SIZE) and upload clean-up (DELETE_CACHE); raises ModelNotFoundError if the model is absent. With `backend`
    (the URL of serve.py), the model runs there and everything else here (cxr.serving)."""
    install_gradio_cache_patch()  # identical answers share one cached overlay: write it whole (cxr.workarounds)
    start_decode_workers(CONCURRENCY_LIMIT)  # before the model loads: fresh interpreters, never a fork of this one
    classifier = load_classifier(model) if backend is None else load_backend_classifier(str(model), backend)

    def classify_xray(
        xray: str | None = None, pasted: str | None = None
    ) -> tuple[str, dict[str, float], Image.Image, dict]:
        return answer_upload(classifier, xray or pasted)

    # gr.File hands the uploaded file to our loader byte for byte (gr.Image would re-open it with Pillow, which cannot
    # read DICOM); the loader itself decides what is an image.
    upload = gr.File(
        label="Chest X-ray file: JPEG, PNG (16-bit too), DICOM (.dcm)",
        type="filepath",
        file_types=sorted(IMAGE_SUFFIXES),
        elem_id="xray-file",
    )
    # The preview doubles as the paste target; image_mode=None hands a pasted file to our loader unconverted.
    seen = gr.Image(
        label="What the model sees (or paste an X-ray here)",
        type="filepath",
        image_mode=None,
        format="png",
        sources=["upload", "clipboard"],
        elem_id="xray-preview",
    )
    demo = gr.Interface(
        fn=classify_xray,
        inputs=[upload, seen],
        outputs=[
            gr.Markdown(elem_id="xray-warning"),
            bars := gr.Label(num_top_classes=3, label="Prediction", elem_id="prediction"),
            gr.Image(
                type="pil",
                format="jpeg",
                label="Regions that drove the top prediction (Grad-CAM, coarse)",
                elem_id="saliency",
            ),
            check := gr.JSON(
                label="Chest X-ray check (out-of-distribution score; higher = less like the training X-rays)",
                elem_id="xray-check",
            ),
        ],
        examples=find_examples(examples) or None,
        cache_examples=False,
        title="Pediatric chest X-ray: normal, bacterial or viral pneumonia",
        description=describe_model(model, has_xray_check=classifier.ood_detector is not None),
        article=ARTICLE,
        flagging_mode="never",
        api_name="predict",
        delete_cache=DELETE_CACHE,
        # No usage telemetry or version check sent to gradio's servers: nothing leaves this machine.
        analytics_enabled=False,
    )
    with demo:
        # A file shows as decoded as soon as it arrives; a pasted image replaces the file, so what is shown is what
        # runs.
        upload.change(lambda path: preview(classifier, path) if path else gr.skip(), upload, seen, api_name="preview")
        upload.clear(lambda: None, None, seen, api_visibility="private")
        seen.input(lambda _: None, seen, upload, api_visibility="private")
        # The bars' heading shows the prediction set; set apart from /predict, whose Label output stays a plain value.
        check.change(
            lambda shown: gr.Label(label=prediction_set_heading(shown or {})), check, bars, api_visibility="private"
        )
    concurrency = CONCURRENCY_LIMIT if backend is None else BACKEND_CONCURRENCY_LIMIT
    return demo.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE, api_open=False)


def check_temp_dir(folder: str | Path) -> None:
    """Refuse (SystemExit) a Gradio temporary folder that holds anything Gradio did not put there: Gradio serves the
    files in it to anyone who asks by path, so it must be the app's own (GRADIO_TEMP_DIR: a dedicated, empty folder)."""
    path = Path(folder)
    if not path.exists():
        return
    foreign = (
        [entry for entry in path.iterdir() if not is_gradio_own(entry)]
        if path.is_dir() and not path.is_symlink()
        else [path]
    )
    if foreign:
        names = ", ".join(sorted(entry.name for entry in foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise SystemExit(
            f"app.py: the temporary folder '{path}' holds files that are not Gradio's ({names}); Gradio would serve "
            "them to anyone who guesses their path. Point GRADIO_TEMP_DIR at a dedicated, empty folder."
        )


def is_gradio_own(entry: Path) -> bool:
    """Whether `entry` (in the temporary folder) has the shape of what Gradio leaves there: a hash-named folder of
    plain files, an upload's staging file, its own (empty) history folder; never a link."""
    if entry.is_symlink() or not GRADIO_OWN_ENTRY.fullmatch(entry.name):
        return False
    if entry.name.startswith("tmp"):
        return entry.is_file()
    return entry.is_dir() and all(child.is_file() and not child.is_symlink() for child in entry.iterdir())


def space_model(folder: Path = APP_DIR) -> str | None:
    """The model a Space serves: the first id under `models` in the front matter of the README.md beside app.py
    (what `python -m cxr.space` writes), or None where there is no such README (a clone of the repo)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import metadata_load

    models = (metadata_load(readme) or {}).get("models") or []
    return models[0] if models else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get("XRAY_MODEL") or space_model() or str(SHIPPED_MODEL_DIR),
        help="Model folder written by train_vit.py, or a Hugging Face Hub id (owner/name). Default: the XRAY_MODEL "
        "environment variable, else the first of `models` in a Space's README.md beside app.py, "
        f"else the model that ships with the code ({SHIPPED_MODEL_DIR.relative_to(APP_DIR)}). A model you trained: "
        "--model outputs/swiftformer-xray (the folder train_vit.py printed).",
    )
    parser.add_argument(
        "--examples",
        default=os.environ.get("XRAY_EXAMPLES") or (str(EXAMPLES_DIR) if EXAMPLES_DIR.is_dir() else None),
        metavar="DIR",
        help="A folder of X-rays (JPEG, PNG, DICOM) to offer as clickable examples (copied into gradio's cache at "
        "start-up, so anyone who can reach the app can download them). "
        "Default: the XRAY_EXAMPLES environment variable, "
        "else the examples/ folder beside app.py (three X-rays, credited in examples/README.md).",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="Address to listen on. Default: the GRADIO_SERVER_NAME environment variable, else 127.0.0.1 "
        "(this machine only); 0.0.0.0 makes it reachable from the network.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="Port. Default: the GRADIO_SERVER_PORT environment variable, else 7860 (or the next free one).",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("XRAY_BACKEND"),
        metavar="URL",
        help="Run the model on a model server started with `python serve.py` (Ray Serve: replicas, batched requests; "
        "docs/scaling.md) instead of in this process; --model names the same folder. Default: the XRAY_BACKEND "
        "environment variable, else none.",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="Also open a temporary public gradio.live link (off by default; anyone with the link can use the app).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def launch_options(args: argparse.Namespace) -> dict:
    """Arguments for `demo.launch`: host and port left to gradio (and its environment variables) unless given."""
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_FILE_BYTES,  # the same limit the image loader enforces
        # Gradio would keep each user's uploads and results in their browser (or a Hub bucket they connect).
        run_history=False,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_temp_dir(gr.utils.get_upload_folder())  # before the model loads: a wrong folder fails in a second
    try:
        demo = build_demo(args.model, args.examples, args.backend)
    except ModelNotFoundError as error:
        raise SystemExit(f"app.py: {error}") from None  # the message says how to train one; no traceback
    demo.launch(**launch_options(args))


if __name__ == "__main__":
    main()
