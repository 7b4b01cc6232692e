"""The chest X-ray check: does an image look like the pediatric chest X-rays the model was trained on?

The penultimate features of the training images give one mean per class and a shared covariance (Ledoit-Wolf
shrinkage). An image's score is the squared Mahalanobis distance of its features to the nearest class mean; the
threshold accepts ACCEPT_RATE of the patient-grouped validation X-rays, and anything above it is flagged as "does not
look like a pediatric chest X-ray". The statistics are saved beside the weights (`ood.safetensors`), and
`cxr.predictor.load_classifier` loads them with the model, so the app, the batch predictor and
`cxr.predictor.classify` give the same verdict (plain `pipeline()` cannot: it returns no features).

Four candidate scores are fitted and thresholded, and `benchmarks/ood.py` compares them: `mahalanobis` (the
default) reads the last encoder block's CLS token and mean patch token, before the final layernorm (for a
convolutional network, the last stage's feature map: mean and standard deviation per channel); `mahalanobis_cls`
the vector the head reads (the final-layernormed CLS token; a CNN's pooled vector); `energy` and `max_softmax`
only the logits. How they compared, and why the threshold accepts 97 % rather than 95 %: docs/reliability.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from cxr.metrics import softmax

OOD_FILE = "ood.safetensors"
ACCEPT_RATE = (
    0.97  # share of validation X-rays let through: full-resolution uploads score higher than the 224 px copies
)
SCORES = (
    "mahalanobis",
    "mahalanobis_cls",
    "energy",
    "max_softmax",
)  # candidate out-of-distribution scores; higher = less like the training X-rays
DEFAULT_SCORE = "mahalanobis"


def mahalanobis_score(features: np.ndarray, class_means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean (shared covariance)."""
    features = np.asarray(features, dtype=np.float64)
    centered = features[:, None, :] - class_means[None, :, :]  # (images, classes, features)
    distances = ((centered @ precision) * centered).sum(axis=-1)
    return distances.min(axis=1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Free energy -logsumexp(logits) (Liu et al. 2020): high where no class has a large logit."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=1)
    return -(peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1)))


def max_softmax_score(logits: np.ndarray) -> np.ndarray:
    """Minus the top probability (Hendrycks & Gimpel 2017): high where the model is unsure."""
    return -softmax(np.asarray(logits, dtype=np.float64)).max(axis=1)


def accept_threshold(scores: np.ndarray, accept_rate: float = ACCEPT_RATE) -> float:
    """The score up to which `accept_rate` of these (in-distribution) scores lie: halfway between the last one
    accepted and the first one flagged, so float noise in a recomputed score (another batch size, float32
    statistics) does not flip the image at the boundary. Where all are accepted (small sets), a little above the
    largest."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    accepted = min(len(ordered), int(np.ceil(accept_rate * len(ordered))))
    if accepted == len(ordered):
        return float(ordered[-1] + 1e-3 * (ordered[-1] - ordered[0]) + 1e-9)
    return float((ordered[accepted - 1] + ordered[accepted]) / 2)


# Which features each Mahalanobis score reads (see `forward_features`).
MAHALANOBIS_FEATURES = {"mahalanobis": "tokens", "mahalanobis_cls": "cls"}


@dataclass
class OodDetector:
    """Training-split feature statistics, and the ACCEPT_RATE threshold of every candidate score.

    `class_means[kind]` is (classes, features) and `precision[kind]` the inverse of the shared, shrunk covariance,
    for each feature kind of `forward_features` ("tokens", "cls"). `score_name` is the score that decides."""

    class_means: dict[str, np.ndarray]
    precision: dict[str, np.ndarray]
    thresholds: dict[str, float]  # score name -> largest score still accepted
    score_name: str = DEFAULT_SCORE

    @classmethod
    def fit(
        cls,
        train: dict[str, np.ndarray],
        train_labels: np.ndarray,
        validation: dict[str, np.ndarray],
        score_name: str = DEFAULT_SCORE,
    ) -> OodDetector:
        """Class means and Ledoit-Wolf precision from `train`, thresholds from `validation` (both `forward_features`
        outputs)."""
        from sklearn.covariance import LedoitWolf

        classes = np.unique(train_labels)
        class_means, precision = {}, {}
        for kind in MAHALANOBIS_FEATURES.values():
            features = np.asarray(train[kind], dtype=np.float64)
            class_means[kind] = np.stack([features[train_labels == label].mean(axis=0) for label in classes])
            centered = features - class_means[kind][np.searchsorted(classes, train_labels)]
            precision[kind] = LedoitWolf(assume_centered=True).fit(centered).precision_
        detector = cls(class_means, precision, thresholds={}, score_name=score_name)
        detector.fit_thresholds(validation)
        return detector

    def fit_thresholds(self, outputs: dict) -> None:
        """Set every score's threshold to accept ACCEPT_RATE of these X-rays (`forward_features` outputs): the
        validation split after training, a site's own X-rays at recalibration (the statistics stay the training
        split's)."""
        self.thresholds = {name: accept_threshold(values) for name, values in self.scores(outputs).items()}

    def scores(self, outputs: dict) -> dict[str, np.ndarray]:
        """Every candidate score for a batch of `forward_features` outputs; higher means less like the training
        X-rays."""
        scores = {
            name: mahalanobis_score(_numpy(outputs[kind]), self.class_means[kind], self.precision[kind])
            for name, kind in MAHALANOBIS_FEATURES.items()
        }
        logits = _numpy(outputs["logits"])
        return scores | {"energy": energy_score(logits), "max_softmax": max_softmax_score(logits)}

    def check(self, outputs: dict) -> tuple[np.ndarray, np.ndarray]:
        """(score, looks like a chest X-ray) per image, by the chosen score and its threshold."""
        score = self.scores(outputs)[self.score_name]
        return score, score <= self.threshold

    @property
    def threshold(self) -> float:
        return self.thresholds[self.score_name]

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / OOD_FILE
        tensors = {f"{kind}.class_means": value.astype(np.float32) for kind, value in self.class_means.items()}
        tensors |= {f"{kind}.precision": value.astype(np.float32) for kind, value in self.precision.items()}
        metadata = {
            "score": self.score_name,
            "thresholds": json.dumps(self.thresholds),
            "accept_rate": str(ACCEPT_RATE),
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OodDetector:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key).astype(np.float64) for key in handle.keys()}
        kinds = sorted({key.split(".")[0] for key in tensors})
        return cls(
            class_means={kind: tensors[f"{kind}.class_means"] for kind in kinds},
            precision={kind: tensors[f"{kind}.precision"] for kind in kinds},
            thresholds=json.loads(metadata["thresholds"]),
            score_name=metadata["score"],
        )


def _numpy(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
