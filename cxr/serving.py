"""The model on a server of its own (serve.py, Ray Serve) and the app's client for it (`app.py --backend URL`).

    python serve.py --model models/swiftformer-xray --port 8000                        # replicas, batched requests
    python app.py --model models/swiftformer-xray --backend http://127.0.0.1:8000/     # the page; the model there

The app keeps everything but the forward pass: it decodes the upload (the project's loader, in its workers), shows the
preview, runs the model folder's image processor, words the errors and draws the overlay. Between the two:

    request  POST to the URL; body: one image's `pixel_values` (the processor's output, float32, channels x height x
             width) as a .npy array, never a pickle
    answer   JSON {"scores": {label: probability, best first}, "ood_score", "looks_like_chest_xray",
             "prediction_sets", "saliency": the Grad-CAM grid, "fingerprint": the served model's, "batch": how
             many requests its forward pass answered}; or an HTTP error whose body is a plain-text reason

The server runs `cxr.predictor.classify_pixels` on the requests it gathers into one batch, which is what the app runs
in process, so the answers are the same; an answer from a model other than the page's (`model_fingerprint`) is
refused. A server that is down, busy or slow becomes a message for the user (`Prediction.error`), within
BACKEND_TIMEOUT seconds.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from transformers import AutoImageProcessor

from cxr.conformal import PredictionSets
from cxr.models import is_local_path
from cxr.ood import OodDetector
from cxr.predictor import (
    TRAIN_HINT,
    ModelNotFoundError,
    Prediction,
    load_ood_detector,
    load_prediction_sets,
    model_fingerprint,
)

BACKEND_TIMEOUT = 30.0  # seconds an answer may take before the user is told the model server is too slow
# Predictions the app runs at once with a backend: enough waiting requests for the server to fill a batch
# (serve.py's --max_batch_size); the decodes still take the app's decode workers one at a time.
BACKEND_CONCURRENCY_LIMIT = 16
MAX_REQUEST_BYTES = 16 * 2**20  # a .npy body larger than this is refused unread (224 x 224 x 3 float32: 0.6 MiB)


def encode_pixels(pixel_values: torch.Tensor) -> bytes:
    """One image's processed pixels as a request body (.npy, float32)."""
    buffer = io.BytesIO()
    np.save(buffer, pixel_values.detach().cpu().numpy().astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_pixels(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """A request body back into pixels of the `shape` the served model's processor gives, or ValueError saying why
    not (the server answers it as a 400 with that reason)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(f"the request holds {len(body):,} bytes; the limit is {MAX_REQUEST_BYTES:,}")
    try:
        pixels = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"the request is not a .npy array ({error})") from error
    if pixels.dtype != np.float32 or pixels.shape != tuple(shape) or not np.isfinite(pixels).all():
        raise ValueError(
            f"the request holds {pixels.dtype} pixels of shape {pixels.shape}; this model takes finite float32 "
            f"pixels of shape {tuple(shape)} (is the app's --model the folder the server serves?)"
        )
    return pixels


def answer_of(prediction: Prediction, fingerprint: str) -> dict:
    """A server's JSON answer for one prediction."""
    return {
        "scores": prediction.scores,
        "ood_score": prediction.ood_score,
        "looks_like_chest_xray": prediction.looks_like_chest_xray,
        "prediction_sets": prediction.prediction_sets,
        "saliency": None if prediction.saliency is None else prediction.saliency.tolist(),
        "fingerprint": fingerprint,
    }


def prediction_of(answer: dict, name: str, top_k: int, saliency: bool) -> Prediction:
    """The Prediction an answer stands for, as `classify` would have made it in process."""
    scores = {str(label): float(score) for label, score in list(answer["scores"].items())[:top_k]}
    if not scores or not all(math.isfinite(score) for score in scores.values()):
        raise ValueError("no probabilities")
    return Prediction(
        source=name,
        scores=scores,
        ood_score=None if answer["ood_score"] is None else float(answer["ood_score"]),
        looks_like_chest_xray=answer["looks_like_chest_xray"],
        prediction_sets=answer["prediction_sets"],
        saliency=np.asarray(answer["saliency"], dtype=np.float32) if saliency and answer["saliency"] else None,
    )


@dataclass
class ServeBackend:
    """The client: each image of a batch is sent as its own request (the server batches them with other users')."""

    url: str
    fingerprint: str  # the page's model; an answer from another is refused
    timeout: float = BACKEND_TIMEOUT

    def __post_init__(self):
        self.client = httpx.Client(timeout=self.timeout)  # one connection pool for every request of the app

    def classify_pixels(
        self, pixel_values: torch.Tensor, names: list[str], top_k: int = 3, saliency: bool = False
    ) -> list[Prediction]:
        pairs = zip(pixel_values, names, strict=True)
        return [self.classify_one(pixels, name, top_k, saliency) for pixels, name in pairs]

    def classify_one(self, pixels: torch.Tensor, name: str, top_k: int, saliency: bool) -> Prediction:
        try:
            response = self.client.post(self.url, content=encode_pixels(pixels))
        except httpx.TimeoutException:
            return Prediction(
                source=name,
                error=f"The model server at {self.url} did not answer within {self.timeout:g} s (busy or stuck); "
                "try again in a moment.",
            )
        except httpx.HTTPError as error:
            return Prediction(
                source=name,
                error=f"The model server at {self.url} cannot be reached ({type(error).__name__}); is serve.py "
                "running? Try again later.",
            )
        if response.status_code == 503:
            return Prediction(source=name, error=f"The model server at {self.url} is busy; try again in a moment.")
        if response.status_code != 200:
            return Prediction(
                source=name,
                error=f"The model server at {self.url} refused the image (HTTP {response.status_code}: "
                f"{response.text[:300]}).",
            )
        try:
            answer = response.json()
            if answer["fingerprint"] != self.fingerprint:
                return Prediction(
                    source=name,
                    error=f"The model server at {self.url} serves another model than this page's: start serve.py and "
                    "app.py with the same --model.",
                )
            return prediction_of(answer, name, top_k, saliency)
        except (ValueError, KeyError, TypeError, AttributeError):
            return Prediction(source=name, error=f"The model server at {self.url} answered out of protocol.")


@dataclass
class BackendClassifier:
    """What the app reads of a model folder when a server runs the model: the image processor (the pixels it sends),
    the chest X-ray check and the prediction sets (their thresholds, which the page shows), and the server."""

    image_processor: object
    ood_detector: OodDetector | None
    prediction_sets: PredictionSets | None
    backend: ServeBackend


def load_backend_classifier(model: str, url: str, timeout: float = BACKEND_TIMEOUT) -> BackendClassifier:
    """`model`'s processor and thresholds, with `url` (a server started by serve.py on the same model) to run it."""
    local = is_local_path(model)
    if local and not (Path(model).expanduser() / "config.json").is_file():
        raise ModelNotFoundError(f"No trained model at '{model}' (no config.json there).\n{TRAIN_HINT}")
    try:
        processor = AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"Could not load the model '{model}': {error}\n{TRAIN_HINT}") from error
    return BackendClassifier(
        image_processor=processor,
        ood_detector=load_ood_detector(model, local),
        prediction_sets=load_prediction_sets(model, local),
        backend=ServeBackend(url, model_fingerprint(model), timeout),
    )
