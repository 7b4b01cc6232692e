"""Prediction sets with a stated coverage: class-conditional split-conformal prediction on the calibrated probabilities.

Three probabilities do not say how sure to be; a set of labels that contains the true one for 95 % of X-rays of
each class does. Method: class-conditional ("Mondrian") split-conformal prediction (Vovk et al. 2005,
*Algorithmic Learning in a Random World*, Mondrian conformal predictors; Vovk 2012, *Conditional validity of
inductive conformal predictors*), in the form of Angelopoulos & Bates 2021, *A Gentle Introduction to Conformal
Prediction and Distribution-Free Uncertainty Quantification*, section 4.2 (class-conditional conformal prediction),
with the score 1 - (calibrated probability of the class) (Sadinle, Lei & Wasserman 2019, class-specific sets):

- for each class k, take the n_k validation images of that class and their scores s_i = 1 - p_k(x_i);
- the threshold q_k is the ceil((n_k + 1)(1 - alpha))-th smallest of them (the finite-sample quantile
  ceil((n_k + 1)(1 - alpha)) / n_k); where that rank exceeds n_k, class k is always in the set;
- an image's set holds every class k with 1 - p_k(x) <= q_k, i.e. p_k(x) >= 1 - q_k (stored as that minimum
  probability per class).

Guarantee: for a new image of class k exchangeable with the validation images of class k, P(k in set) >= 1 - alpha,
for each class separately (not only on average over classes), whatever the model. It says nothing about images
unlike the validation X-rays (the out-of-distribution check covers those), and a set may be empty (no label is
probable enough for its class's threshold) or hold all three. The temperature is fitted on the same validation
images; it is one monotone parameter, so the thresholds still rank the same scores, but strictly the guarantee
holds for data the fit did not see: `summary` measures it on validation children held out from the fit and on
the test split.

Why not a library: MAPIE 1.6 has no class-conditional classifier in its API and stores fitted objects as pickles;
crepes 0.9 (Mondrian `ConformalClassifier`) keeps every calibration score and computes p-values at prediction time
(and pulls in pandas). Either way the model folder would need more than the thresholds, which are all that
inference needs: `conformal.json` holds them, and `cxr.predictor` applies them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.folders import write_text_atomic

CONFORMAL_FILE = "conformal.json"
LEVELS = (0.90, 0.95)  # coverage levels fitted and stored; the app shows the last


def level_name(level: float) -> str:
    return f"{round(100 * level)}%"


def quantile_rank(images: int, level: float) -> int:
    """The finite-sample quantile's rank among `images` scores: ceil((n + 1) * level)."""
    return math.ceil((images + 1) * level)


def images_needed(level: float) -> int:
    """The fewest images of a class whose scores give that class a threshold at `level` (19 for 95 %, 9 for 90 %);
    with fewer, `class_threshold` can only put the class in every set."""
    images = 1
    while quantile_rank(images, level) > images:
        images += 1
    return images


def class_threshold(probabilities_of_class: np.ndarray, level: float) -> float:
    """The smallest probability of its own class an image may have and still get that class in its set."""
    scores = np.sort(1.0 - np.asarray(probabilities_of_class, dtype=np.float64))
    rank = quantile_rank(len(scores), level)  # finite-sample quantile: the rank-th smallest score
    if rank > len(scores):
        return 0.0  # too few validation images of this class for this level: always in the set
    return float(1.0 - scores[rank - 1])


@dataclass
class PredictionSets:
    """Per-class minimum probabilities (`thresholds[level name][class index]`) fitted on labelled images."""

    labels: list[str]  # class names in the model's id order
    thresholds: dict[str, list[float]]
    fitted_on: dict[str, int] = field(default_factory=dict)  # images per class behind the thresholds

    @classmethod
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray, names: list[str], levels=LEVELS) -> PredictionSets:
        probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
        thresholds = {
            level_name(level): [class_threshold(probabilities[labels == k, k], level) for k in range(len(names))]
            for level in levels
        }
        return cls(list(names), thresholds, {name: int((labels == k).sum()) for k, name in enumerate(names)})

    def members(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """Level name -> boolean (images, classes): which classes are in each image's set."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        return {name: probabilities >= np.asarray(minimum)[None, :] for name, minimum in self.thresholds.items()}

    def sets(self, probabilities: np.ndarray) -> list[dict[str, list[str]]]:
        """Per image: level name -> the labels in its set, most probable first."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        members = self.members(probabilities)
        order = np.argsort(-probabilities, axis=1, kind="stable")
        return [
            {name: [self.labels[k] for k in order[i] if inside[i, k]] for name, inside in members.items()}
            for i in range(len(probabilities))
        ]

    def evaluate(self, probabilities: np.ndarray, labels: np.ndarray) -> dict:
        """Empirical coverage and mean set size, overall and per true class, at each level."""
        return coverage_report(self.members(probabilities), labels, self.labels)

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / CONFORMAL_FILE
        document = {
            "method": "class-conditional split-conformal prediction (Mondrian; Angelopoulos & Bates 2021, "
            "section 4.2), score 1 - calibrated probability; a label is in the set when its probability is at least "
            "its class's threshold",
            "labels": self.labels,
            "min_probability": self.thresholds,
            "fitted_on_images_per_class": self.fitted_on,
        }
        write_text_atomic(path, json.dumps(document, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PredictionSets:
        document = json.loads(Path(path).read_text())
        return cls(
            document["labels"],
            {name: [float(value) for value in values] for name, values in document["min_probability"].items()},
            document.get("fitted_on_images_per_class", {}),
        )


def coverage_report(members: dict[str, np.ndarray], labels: np.ndarray, names: list[str]) -> dict:
    labels = np.asarray(labels)
    report = {}
    for name, inside in members.items():
        covered, size = inside[np.arange(len(labels)), labels], inside.sum(axis=1)
        by_class = {
            label: {
                "images": int((labels == k).sum()),
                "coverage": _mean(covered[labels == k]),
                "mean_set_size": _mean(size[labels == k]),
            }
            for k, label in enumerate(names)
        }
        report[name] = {
            "images": len(labels),
            "coverage": _mean(covered),
            "mean_set_size": _mean(size),
            "by_class": by_class,
        }
    return report


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def describe_set(labels: list[str] | None, level: str = level_name(LEVELS[-1])) -> str:
    """The line the app shows beside the bars, e.g. "95% set: bacterial or viral pneumonia"; "" without a set."""
    if labels is None:
        return ""
    if not labels:
        return f"{level} set: empty (no label is likely enough; the image may be unlike the training X-rays)"
    words = [label.lower().split() for label in labels]
    last = {parts[-1] for parts in words}
    if len(labels) > 1 and len(last) == 1 and all(len(parts) > 1 for parts in words):  # "bacterial or viral pneumonia"
        names = [" ".join(parts[:-1]) for parts in words]
        return f"{level} set: {_join(names)} {last.pop()}"
    return f"{level} set: {_join([' '.join(parts) for parts in words])}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def held_out_check(
    probabilities: np.ndarray, labels: np.ndarray, groups: list[str], names: list[str], seed: int = 0
) -> dict:
    """Coverage on validation children the thresholds did not see: the children are split in two halves at random,
    thresholds are fitted on one half and measured on the other, and then the other way round; each image is
    scored once, by thresholds fitted without it or its siblings."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    children = sorted(set(groups))
    half = set(np.random.default_rng(seed).permutation(children)[: len(children) // 2].tolist())
    first = np.array([group in half for group in groups])
    members = {}
    for fit_part in (first, ~first):
        fitted = PredictionSets.fit(probabilities[fit_part], labels[fit_part], names)
        for name, inside in fitted.members(probabilities[~fit_part]).items():
            members.setdefault(name, np.zeros(probabilities.shape, dtype=bool))[~fit_part] = inside
    return coverage_report(members, labels, list(names)) | {
        "method": f"fitted on half of the validation children ({int(first.sum())} / {int((~first).sum())} images), "
        "measured on the other half, both ways"
    }
