"""Prediction sets with a guarantee: class-conditional split-conformal thresholds keep each class's coverage,
are fitted by train_vit.py into the model folder, and show in classify, the batch predictor's CSV/JSON and
metrics.json."""

import csv
import json
import shutil

import numpy as np
import pytest

import predict
from cxr.conformal import CONFORMAL_FILE, PredictionSets, class_threshold, describe_set, held_out_check
from cxr.labels import ID2LABEL
from cxr.metrics import softmax
from cxr.predictor import classify, load_classifier
from cxr.run_record import read_metrics, write_checksums
from helpers import validation_images

NAMES = list(ID2LABEL.values())


def synthetic_scores(count: int, seed: int):
    """Labels and probabilities of a model that finds Normal easy and viral pneumonia hard (unequal classes, as
    here)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    logits = rng.normal(0.0, 1.0, (count, 3))
    logits[np.arange(count), labels] += np.array([1.5, 3.0, 0.5])[labels]
    return softmax(logits), labels


def test_each_class_keeps_its_coverage_on_fresh_draws():
    probabilities, labels = synthetic_scores(2000, seed=0)
    sets = PredictionSets.fit(probabilities, labels, NAMES)
    fresh_probabilities, fresh_labels = synthetic_scores(20000, seed=1)
    report = sets.evaluate(fresh_probabilities, fresh_labels)
    for level, nominal in (("90%", 0.90), ("95%", 0.95)):
        for label, figures in report[level]["by_class"].items():
            assert figures["coverage"] == pytest.approx(nominal, abs=0.025), (level, label)
        # The hard class pays with larger sets, the easy one gets small ones.
        by_class = report[level]["by_class"]
        assert by_class["Normal"]["mean_set_size"] < by_class["Viral pneumonia"]["mean_set_size"]
    assert report["95%"]["mean_set_size"] > report["90%"]["mean_set_size"]
    # The half-split check on the calibration images themselves says the same (grouped: three images per child).
    check = held_out_check(probabilities, labels, [str(index // 3) for index in range(2000)], NAMES)
    assert all(figures["coverage"] == pytest.approx(0.95, abs=0.03) for figures in check["95%"]["by_class"].values())


def test_threshold_is_the_finite_sample_quantile():
    probabilities = np.linspace(0.1, 0.9, 9)  # scores 1 - p: 0.1 .. 0.9
    # 90 % of n = 9: rank ceil(10 * 0.9) = 9, the largest score 0.9 -> minimum probability 0.1
    # (not the 8th, as n * 0.9 would give).
    assert class_threshold(probabilities, 0.90) == pytest.approx(0.1)
    assert class_threshold(probabilities, 0.80) == pytest.approx(0.2)  # rank ceil(10 * 0.8) = 8
    # rank 6 of 5: too few images, the class is always in the set
    assert class_threshold(probabilities[:5], 0.95) == 0.0


def test_the_line_beside_the_bars():
    assert describe_set(["Bacterial pneumonia", "Viral pneumonia"]) == "95% set: bacterial or viral pneumonia"
    assert describe_set(["Normal"]) == "95% set: normal"
    assert describe_set(["Viral pneumonia", "Normal"]) == "95% set: viral pneumonia or normal"
    assert describe_set(NAMES, "90%") == "90% set: bacterial pneumonia, normal or viral pneumonia"
    assert describe_set([]).startswith("95% set: empty") and describe_set(None) == ""


def test_train_vit_stores_the_thresholds_and_their_coverage(tiny_model_dir):
    stored = json.loads((tiny_model_dir / CONFORMAL_FILE).read_text())
    assert stored["labels"] == [
        json.loads((tiny_model_dir / "config.json").read_text())["id2label"][str(index)] for index in range(3)
    ]
    assert set(stored["min_probability"]) == {"90%", "95%"} and all(
        len(values) == 3 for values in stored["min_probability"].values()
    )
    metrics = read_metrics(tiny_model_dir)["prediction_sets"]
    assert metrics["min_probability"] == stored["min_probability"]
    for report in (metrics["validation_held_out_children"], metrics["by_split"]["test"]):
        for level in ("90%", "95%"):
            assert 0.0 <= report[level]["coverage"] <= 1.0 and 0.0 <= report[level]["mean_set_size"] <= 3.0
            assert set(report[level]["by_class"]) == set(NAMES)
    assert load_classifier(tiny_model_dir).prediction_sets.thresholds == stored["min_probability"]
    card = (tiny_model_dir / "README.md").read_text()
    held_out = metrics["by_split"]["test"]["95%"]
    assert (
        "**Prediction sets.**" in card
        and f"| test | 95% | {held_out['coverage']:.3f} | {held_out['mean_set_size']:.2f} |" in card
    )


@pytest.fixture
def model_with_sets(tiny_model_dir, tmp_path):
    """A copy of the tiny model folder whose thresholds split its answers (the tiny model's own, fitted on a handful
    of synthetic images, put every label in every set)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    PredictionSets(NAMES, {"90%": [0.4, 0.4, 0.4], "95%": [0.25, 0.3, 0.2]}).save(folder)
    write_checksums(folder)  # as every writer of a model folder does, last
    return folder


def xrays(tiny_model_dir):
    return validation_images(tiny_model_dir)[:8]


def test_classify_gives_the_sets_from_the_folders_thresholds(model_with_sets, tiny_model_dir):
    predictions = classify(load_classifier(model_with_sets), xrays(tiny_model_dir))
    minimum = {
        "90%": dict(zip(NAMES, [0.4, 0.4, 0.4], strict=True)),
        "95%": dict(zip(NAMES, [0.25, 0.3, 0.2], strict=True)),
    }
    sizes = set()
    for prediction in predictions:
        for level, labels in prediction.prediction_sets.items():
            # scores: best first
            expected = [label for label, score in prediction.scores.items() if score >= minimum[level][label]]
            assert labels == expected
            sizes.add(len(labels))
        assert prediction.prediction_set == prediction.prediction_sets["95%"]
        assert prediction.prediction_set_line == describe_set(prediction.prediction_sets["95%"])
    assert len(sizes) > 1  # the thresholds really split the answers


def test_batch_predictor_writes_the_sets(model_with_sets, tiny_model_dir, tmp_path):
    files = [str(path) for path in xrays(tiny_model_dir)[:4]]
    predictions = {p.source: p.prediction_sets for p in classify(load_classifier(model_with_sets), files)}
    assert predict.main([*files, "--model", str(model_with_sets), "--output", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0])[-5:] == ["set_90", "set_95", "ood_score", "looks_like_chest_xray", "error"]
    for row in rows:
        for column, level in (("set_90", "90%"), ("set_95", "95%")):
            assert row[column] == ("; ".join(predictions[row["file"]][level]) or "(none)")
    assert predict.main([*files, "--model", str(model_with_sets), "--output", str(tmp_path / "p.json")]) == 0
    assert {row["file"]: row["prediction_sets"] for row in json.loads((tmp_path / "p.json").read_text())} == predictions


def test_a_folder_without_thresholds_leaves_the_sets_empty_and_says_why(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "old-model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*", CONFORMAL_FILE))
    [prediction] = classify(load_classifier(folder), xrays(tiny_model_dir)[:1])
    assert (
        prediction.prediction_sets is None
        and prediction.prediction_set is None
        and prediction.prediction_set_line == ""
    )
    assert (
        predict.main([str(xrays(tiny_model_dir)[0]), "--model", str(folder), "--output", str(tmp_path / "p.csv")]) == 0
    )
    assert "conformal.json" in capsys.readouterr().err
    [row] = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert row["label_1"] and row["set_90"] == row["set_95"] == ""
