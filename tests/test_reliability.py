"""Knowing when not to answer: calibrated probabilities (the temperature folded into the head) and the flag for
inputs that are not chest X-rays, saved in the model folder and used by every way in."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import app
import calibrate
from cxr.calibration import fit_temperature, fold_temperature
from cxr.features import forward_features
from cxr.metrics import expected_calibration_error, softmax
from cxr.ood import ACCEPT_RATE, OOD_FILE, SCORES, OodDetector, accept_threshold
from cxr.predictor import classify, load_classifier
from cxr.run_record import read_metrics
from helpers import prepared_data


def copy_model(tiny_model_dir, destination, without=()):
    shutil.copytree(tiny_model_dir, destination, ignore=shutil.ignore_patterns("checkpoint-*", *without))
    return destination


def chest_like() -> Image.Image:
    y, x = np.mgrid[0:240, 0:300]
    return Image.fromarray(((np.sin(x / 17.0) + np.cos(y / 11.0) + 2) * 60).astype(np.uint8), "L").convert("RGB")


def document_page() -> Image.Image:
    page = Image.new("L", (600, 800), 250)
    draw = ImageDraw.Draw(page)
    for line in range(30):
        draw.text((50, 40 + 24 * line), "Patient report: findings, impression, signed and dated.", fill=0, font_size=16)
    return page


rng = np.random.default_rng(0)
NOT_XRAYS = {
    "colour noise": Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)),
    "grey noise": Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)),
    "flat grey": Image.new("L", (256, 256), 128),
    "flat white": Image.new("RGB", (256, 256), (255, 255, 255)),
    "colour gradient": Image.fromarray(
        np.stack([*np.meshgrid(np.arange(256), np.arange(256)), np.full((256, 256), 90)], -1).astype(np.uint8)
    ),
    "document page": document_page(),
}


# ---- temperature scaling -----------------------------------------------------------------------------------


def test_fit_temperature_recovers_a_known_temperature_and_lowers_the_calibration_error():
    generator = np.random.default_rng(0)
    true_logits = generator.normal(0.0, 1.5, (4000, 3))
    # drawn from the true probabilities
    labels = (generator.random(4000)[:, None] > np.cumsum(softmax(true_logits), axis=1)).sum(axis=1)
    overconfident = true_logits * 2.5  # a model whose logits are 2.5 times too large
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.5, rel=0.08)
    before = expected_calibration_error(labels, softmax(overconfident))
    after = expected_calibration_error(labels, softmax(overconfident / temperature))
    assert after < before / 3 and after < 0.03
    assert fit_temperature(true_logits * 0.5, labels) == pytest.approx(0.5, rel=0.08)  # underconfident: T < 1


def test_folding_the_temperature_makes_plain_pipeline_give_softmax_of_logits_over_t(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    model = AutoModelForImageClassification.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    logits = forward_features(model, processor(chest_like(), return_tensors="pt")["pixel_values"])["logits"].numpy()
    already = model.config.calibration_temperature

    fold_temperature(model, 2.0)
    model.save_pretrained(folder)
    result = pipeline("image-classification", model=str(folder))(chest_like(), top_k=3)
    expected = softmax(logits / 2.0)[0]
    for item in result:
        assert item["score"] == pytest.approx(expected[model.config.label2id[item["label"]]], abs=1e-6)
    assert json.loads((folder / "config.json").read_text())["calibration_temperature"] == pytest.approx(already * 2.0)


def test_a_fresh_model_folder_is_calibrated_and_says_so(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    metrics = read_metrics(tiny_model_dir)
    calibration = metrics["calibration"]
    assert config["calibration_temperature"] == pytest.approx(calibration["temperature"])
    for split in ("validation", "test"):
        assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(calibration["by_split"][split])
        assert metrics[split]["expected_calibration_error"] == pytest.approx(
            calibration["by_split"][split]["ece_after"], abs=1e-6
        )
    validation = calibration["by_split"]["validation"]
    assert validation["nll_after"] <= validation["nll_before"] + 1e-9  # T minimises it there
    card = (tiny_model_dir / "README.md").read_text()
    assert "Calibration and out-of-distribution check" in card and f"T = {calibration['temperature']:.3f}" in card
    assert f"{calibration['by_split']['test']['ece_after']:.4f}" in card
    assert (tiny_model_dir / OOD_FILE).is_file() and metrics["ood"]["file"] == OOD_FILE


# ---- the out-of-distribution statistics --------------------------------------------------------------------


def test_accept_threshold_lets_through_the_asked_share():
    scores = np.random.default_rng(1).normal(size=522)
    assert (scores <= accept_threshold(scores)).mean() == pytest.approx(ACCEPT_RATE, abs=0.002)
    assert (scores <= accept_threshold(scores, 0.95)).mean() == pytest.approx(0.95, abs=0.002)
    few = np.array([3.0, 1.0, 2.0])
    assert (few <= accept_threshold(few)).all()  # fewer than 20: all of them


def test_detector_flags_points_far_from_every_class():
    generator = np.random.default_rng(2)
    centres = generator.normal(0, 5, (3, 6))

    def sample(count):
        labels = generator.integers(0, 3, count)
        features = centres[labels] + generator.normal(0, 1, (count, 6))
        return {"tokens": features, "cls": features[:, :3], "logits": generator.normal(size=(count, 3))}, labels

    train, train_labels = sample(600)
    validation, _ = sample(400)
    detector = OodDetector.fit(train, train_labels, validation)
    assert detector.check(validation)[1].mean() == pytest.approx(ACCEPT_RATE, abs=0.003)
    far = {key: value[:5] + (20.0 if key != "logits" else 0.0) for key, value in validation.items()}
    score, accepted = detector.check(far)
    assert not accepted.any() and (score > detector.threshold).all()


def test_ood_statistics_are_saved_beside_the_weights_and_reloaded(tiny_model_dir, tmp_path):
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    detector = OodDetector.load(tiny_model_dir / OOD_FILE)
    assert detector.class_means["tokens"].shape == (3, 2 * hidden) and detector.class_means["cls"].shape == (3, hidden)
    precision = detector.precision["tokens"]
    assert precision == pytest.approx(precision.T, abs=1e-5) and np.linalg.eigvalsh(precision).min() > 0
    assert set(detector.thresholds) == set(SCORES) and detector.score_name == "mahalanobis"
    assert detector.threshold == pytest.approx(read_metrics(tiny_model_dir)["ood"]["threshold"])

    detector.save(tmp_path)
    again = OodDetector.load(tmp_path / OOD_FILE)
    assert again.thresholds == detector.thresholds and again.score_name == detector.score_name
    assert again.precision["cls"] == pytest.approx(detector.precision["cls"])
    # what the app and predict.py get
    assert load_classifier(tiny_model_dir).ood_detector.thresholds == detector.thresholds


def test_non_xrays_are_flagged_and_validation_images_accepted(tiny_model_dir):
    classifier = load_classifier(tiny_model_dir)
    flagged = classify(classifier, list(NOT_XRAYS.values()), names=list(NOT_XRAYS))
    assert [p.source for p in flagged if p.looks_like_chest_xray is not False] == []
    validation = classify(classifier, sorted((prepared_data(tiny_model_dir) / "validation").rglob("*.png")))
    assert np.mean([p.looks_like_chest_xray for p in validation]) >= 0.8
    # Not a close call: every non-X-ray scores far above the typical (synthetic) X-ray.
    assert min(p.ood_score for p in flagged) > 3 * np.median([p.ood_score for p in validation])


def test_refit_in_place_from_the_command_line_does_not_stack_temperatures(tiny_model_dir, tmp_path, capsys):
    folder = copy_model(tiny_model_dir, tmp_path / "model", without=[OOD_FILE])
    head = AutoModelForImageClassification.from_pretrained(folder).classifier.weight.detach().clone()
    temperature = json.loads((folder / "config.json").read_text())["calibration_temperature"]

    assert calibrate.main([str(folder), "--data_dir", str(prepared_data(tiny_model_dir)), "--batch_size", "32"]) == 0
    assert "Temperature T =" in capsys.readouterr().out
    # The refit starts from the uncalibrated head and sees the same validation logits: same T, same head.
    refitted = AutoModelForImageClassification.from_pretrained(folder)
    assert refitted.config.calibration_temperature == pytest.approx(temperature, rel=1e-3)
    assert refitted.classifier.weight.detach().numpy() == pytest.approx(head.numpy(), rel=1e-3, abs=1e-6)
    assert (folder / OOD_FILE).is_file()
    assert read_metrics(folder)["calibration"]["temperature"] == pytest.approx(temperature, rel=1e-3)
    assert (folder / "README.md").read_text().count(
        "<!-- reliability -->"
    ) == 1  # the card's section replaced, not repeated


def test_the_old_seed_option_still_sets_the_split_seed_without_being_advertised(capsys):
    parse = calibrate.build_parser().parse_args
    assert parse(["model", "--data_dir", "data", "--seed", "7"]).split_seed == 7
    assert parse(["model", "--data_dir", "data", "--split_seed", "7"]).split_seed == 7
    assert parse(["model", "--data_dir", "data"]).split_seed == 42
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = capsys.readouterr().out
    assert "--split_seed" in text and "--seed" not in text.replace("--split_seed", "")


def test_a_folder_without_statistics_still_answers_with_the_flag_left_empty(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "old-model", without=[OOD_FILE])
    classifier = load_classifier(folder)
    assert classifier.ood_detector is None
    [prediction] = classify(classifier, [NOT_XRAYS["colour noise"]])
    assert len(prediction.scores) == 3 and prediction.looks_like_chest_xray is None and prediction.ood_score is None
    path = tmp_path / "noise.png"
    NOT_XRAYS["colour noise"].save(path)
    warning, scores, _, check = app.answer_upload(classifier, str(path))
    assert warning == "" and len(scores) == 3 and check["looks_like_chest_xray"] is None
