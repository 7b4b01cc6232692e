"""Metrics on a known confusion matrix, worked out by hand."""

import numpy as np
import pytest

from cxr.metrics import classification_metrics, expected_calibration_error

CLASSES = ["bacterial_pneumonia", "normal", "viral_pneumonia"]


def _one_hot(predictions, confidence=0.8):
    probabilities = np.full((len(predictions), 3), (1 - confidence) / 2)
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def test_known_confusion_matrix():
    # rows: true bacterial (4), normal (4), viral (2)
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    predictions = [0, 0, 0, 2, 1, 1, 1, 0, 2, 0]
    metrics = classification_metrics(labels, _one_hot(predictions), CLASSES)

    assert metrics["accuracy"] == pytest.approx(7 / 10)
    # bacterial: precision 3/5, recall 3/4; normal: 3/3, 3/4; viral: 1/2, 1/2
    assert metrics["precision_bacterial_pneumonia"] == pytest.approx(3 / 5)
    assert metrics["recall_bacterial_pneumonia"] == pytest.approx(3 / 4)
    assert metrics["f1_normal"] == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert metrics["f1_viral_pneumonia"] == pytest.approx(0.5)
    expected_macro = (2 * 0.6 * 0.75 / 1.35 + 2 * 0.75 / 1.75 + 0.5) / 3
    assert metrics["macro_f1"] == pytest.approx(expected_macro)
    # pneumonia vs normal: 6 pneumonia, all called pneumonia; 4 normal, 3 called normal
    assert metrics["pneumonia_sensitivity"] == pytest.approx(1.0)
    assert metrics["pneumonia_specificity"] == pytest.approx(3 / 4)
    assert metrics["pneumonia_accuracy"] == pytest.approx(9 / 10)
    assert metrics["support_viral_pneumonia"] == 2
    assert 0.0 <= metrics["roc_auc_ovr"] <= 1.0


def test_perfect_scores_give_auc_one():
    labels = [0, 1, 2, 0, 1, 2]
    metrics = classification_metrics(labels, _one_hot(labels, 0.9), CLASSES)
    assert metrics["macro_f1"] == 1.0
    assert metrics["roc_auc_ovr"] == 1.0


def test_auc_is_left_out_when_a_class_is_missing():
    metrics = classification_metrics([0, 1, 0, 1], _one_hot([0, 1, 0, 1]), CLASSES)
    assert "roc_auc_ovr" not in metrics


def test_expected_calibration_error():
    labels = np.array([0, 0, 0, 0, 0])
    # always 80% confident, right 4 times in 5: perfectly calibrated
    calibrated = _one_hot([0, 0, 0, 0, 1], 0.8)
    assert expected_calibration_error(labels, calibrated) == pytest.approx(0.0, abs=1e-9)
    # 100% confident, right 4 times in 5: off by 0.2
    overconfident = _one_hot([0, 0, 0, 0, 1], 1.0)
    assert expected_calibration_error(labels, overconfident) == pytest.approx(0.2)
