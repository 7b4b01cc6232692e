"""Chest X-ray classification metrics as an `evaluate` module: the figures train_vit.py reports, from class
probabilities and true labels.

Self-contained (numpy and scikit-learn only), so the same file can be published to the Hub as a metric Space.
The project loads it from this folder, which needs no network: `evaluate.load("metrics/xray_classification")`.

Besides the usual multi-class figures (accuracy, macro-F1, per-class precision/recall/F1/support, one-vs-rest
ROC-AUC), it reports the clinical pair, sensitivity and specificity of "pneumonia (any non-normal class) vs
normal", and the expected calibration error of the probabilities.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, roc_auc_score

_DESCRIPTION = """Multi-class image classification figures for pediatric chest X-rays (normal / bacterial / viral
pneumonia, or any class list with one normal class): accuracy, macro-F1, per-class precision, recall, F1 and
support, one-vs-rest macro ROC-AUC (left out when a class is missing from the references), pneumonia-vs-normal
sensitivity, specificity and accuracy, and expected calibration error (15 equal-width confidence bins)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class probabilities, one row per image (rows sum to 1).
    references (`list` of `int`): the true class id of each image.
    class_names (`list` of `str`): the name of each class id, e.g. ["bacterial_pneumonia", "normal", "viral_pneumonia"];
        per-class figures are keyed `precision_<name>`, `recall_<name>`, `f1_<name>`, `support_<name>`.
    normal_class (`str`, default "normal"): the class that is "not pneumonia"; every other class counts as pneumonia.
    calibration_bins (`int`, default 15): confidence bins of the expected calibration error.
Returns:
    `dict` of figures: accuracy, macro_f1, precision_/recall_/f1_/support_<name>, roc_auc_ovr (when every class occurs),
    pneumonia_sensitivity (when a pneumonia image occurs), pneumonia_specificity (when a normal image occurs),
    pneumonia_accuracy, expected_calibration_error. Supports are ints, every other figure a float.
Example:
    >>> metric = evaluate.load("metrics/xray_classification")
    >>> metric.compute(predictions=[[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]], references=[0, 1],
    ...                class_names=["bacterial_pneumonia", "normal", "viral_pneumonia"])["accuracy"]
    1.0
"""

_CITATION = """@article{kermany2018identifying,
  title={Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author={Kermany, Daniel S. and Goldbaum, Michael and Cai, Wenjia and others},
  journal={Cell}, volume={172}, number={5}, pages={1122--1131}, year={2018}
}"""


def expected_calibration_error(labels, probabilities, bins: int = 15) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by bin size."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class XrayClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://doi.org/10.17632/rscbjbr9sj.2"],
        )

    def _compute(self, predictions, references, class_names, normal_class: str = "normal", calibration_bins: int = 15):
        labels = np.asarray(references)
        probabilities = np.asarray(predictions, dtype=np.float64)
        predicted = probabilities.argmax(axis=1)
        class_ids = list(range(len(class_names)))
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predicted, labels=class_ids, zero_division=0
        )
        metrics = {
            "accuracy": accuracy_score(labels, predicted),
            "macro_f1": f1_score(labels, predicted, labels=class_ids, average="macro", zero_division=0),
        }
        for name, p, r, f, n in zip(class_names, precision, recall, f1, support, strict=True):
            metrics.update({f"precision_{name}": p, f"recall_{name}": r, f"f1_{name}": f, f"support_{name}": int(n)})

        # One-vs-rest ROC-AUC is undefined when a class is missing from the labels (tiny evaluation sets).
        if len(np.unique(labels)) == len(class_names):
            metrics["roc_auc_ovr"] = roc_auc_score(labels, probabilities, multi_class="ovr", labels=class_ids)

        normal_id = list(class_names).index(normal_class)
        is_pneumonia = labels != normal_id
        called_pneumonia = predicted != normal_id
        if is_pneumonia.any():
            metrics["pneumonia_sensitivity"] = float((called_pneumonia & is_pneumonia).sum() / is_pneumonia.sum())
        if (~is_pneumonia).any():
            metrics["pneumonia_specificity"] = float((~called_pneumonia & ~is_pneumonia).sum() / (~is_pneumonia).sum())
        metrics["pneumonia_accuracy"] = float((called_pneumonia == is_pneumonia).mean())
        metrics["expected_calibration_error"] = expected_calibration_error(labels, probabilities, calibration_bins)
        return {key: value if isinstance(value, int) else float(value) for key, value in metrics.items()}
