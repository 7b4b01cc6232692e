"""Evaluation figures and plots, offline.

The figures come through `evaluate`, from the metric module that ships in this repository
(`metrics/xray_classification/`, an `evaluate.Metric` that could be published to the Hub as it is): `evaluate.load`
reads a local folder without the network. Besides the usual 3-class figures, the clinical pair is reported:
sensitivity and specificity of "pneumonia (bacterial or viral) vs normal". Plots are drawn with matplotlib.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

METRIC_DIR = (
    Path(__file__).resolve().parent.parent / "metrics" / "xray_classification"
)  # the evaluate module, shipped in the repo
_METRIC = None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def load_metric():
    """The project's `evaluate` metric (figures from class probabilities and labels), loaded once from its folder in the
    repository. An absolute path to an existing folder: `evaluate` imports the script from it and never asks the Hub."""
    global _METRIC
    if _METRIC is None:
        import evaluate  # imported here: the app and predictor never need it

        # in memory: no cache files, no locks between runs
        _METRIC = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    return _METRIC


def expected_calibration_error(labels, probabilities, bins: int = 15) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by bin size (the metric
    module's own function, so the card's and the calibration report's figures are one computation)."""
    return sys.modules[type(load_metric()).__module__].expected_calibration_error(labels, probabilities, bins)


def classification_metrics(
    labels, probabilities, class_keys: list[str], normal_key: str = "normal"
) -> dict[str, float]:
    """All figures for one evaluation, through the `evaluate` metric. `class_keys[i]` names class id i
    (e.g. "viral_pneumonia")."""
    return load_metric().compute(
        predictions=np.asarray(probabilities, dtype=np.float64),
        references=np.asarray(labels),
        class_names=list(class_keys),
        normal_class=normal_key,
    )


def trainer_metrics(class_keys: list[str]):
    """A `compute_metrics` function for `transformers.Trainer`."""

    def compute_metrics(eval_prediction):
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return classification_metrics(eval_prediction.label_ids, softmax(logits), class_keys)

    return compute_metrics


def plot_confusion_matrix(labels, predictions, display_names: list[str], path: Path, title: str) -> None:
    matrix = confusion_matrix(labels, predictions, labels=list(range(len(display_names))))
    figure, axis = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    ConfusionMatrixDisplay(matrix, display_labels=display_names).plot(ax=axis, cmap="Blues", colorbar=False)
    axis.set_title(title)
    plt.setp(axis.get_xticklabels(), rotation=20, ha="right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_training_curves(log_history: list[dict], path: Path) -> None:
    """Training loss, validation loss and validation macro-F1 against epoch, from `trainer.state.log_history`."""
    train = [(entry["epoch"], entry["loss"]) for entry in log_history if "loss" in entry and "epoch" in entry]
    evals = [entry for entry in log_history if "eval_loss" in entry and "epoch" in entry]
    figure, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    if train:
        loss_axis.plot(*zip(*train, strict=True), label="training loss", alpha=0.8)
    if evals:
        loss_axis.plot([e["epoch"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss")
        f1_axis.plot(
            [e["epoch"] for e in evals], [e.get("eval_macro_f1", np.nan) for e in evals], "o-", label="macro-F1"
        )
        f1_axis.plot(
            [e["epoch"] for e in evals], [e.get("eval_accuracy", np.nan) for e in evals], "s--", label="accuracy"
        )
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    f1_axis.set(xlabel="epoch", ylim=(0, 1), title="Validation")
    for axis in (loss_axis, f1_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
