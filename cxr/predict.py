"""Inference on one model folder, shared by app.py, the batch predictor, the benchmarks and the tests.

The model folder written by train_vit.py (or its Hub copy) is loaded with the standard
`pipeline("image-classification")`, the same call Python users make; images go through the
project's one loader (`cxr.images.load_image`) first, so every way in sees the same pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import Pipeline, pipeline

from cxr.images import ImageLoadError, ImageSource, load_image
from cxr.models import DEFAULT_MODEL_DIR, input_size

TRAIN_HINT = (
    "Train one first, e.g. offline in a few minutes:\n"
    "    python train_vit.py --data_dir synthetic --model scratch-small --learning_rate 1e-3 --num_train_epochs 8\n"
    "or on the Kaggle chest X-ray download (see README)."
)


class ModelNotFoundError(RuntimeError):
    """No usable model at the given folder or Hub id; the message says how to make one."""


def load_classifier(model: str | Path, device: str | int | None = None) -> Pipeline:
    """The image-classification pipeline for a model folder or Hub id: safetensors weights only, no remote code."""
    model = str(model)
    path = Path(model).expanduser()
    # A Hub id is "owner/name"; anything else, or a path whose first folder exists here, is a local folder.
    looks_local = model == DEFAULT_MODEL_DIR or model.startswith((".", "/", "~")) or model.count("/") != 1 or path.parent.exists()
    if looks_local and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"No trained model at '{model}' (no config.json there).\n{TRAIN_HINT}")
    try:
        return pipeline(
            "image-classification",
            model=str(path) if looks_local else model,
            device=device,
            trust_remote_code=False,
            model_kwargs={"use_safetensors": True},
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"Could not load the model '{model}': {error}\n{TRAIN_HINT}") from error


@dataclass
class Prediction:
    """Top labels for one input, or the reason it could not be read."""

    source: str
    scores: dict[str, float] | None = None  # label -> probability, best first
    error: str | None = None


def classify(classifier: Pipeline, images: list[ImageSource], top_k: int = 3, batch_size: int = 8, names: list[str] | None = None) -> list[Prediction]:
    """Top-k labels for each image, batched. An input that cannot be decoded gets its error; the rest go on."""
    size = input_size(classifier.image_processor)
    names = names or [str(image) if isinstance(image, (str, Path)) else f"image {index}" for index, image in enumerate(images)]
    predictions = [Prediction(source=name) for name in names]
    decoded, decoded_index = [], []
    for index, image in enumerate(images):
        try:
            decoded.append(load_image(image, draft_size=size))
            decoded_index.append(index)
        except ImageLoadError as error:
            predictions[index].error = str(error)
    if decoded:
        outputs = classifier(decoded, top_k=top_k, batch_size=batch_size)
        for index, output in zip(decoded_index, outputs):
            predictions[index].scores = {item["label"]: float(item["score"]) for item in output}
    return predictions


def model_summary(model: str | Path) -> dict:
    """What the model folder says about itself (metrics.json from train_vit.py); empty for a bare checkpoint."""
    metrics_file = Path(model).expanduser() / "metrics.json"
    if not metrics_file.is_file():
        return {}
    return json.loads(metrics_file.read_text())
