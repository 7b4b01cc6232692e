"""Evaluation figures and plots, computed offline with scikit-learn and matplotlib.

`evaluate.load(...)` downloads its metric scripts from the Hub, which fails without network, so the
metrics are computed here directly. Besides the usual 3-class figures, the clinical pair is reported:
sensitivity and specificity of "pneumonia (bacterial or viral) vs normal".
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def classification_metrics(labels, probabilities, class_keys: list[str], normal_key: str = "normal") -> dict[str, float]:
    """All figures for one evaluation. `class_keys[i]` names class id i (e.g. "viral_pneumonia")."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = probabilities.argmax(axis=1)
    class_ids = list(range(len(class_keys)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=class_ids, zero_division=0
    )
    metrics = {
        "accuracy": accuracy_score(labels, predictions),
        "macro_f1": f1_score(labels, predictions, labels=class_ids, average="macro", zero_division=0),
    }
    for key, p, r, f, n in zip(class_keys, precision, recall, f1, support):
        metrics.update({f"precision_{key}": p, f"recall_{key}": r, f"f1_{key}": f, f"support_{key}": int(n)})

    # One-vs-rest ROC-AUC is undefined when a class is missing from the labels (tiny evaluation sets).
    if len(np.unique(labels)) == len(class_keys):
        metrics["roc_auc_ovr"] = roc_auc_score(labels, probabilities, multi_class="ovr", labels=class_ids)

    normal_id = class_keys.index(normal_key)
    is_pneumonia = labels != normal_id
    called_pneumonia = predictions != normal_id
    if is_pneumonia.any():
        metrics["pneumonia_sensitivity"] = float((called_pneumonia & is_pneumonia).sum() / is_pneumonia.sum())
    if (~is_pneumonia).any():
        metrics["pneumonia_specificity"] = float((~called_pneumonia & ~is_pneumonia).sum() / (~is_pneumonia).sum())
    metrics["pneumonia_accuracy"] = float((called_pneumonia == is_pneumonia).mean())
    metrics["expected_calibration_error"] = expected_calibration_error(labels, probabilities)
    return {key: float(value) if not isinstance(value, int) else value for key, value in metrics.items()}


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
        loss_axis.plot(*zip(*train), label="training loss", alpha=0.8)
    if evals:
        loss_axis.plot([e["epoch"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss")
        f1_axis.plot([e["epoch"] for e in evals], [e.get("eval_macro_f1", np.nan) for e in evals], "o-", label="macro-F1")
        f1_axis.plot([e["epoch"] for e in evals], [e.get("eval_accuracy", np.nan) for e in evals], "s--", label="accuracy")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    f1_axis.set(xlabel="epoch", ylim=(0, 1), title="Validation")
    for axis in (loss_axis, f1_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
