"""A model at a new site: the site check (site_check.py) and the site recalibration (calibrate.py --site_dir), which
refits the temperature, the prediction sets and the X-ray check's threshold on part of a site's labelled X-rays,
into a new model folder, without retraining."""

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

import calibrate
import site_check
from cxr.conformal import CONFORMAL_FILE, PredictionSets, images_needed
from cxr.metrics import softmax
from cxr.models import SHIPPED_MODEL_DIR
from cxr.ood import ACCEPT_RATE, OodDetector
from cxr.predictor import classify, load_classifier
from cxr.reliability import refit_at_site
from cxr.run_record import read_metrics
from cxr.site import split_by_patient, too_few_images, wilson_interval
from helpers import folder_checksums
from hf_data import make_synthetic_dataset
from hf_data.loading import load_site

# ---- the refit on arrays: a shifted site ------------------------------------------------------------------------


def draw(generator, count: int, strength: np.ndarray, feature_shift: float = 0.0):
    """Logits and features of `count` images: class k's own logit raised by strength[k] above unit noise."""
    labels = generator.integers(0, 3, count)
    logits = generator.normal(0.0, 1.0, (count, 3))
    logits[np.arange(count), labels] += strength[labels]
    features = np.eye(3)[labels] * 4 + generator.normal(0.0, 1.0, (count, 3)) + feature_shift
    return {"logits": logits, "cls": features, "tokens": np.hstack([features, features**2])}, labels


def test_recalibration_restores_the_coverage_a_shifted_site_loses(tiny_model_dir):
    generator = np.random.default_rng(0)
    validation, validation_labels = draw(generator, 3000, np.array([2.5, 2.5, 2.5]))
    train, train_labels = draw(generator, 3000, np.array([2.5, 2.5, 2.5]))
    names = ["Bacterial pneumonia", "Normal", "Viral pneumonia"]
    stored = PredictionSets.fit(softmax(validation["logits"]), validation_labels, names)
    detector = OodDetector.fit(train, train_labels, validation)
    # The site: normal children are harder to tell apart (weaker signal), and every feature has drifted.
    site, site_labels = draw(generator, 4000, np.array([2.5, 1.0, 2.5]), feature_shift=1.2)
    patients = [f"child{index // 2}" for index in range(len(site_labels))]
    fit = split_by_patient(patients, 0.5, seed=0)
    parts = {
        name: ({key: values[chosen].copy() for key, values in site.items()}, site_labels[chosen])
        for name, chosen in (("site fitting part", fit), ("site checking part", ~fit))
    }
    check, check_labels = parts["site checking part"]
    before = stored.evaluate(softmax(check["logits"]), check_labels)["95%"]
    flagged_before = 1 - detector.check(check)[1].mean()
    model = AutoModelForImageClassification.from_pretrained(tiny_model_dir)

    groups = [patient for patient, inside in zip(patients, fit, strict=True) if inside]
    summary = refit_at_site(model, detector, parts, groups, "a shifted synthetic site")

    after = summary["prediction_sets"]["by_split"]["site checking part"]["95%"]
    assert before["by_class"]["Normal"]["coverage"] < 0.85  # the stored sets miss the promise there
    assert after["coverage"] == pytest.approx(0.95, abs=0.02)
    for label in names:
        assert after["by_class"][label]["coverage"] == pytest.approx(0.95, abs=0.05)
    assert flagged_before > 0.2  # the drifted features fail the check...
    assert 1 - summary["ood"]["accepted"]["site checking part"] == pytest.approx(1 - ACCEPT_RATE, abs=0.015)  # not now
    assert summary["prediction_sets"]["fitted_on_images_per_class"]["Normal"] == int((site_labels[fit] == 1).sum())
    assert model.config.calibration_temperature == pytest.approx(summary["calibration"]["temperature"])


def test_too_few_images_says_how_many_more_each_class_needs():
    needed = images_needed(0.95)
    labels = np.array([0] * 30 + [1] * (needed - 5) + [2] * needed)
    message = too_few_images(labels, ["Bacterial pneumonia", "Normal", "Viral pneumonia"], fit_fraction=0.5)
    assert "Normal: 14 in the fitting part, 5 short; about 10 more normal X-rays" in message
    assert "Bacterial" not in message and "Viral" not in message
    assert too_few_images(np.array([0, 1, 2] * needed), ["a", "b", "c"], 0.5) is None


def test_wilson_interval_is_the_textbook_one():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10) = 0.717, half-width 0.227 (z = 1.96), worked by hand
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx([0.0, 0.4345], abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 0) is None


# ---- the command: a new folder, the original untouched, the record in the card ----------------------------------


def synthetic_site(folder: Path, images_per_class: int) -> Path:
    """A labelled "site" the tiny model never saw: synthetic drawings of another seed, in class folders."""
    return make_synthetic_dataset(folder, images_per_class=images_per_class, seed=1)


@pytest.fixture(scope="module")
def recalibrated(tiny_model_dir, tmp_path_factory):
    """The tiny model copied as a site's original, recalibrated once on a synthetic site: (original, new folder, site,
    the original's checksums before, what the command printed)."""
    workdir = tmp_path_factory.mktemp("site")
    original = workdir / "original"
    shutil.copytree(tiny_model_dir, original, ignore=shutil.ignore_patterns("checkpoint-*"))
    site = synthetic_site(workdir / "site", images_per_class=60)
    before = folder_checksums(original)
    new = workdir / "recalibrated"
    assert calibrate.main([str(original), "--site_dir", str(site), "--output_dir", str(new)]) == 0
    return original, new, site, before


def test_recalibration_writes_a_new_folder_and_leaves_the_original_untouched(recalibrated):
    original, new, site, before = recalibrated
    assert folder_checksums(original) == before
    metrics, original_metrics = read_metrics(new), read_metrics(original)
    assert metrics["calibration"]["temperature"] != pytest.approx(original_metrics["calibration"]["temperature"])
    assert json.loads((new / "config.json").read_text())["calibration_temperature"] == pytest.approx(
        metrics["calibration"]["temperature"]
    )
    assert PredictionSets.load(new / CONFORMAL_FILE).thresholds == metrics["prediction_sets"]["min_probability"]
    assert metrics["validation"]["macro_f1"] == original_metrics["validation"]["macro_f1"]  # the model's own figures


def test_what_loads_a_model_folder_loads_the_recalibrated_one(recalibrated):
    _, new, site, _ = recalibrated
    image = Image.open(next(Path(site).rglob("*.png"))).convert("RGB")
    classifier = load_classifier(new)
    assert classifier.prediction_sets.thresholds == read_metrics(new)["prediction_sets"]["min_probability"]
    assert classifier.ood_detector.threshold == pytest.approx(read_metrics(new)["ood"]["threshold"])
    [prediction] = classify(classifier, [image], top_k=3)
    assert prediction.error is None and prediction.prediction_sets is not None
    plain = {item["label"]: item["score"] for item in pipeline("image-classification", model=str(new))(image, top_k=3)}
    assert plain == pytest.approx(prediction.scores, abs=1e-5)  # the new temperature is in the weights


def test_the_folder_and_its_card_record_what_the_parts_were_fitted_on(recalibrated):
    original, new, site, _ = recalibrated
    record = read_metrics(new)["site_recalibration"]
    site_images = load_site(site)
    assert record["data"] == str(Path(site).resolve()) and record["source_model"] == str(original.resolve())
    assert record["date"] == datetime.date.today().isoformat()
    assert record["fitting_part"]["images"] + record["checking_part"]["images"] == len(site_images.dataset)
    fit = split_by_patient(site_images.patients, 0.5, 0)
    assert record["fitting_part"]["images"] == int(fit.sum())
    fitted_on = read_metrics(new)["prediction_sets"]["fitted_on_images_per_class"]
    assert fitted_on == record["fitting_part"]["images_per_class"]
    card = (new / "README.md").read_text()
    assert f"**Recalibrated at a site, without retraining.** On {record['date']}" in card
    assert f"refitted on {record['fitting_part']['images']} X-rays" in card and f"`{record['data']}`" in card
    assert "site checking part" in card and "for X-rays like the ones they were fitted on" in card
    assert "Recalibrated at a site" not in (original / "README.md").read_text()


def test_checking_a_folder_on_the_xrays_it_was_recalibrated_on_says_so(recalibrated, tmp_path, capsys):
    _, new, site, _ = recalibrated
    assert site_check.main([str(site), "--model", str(new), "--output_dir", str(tmp_path), "--bootstrap", "20"]) == 0
    assert "was recalibrated on part of these X-rays" in capsys.readouterr().err
    assert json.loads((tmp_path / "site_check.json").read_text())["images"] == len(load_site(site).dataset)


def test_too_few_site_xrays_stop_the_recalibration_and_write_nothing(tiny_model_dir, tmp_path, capsys):
    site = synthetic_site(tmp_path / "site", images_per_class=20)
    new = tmp_path / "recalibrated"
    assert calibrate.main([str(tiny_model_dir), "--site_dir", str(site), "--output_dir", str(new)]) == 1
    error = capsys.readouterr().err
    assert f"each class needs at least {images_needed(0.95)} in the fitting part" in error and "more" in error
    assert not new.exists() and not list(tmp_path.glob(".recalibrated*"))


def test_the_original_folder_is_never_the_output(tiny_model_dir, tmp_path, capsys):
    site = synthetic_site(tmp_path / "site", images_per_class=20)
    with pytest.raises(SystemExit):
        calibrate.main([str(tiny_model_dir), "--site_dir", str(site), "--output_dir", str(tiny_model_dir)])
    assert "never rewrites the original" in capsys.readouterr().err


# ---- the real X-rays of ../shared/data/site_test, with the shipped model -----------------------------------------


@pytest.fixture(scope="module")
def site_test(shared_data) -> Path:
    if not (shared_data / "site_test").is_dir():
        pytest.skip("../shared/data/site_test is not there")
    if not (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"the shipped model is not there yet ({SHIPPED_MODEL_DIR})")
    return shared_data / "site_test"


def test_site_check_on_site_test_reports_every_figure_with_its_interval(site_test, tmp_path, capsys):
    assert site_check.main([str(site_test), "--output_dir", str(tmp_path), "--bootstrap", "200"]) == 0
    report = json.loads((tmp_path / "site_check.json").read_text())
    assert (tmp_path / "site_check.png").read_bytes()[:4] == b"\x89PNG"
    assert report["images"] == 334 and report["skipped_files"] == 0
    assert report["images_per_class"] == {"Bacterial pneumonia": 130, "Normal": 127, "Viral pneumonia": 77}
    for row in [*report["classification"].values(), report["xray_check"]]:
        low, high = row["interval"]
        assert 0 <= low <= high <= 1 and row["model"] is not None
        if "F1" not in row["name"] and "ECE" not in row["name"]:  # Wilson intervals hold their share
            assert low <= row["site"] <= high
    for level, parts in report["prediction_sets"].items():
        assert set(parts) == {"all classes", "Bacterial pneumonia", "Normal", "Viral pneumonia"}
        for part, row in parts.items():
            if row["verdict"] == "worse":  # a broken promise is said in words
                assert any(sentence.startswith(f"{level} sets, {part}:") for sentence in report["not_held"])
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and ("do NOT hold" in printed or "Every promise holds" in printed)


def test_recalibration_on_half_of_site_test_covers_the_other_half(site_test, tmp_path):
    """Over several patient splits the refitted 95 % sets cover about 95 % of the children they never saw (one split
    of ~170 X-rays alone can miss by chance: `python -m benchmarks.site_recalibration` runs 50)."""
    coverages = []
    for seed in range(4):
        new = tmp_path / f"recalibrated-{seed}"
        argv = [str(SHIPPED_MODEL_DIR), "--site_dir", str(site_test), "--output_dir", str(new)]
        assert calibrate.main([*argv, "--site_split_seed", str(seed)]) == 0
        coverage = read_metrics(new)["site_recalibration"]["checking_part_coverage"]["prediction_sets"]["95%"]
        coverages.append(coverage["all classes"]["after"])
    assert np.mean(coverages) == pytest.approx(0.95, abs=0.03), coverages
    assert load_classifier(new).prediction_sets is not None
