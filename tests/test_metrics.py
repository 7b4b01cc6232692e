"""Metrics on a known confusion matrix, worked out by hand."""

import numpy as np
import pytest

from cxr.metrics import classification_metrics, expected_calibration_error

CLASSES = ["bacterial_pneumonia", "normal", "viral_pneumonia"]


def _one_hot(predictions, confidence=0.8):
    probabilities = np.full((len(predictions), 3), (1 - confidence) / 2)
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def test_figures_of_a_known_confusion_matrix():
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


def test_calibration_error_is_zero_when_calibrated_and_the_gap_when_overconfident():
    labels = np.array([0, 0, 0, 0, 0])
    # always 80% confident, right 4 times in 5: perfectly calibrated
    calibrated = _one_hot([0, 0, 0, 0, 1], 0.8)
    assert expected_calibration_error(labels, calibrated) == pytest.approx(0.0, abs=1e-9)
    # 100% confident, right 4 times in 5: off by 0.2
    overconfident = _one_hot([0, 0, 0, 0, 1], 1.0)
    assert expected_calibration_error(labels, overconfident) == pytest.approx(0.2)


def _sklearn_figures(labels, probabilities, class_keys, normal_key="normal"):
    """The figures as scikit-learn computes them directly (what cxr.metrics computed before the evaluate module)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

    predictions = probabilities.argmax(axis=1)
    ids = list(range(len(class_keys)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids, zero_division=0)
    figures = {
        "accuracy": accuracy_score(labels, predictions),
        "macro_f1": f1_score(labels, predictions, labels=ids, average="macro", zero_division=0),
    }
    for key, p, r, f, n in zip(class_keys, precision, recall, f1, support, strict=True):
        figures.update({f"precision_{key}": p, f"recall_{key}": r, f"f1_{key}": f, f"support_{key}": int(n)})
    if len(np.unique(labels)) == len(class_keys):
        figures["roc_auc_ovr"] = roc_auc_score(labels, probabilities, multi_class="ovr", labels=ids)
    normal = class_keys.index(normal_key)
    truth, called = labels != normal, predictions != normal
    if truth.any():
        figures["pneumonia_sensitivity"] = (called & truth).sum() / truth.sum()
    if (~truth).any():
        figures["pneumonia_specificity"] = (~called & ~truth).sum() / (~truth).sum()
    figures["pneumonia_accuracy"] = (called == truth).mean()
    confidence, correct = probabilities.max(axis=1), predictions == labels
    edges = np.linspace(0, 1, 16)
    figures["expected_calibration_error"] = sum(
        ((confidence > low) & (confidence <= high)).mean()
        * abs(
            correct[(confidence > low) & (confidence <= high)].mean()
            - confidence[(confidence > low) & (confidence <= high)].mean()
        )
        for low, high in zip(edges[:-1], edges[1:], strict=True)
        if ((confidence > low) & (confidence <= high)).any()
    )
    return figures


@pytest.mark.parametrize("seed", range(6))
def test_the_evaluate_module_gives_the_scikit_learn_figures_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(5, 400))
    labels = rng.integers(0, 3 if seed % 3 else 2, size)  # every third seed: viral missing, so no ROC-AUC
    probabilities = rng.dirichlet(rng.uniform(0.2, 3, 3), size)
    expected = _sklearn_figures(labels, probabilities, CLASSES)
    metrics = classification_metrics(labels, probabilities, CLASSES)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), rel=1e-12, abs=1e-15), key
        assert type(metrics[key]) is (int if key.startswith("support_") else float), key


def test_the_metric_module_loads_from_the_repository_without_the_network(monkeypatch):
    import socket

    import evaluate

    from cxr import metrics as cxr_metrics

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(cxr_metrics, "_METRIC", None)  # load afresh, with the network refused
    metric = cxr_metrics.load_metric()
    assert isinstance(metric, evaluate.Metric) and metric.name == "xray_classification"
    labels = [0, 1, 2, 1]
    assert classification_metrics(labels, _one_hot(labels), CLASSES)["accuracy"] == 1.0
