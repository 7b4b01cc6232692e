"""Inference on one model folder, shared by app.py, the batch predictor, the benchmarks and the tests.

The model folder written by train_vit.py (or its Hub copy) is loaded as the standard
`pipeline("image-classification")`, the same call Python users make, together with the folder's
out-of-distribution statistics (`ood.safetensors`, see `cxr.ood`) and prediction-set thresholds
(`conformal.json`, see `cxr.conformal`). One upload:

    file -> load_image (the project's one loader) -> image processor -> model -> logits (the calibration
    temperature is folded into the head) -> softmax -> top labels
                                                               + per-class thresholds -> 90 % and 95 % sets
                                                  + penultimate features -> out-of-distribution score -> flag
                                                  + (app) gradient at the last block -> Grad-CAM map

`classify` runs that forward pass itself (the same processor and model the pipeline runs, so the same
probabilities) because the flag (and the app's Grad-CAM map) needs the features the pipeline does not return.
With `load_classifier(..., onnx=True)` ONNX Runtime computes the same logits and features (`cxr.onnx_runtime`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import Pipeline, pipeline

from cxr.conformal import CONFORMAL_FILE, LEVELS, PredictionSets, describe_set, level_name
from cxr.features import forward_features
from cxr.folders import folder_identity, write_text_atomic
from cxr.images import IMAGE_SUFFIXES, ImageLoadError, ImageSource, load_image
from cxr.models import input_size, is_local_path
from cxr.ood import OOD_FILE, OodDetector
from cxr.run_record import check_checksums, read_metrics
from cxr.saliency import grad_cam

TRAIN_HINT = (
    "Train one first, e.g. offline in a few minutes:\n"
    "    python train_vit.py --data_dir synthetic --model scratch-small --learning_rate 1e-3 --num_train_epochs 8\n"
    "or on the Kaggle chest X-ray download (see README)."
)


# What inference reads from a model folder: these must be the files one run wrote together (checksums.json).
INFERENCE_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", OOD_FILE, CONFORMAL_FILE)


# The inference paths `load_classifier` offers, by the names predict.py's --runtime and benchmarks.speed use:
# name -> its keyword arguments.
RUNTIMES = {
    "torch": dict(onnx=False, int8=False),
    "torch-int8": dict(onnx=False, int8=True),
    "onnx": dict(onnx=True, int8=False),
    "onnx-int8": dict(onnx=True, int8=True),
}


class ModelNotFoundError(RuntimeError):
    """No usable model at the given folder or Hub id; the message says how to make one."""


def load_classifier(
    model: str | Path, device: str | int | None = None, int8: bool = False, onnx: bool = False
) -> Pipeline:
    """`_load_classifier` (below), loaded again if a run swapped a new model folder in meanwhile
    (`cxr.folders.swap_in`): the weights, the processor and the chest X-ray statistics are read one file after another,
    and must all be one version's."""
    for _ in range(5):
        before = folder_identity(model)
        classifier = _load_classifier(model, device, int8, onnx)
        if folder_identity(model) == before:
            return classifier
    raise ModelNotFoundError(
        f"The model folder '{model}' kept changing while it was loaded (a training run saving into it?); try again."
    )


def _load_classifier(
    model: str | Path, device: str | int | None = None, int8: bool = False, onnx: bool = False
) -> Pipeline:
    """The image-classification pipeline for a model folder or Hub id: safetensors weights only, no remote code.

    Its `ood_detector` attribute holds the folder's out-of-distribution statistics (None for a folder without
    them: run `python calibrate.py`), which `classify` uses to flag inputs that are not chest X-rays.
    `int8=True` quantizes the Linear layers to int8 (dynamic quantization): about twice as fast on a CPU,
    with top-1 agreement measured by `python -m benchmarks.speed`.
    `onnx=True` makes `classify` run the forward pass with ONNX Runtime on the CPU (the `onnx_features`
    attribute; with `int8=True`, ONNX Runtime's own int8 quantization instead of PyTorch's), exported into the
    model folder on first use: see `cxr.onnx_runtime`. The pipeline itself, called directly, still runs PyTorch.
    """
    if onnx and device not in (None, "cpu", -1):
        raise ValueError("onnx=True runs on the CPU: leave device unset")
    model = str(model)
    path = Path(model).expanduser()
    looks_local = is_local_path(model)
    if looks_local and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"No trained model at '{model}' (no config.json there).\n{TRAIN_HINT}")
    # A part left out (no ood.safetensors) is a folder without it, answered as such; a changed one is another run's.
    mixed = [name for name in check_checksums(path, INFERENCE_FILES) if (path / name).is_file()] if looks_local else []
    if mixed:
        raise ModelNotFoundError(
            f"The model folder '{model}' mixes versions: {', '.join(mixed)} differ from what the run that wrote it "
            "recorded (checksums.json). Copy the folder whole, or retrain or recalibrate it."
        )
    try:
        classifier = pipeline(
            "image-classification",
            model=str(path) if looks_local else model,
            device=device,
            trust_remote_code=False,
            model_kwargs={"use_safetensors": True},
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"Could not load the model '{model}': {error}\n{TRAIN_HINT}") from error
    # inference only; Grad-CAM's gradients then reach no further back than they must
    classifier.model.requires_grad_(False)
    classifier.onnx_features = None
    if onnx:
        from cxr.onnx_runtime import load_onnx_features  # imports onnxruntime only for those who ask for it

        classifier.onnx_features = load_onnx_features(
            classifier.model, input_size(classifier.image_processor), int8, path if looks_local else None
        )
    elif int8:
        with warnings.catch_warnings():
            # torch 2.13 flags its quantized tensors as deprecated; they still work
            warnings.simplefilter("ignore", UserWarning)
            classifier.model = torch.ao.quantization.quantize_dynamic(
                classifier.model, {torch.nn.Linear}, dtype=torch.qint8
            )
    classifier.ood_detector = load_ood_detector(model, looks_local)
    classifier.prediction_sets = load_prediction_sets(model, looks_local)
    id_order = [classifier.model.config.id2label[index] for index in range(len(classifier.model.config.id2label))]
    if classifier.prediction_sets is not None and classifier.prediction_sets.labels != id_order:
        warnings.warn(
            f"{CONFORMAL_FILE} was fitted for the labels {classifier.prediction_sets.labels}, "
            f"not this model's {id_order}: prediction sets left out",
            stacklevel=2,
        )
        classifier.prediction_sets = None
    return classifier


def load_ood_detector(model: str, local: bool) -> OodDetector | None:
    """The out-of-distribution statistics saved beside the weights (local folder or Hub copy), or None where there are
    none."""
    return load_beside_weights(model, local, OOD_FILE, OodDetector.load)


def load_prediction_sets(model: str, local: bool) -> PredictionSets | None:
    """The prediction-set thresholds saved beside the weights (conformal.json), or None where there are none."""
    return load_beside_weights(model, local, CONFORMAL_FILE, PredictionSets.load)


def load_beside_weights(model: str, local: bool, name: str, load):
    """`load(path)` of the file `name` in the model folder or its Hub copy; None where the folder has none."""
    if local:
        path = Path(model).expanduser() / name
        return load(path) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return load(hf_hub_download(model, name))
    except Exception:  # a Hub model without the file, or offline: left out, as for an older folder
        return None


@dataclass
class Prediction:
    """Top labels for one input and whether it looks like a chest X-ray at all, or the reason it could not be read."""

    source: str
    scores: dict[str, float] | None = None  # label -> probability, best first
    error: str | None = None
    ood_score: float | None = None  # out-of-distribution score: higher = less like the training X-rays
    looks_like_chest_xray: bool | None = (
        None  # False: the score is above the threshold; None: the model has no statistics
    )
    saliency: np.ndarray | None = None  # Grad-CAM for the top label over the patch grid, 0..1 (only when asked for)
    # Coverage level ("90%", "95%") -> the labels in the conformal prediction set, most probable first (cxr.conformal):
    # at 95 %, a set that holds the true label for 95 % of X-rays of each class. None: the model folder has no
    # conformal.json.
    prediction_sets: dict[str, list[str]] | None = None

    @property
    def prediction_set(self) -> list[str] | None:
        """The 95 % prediction set (the highest level stored), or None without one."""
        return self.prediction_sets.get(level_name(LEVELS[-1])) if self.prediction_sets else None

    @property
    def prediction_set_line(self) -> str:
        """E.g. "95% set: bacterial or viral pneumonia"; "" without a set (what the app shows beside the bars)."""
        return describe_set(self.prediction_set)

    @property
    def top_label(self) -> str | None:
        return next(iter(self.scores)) if self.scores else None


def classify(
    classifier: Pipeline,
    images: list[ImageSource],
    top_k: int = 3,
    batch_size: int = 8,
    names: list[str] | None = None,
    draft: bool = True,
    saliency: bool = False,
) -> list[Prediction]:
    """Top-k labels for each image, batched. An input that cannot be decoded gets its error; the rest go on.

    `saliency=True` adds a Grad-CAM map for each top label from the same forward pass (not for int8 or ONNX models).
    `draft` decodes large JPEGs at a reduced scale that still exceeds the model's input size (much faster;
    `draft=False` decodes every pixel, exactly as the plain pipeline does). `names`, when given, also name raw bytes
    in the loader's messages and mark a .dcm as DICOM (`load_image(file_name=...)`).
    A classifier with a `backend` (`cxr.serving.load_backend_classifier`) decodes and processes here and sends each
    batch to a model server (serve.py), which runs `classify_pixels` there.
    """
    size = input_size(classifier.image_processor) if draft else None
    file_names = names or [None] * len(images)
    names = names or [
        str(image) if isinstance(image, (str, Path)) else f"image {index}" for index, image in enumerate(images)
    ]
    predictions = [Prediction(source=name) for name in names]
    # Each image is resized by the processor right after decoding, so only one full-size image is in memory at a time.
    pixel_rows, decoded_index = [], []
    for index, image in enumerate(images):
        try:
            decoded = load_image(image, draft_size=size, file_name=file_names[index])
            pixel_rows.append(classifier.image_processor(decoded, return_tensors="pt")["pixel_values"][0])
            decoded_index.append(index)
        except ImageLoadError as error:
            predictions[index].error = str(error)
    backend = getattr(classifier, "backend", None)
    for start in range(0, len(pixel_rows), batch_size):
        chunk = decoded_index[start : start + batch_size]
        pixel_values = torch.stack(pixel_rows[start : start + batch_size])
        chunk_names = [names[index] for index in chunk]
        answers = (
            backend.classify_pixels(pixel_values, chunk_names, top_k=top_k, saliency=saliency)
            if backend
            else classify_pixels(classifier, pixel_values, chunk_names, top_k=top_k, saliency=saliency)
        )
        for index, answer in zip(chunk, answers, strict=True):
            predictions[index] = answer
    return predictions


def classify_pixels(
    classifier: Pipeline, pixel_values: torch.Tensor, names: list[str], top_k: int = 3, saliency: bool = False
) -> list[Prediction]:
    """The model's part of `classify`: one forward pass over a batch of processed images (the image processor's
    `pixel_values`, one per name) -> their Predictions, with the X-ray check, the prediction sets and, with
    `saliency`, Grad-CAM."""
    detector = getattr(classifier, "ood_detector", None)
    conformal = getattr(classifier, "prediction_sets", None)
    onnx_features = getattr(classifier, "onnx_features", None)
    if saliency and onnx_features:
        raise ValueError("Grad-CAM needs the PyTorch model's gradients: load the classifier without onnx=True")
    id2label = classifier.model.config.id2label
    if onnx_features:
        outputs = onnx_features(pixel_values)
    else:
        outputs = forward_features(classifier.model, pixel_values, saliency=saliency)
    probabilities = outputs["logits"].detach().float().softmax(dim=-1).cpu()
    heat = grad_cam(outputs, probabilities.argmax(dim=-1).tolist()) if saliency else None
    ood_scores, accepted = detector.check(outputs) if detector else (None, None)
    sets = conformal.sets(probabilities.numpy()) if conformal else None
    predictions = []
    for offset, (name, row) in enumerate(zip(names, probabilities, strict=True)):
        top = row.topk(min(top_k, len(row)))
        prediction = Prediction(
            source=name,
            scores={id2label[int(label)]: float(score) for score, label in zip(top.values, top.indices, strict=True)},
        )
        if detector:
            prediction.ood_score, prediction.looks_like_chest_xray = float(ood_scores[offset]), bool(accepted[offset])
        if heat is not None:
            prediction.saliency = heat[offset]
        if sets is not None:
            prediction.prediction_sets = sets[offset]
        predictions.append(prediction)
    return predictions


def model_fingerprint(model: str | Path) -> str:
    """What identifies the model inference runs: the sha256 of a local folder's inference files (INFERENCE_FILES, by
    name and content), the id itself for a Hub model. Processes that must give the same answers compare it: the app
    and its model server (cxr.serving), the runs that add to one output folder (cxr.cluster)."""
    if not is_local_path(str(model)):
        return str(model)
    digest = hashlib.sha256()
    for name in INFERENCE_FILES:
        path = Path(model).expanduser() / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with path.open("rb") as file:
                for block in iter(lambda file=file: file.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def model_summary(model: str | Path) -> dict:
    """What the model folder says about itself (metrics.json from train_vit.py); empty for a bare checkpoint."""
    return read_metrics(model)


def find_image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus every image file (by suffix) under the folders given, in a stable order."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(
                sorted(path for path in item.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
            )
        else:
            found.append(item)  # a named file is always tried, so a bad one is reported rather than ignored
    return found


def predict_files(
    classifier: Pipeline, paths: list[Path], top_k: int = 3, batch_size: int = 16, progress: bool = True
) -> Iterator[Prediction]:
    """Predictions for many files, a batch at a time, in order, with a progress bar."""
    with tqdm(total=len(paths), unit="image", disable=not progress, desc="Predicting") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield from classify(
                classifier, chunk, top_k=top_k, batch_size=batch_size, names=[str(path) for path in chunk]
            )
            bar.update(len(chunk))


SET_COLUMNS = {level_name(level): f"set_{round(100 * level)}" for level in LEVELS}  # "95%" -> CSV column "set_95"
EMPTY_SET = "(none)"  # a CSV cell for an empty prediction set, unlike "" for no set at all


def prediction_columns(top_k: int = 3) -> list[str]:
    """The columns of the output, in order: file, label_1, score_1, ..., set_90, set_95, ood_score,
    looks_like_chest_xray, error."""
    ranks = [name for rank in range(1, top_k + 1) for name in (f"label_{rank}", f"score_{rank}")]
    return ["file", *ranks, *SET_COLUMNS.values(), "ood_score", "looks_like_chest_xray", "error"]


def prediction_record(prediction: Prediction, top_k: int = 3) -> dict:
    """One row of the output as values (None where the CSV cell is empty): `write_predictions` writes it as CSV text,
    `cxr.cluster` as a Parquet row."""
    record = dict.fromkeys(prediction_columns(top_k))
    record["file"], record["error"] = prediction.source, prediction.error
    for rank, (label, score) in enumerate((prediction.scores or {}).items(), start=1):
        record[f"label_{rank}"], record[f"score_{rank}"] = label, score
    for level, labels in (prediction.prediction_sets or {}).items():
        if level in SET_COLUMNS:
            record[SET_COLUMNS[level]] = "; ".join(labels) or EMPTY_SET
    if prediction.looks_like_chest_xray is not None:
        record["ood_score"], record["looks_like_chest_xray"] = prediction.ood_score, prediction.looks_like_chest_xray
    return record


def write_predictions(predictions: Iterable[Prediction], output: Path, top_k: int = 3) -> tuple[int, int, int]:
    """Write a CSV (one row per file: label_1, score_1, ..., set_90, set_95, ood_score, looks_like_chest_xray, error)
    or, for a .json path, a JSON list with the same fields (`prediction_sets`: {"90%": [labels], "95%": [labels]}).
    `looks_like_chest_xray` is true/false, empty (null) where the file could not be read or the model folder has no
    out-of-distribution statistics. `set_90` / `set_95` hold the conformal prediction set's labels joined by "; "
    (most probable first), "(none)" for an empty set, and stay empty where the model folder has no conformal.json.

    Returns (rows written, rows that carry an error, rows that do not look like a chest X-ray)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        rows = [
            {
                "file": p.source,
                "predictions": [{"label": label, "score": score} for label, score in (p.scores or {}).items()],
                "prediction_sets": p.prediction_sets,
                "ood_score": p.ood_score,
                "looks_like_chest_xray": p.looks_like_chest_xray,
                "error": p.error,
            }
            for p in predictions
        ]
        # the CSV below streams instead: rows written survive an interruption
        write_text_atomic(output, json.dumps(rows, indent=2))
        return (
            len(rows),
            sum(row["error"] is not None for row in rows),
            sum(row["looks_like_chest_xray"] is False for row in rows),
        )
    count = failed = flagged = 0
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=prediction_columns(top_k))  # None is written as an empty cell
        writer.writeheader()
        for prediction in predictions:
            row = prediction_record(prediction, top_k)
            for rank in range(1, top_k + 1):
                if row[f"score_{rank}"] is not None:
                    row[f"score_{rank}"] = f"{row[f'score_{rank}']:.6f}"
            if row["looks_like_chest_xray"] is not None:
                row["ood_score"] = f"{row['ood_score']:.6g}"
                row["looks_like_chest_xray"] = str(row["looks_like_chest_xray"]).lower()
            writer.writerow(row)
            handle.flush()  # rows already written survive an interruption
            count += 1
            failed += prediction.error is not None
            flagged += prediction.looks_like_chest_xray is False
    return count, failed, flagged
