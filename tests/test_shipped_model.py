"""The model that ships with the code (models/swiftformer-xray) is what its card says: its files are one run's, it is
the only weight file in the repository, it reads the shipped examples, and it scores its validation split as
metrics.json records, through `pipeline(...)` as through the project's predictor (that part needs ../shared)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from transformers import pipeline

from cxr.labels import CLASS_NAMES, DISPLAY_NAMES
from cxr.metrics import classification_metrics
from cxr.models import SHIPPED_MODEL_DIR
from cxr.predictor import INFERENCE_FILES, classify, load_classifier
from cxr.run_record import CHECKSUMS_FILE, check_checksums, read_metrics, read_run
from hf_data.prepare import assign_splits, find_labelled_images

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# Picked when the demo got its examples, before this model existed: one X-ray per class (examples/README.md).
EXAMPLE_CLASSES = {
    "NORMAL2-IM-0772-0001.jpeg": "Normal",
    "person1674_bacteria_4437.jpeg": "Bacterial pneumonia",
    "person1158_virus_1938.jpeg": "Viral pneumonia",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".onnx", ".h5", ".msgpack")

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").is_file(), reason="no shipped model here")


def test_the_shipped_folder_is_one_runs_files_and_nothing_else():
    names = {path.name for path in SHIPPED_MODEL_DIR.iterdir() if path.suffix != ".onnx"}  # exports: a local cache
    assert set(INFERENCE_FILES) | {"metrics.json", "run.json", "README.md", CHECKSUMS_FILE} <= names
    assert not any(path.is_dir() for path in SHIPPED_MODEL_DIR.iterdir())  # no checkpoints
    assert sum((SHIPPED_MODEL_DIR / name).stat().st_size for name in names) <= 20 * 2**20
    assert set(json.loads((SHIPPED_MODEL_DIR / CHECKSUMS_FILE).read_text())) == names - {CHECKSUMS_FILE}
    assert check_checksums(SHIPPED_MODEL_DIR) == []  # every file as the run that made it recorded it


def test_no_other_weight_or_pickle_file_is_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    shipped = SHIPPED_MODEL_DIR.relative_to(REPO).as_posix() + "/"
    weights = [name for name in tracked.stdout.splitlines() if name.lower().endswith(WEIGHT_SUFFIXES)]
    assert weights and all(name.startswith(shipped) for name in weights), weights


def test_the_card_says_how_it_was_made():
    card, record, metrics = (
        (SHIPPED_MODEL_DIR / "README.md").read_text(),
        read_run(SHIPPED_MODEL_DIR),
        read_metrics(SHIPPED_MODEL_DIR),
    )
    assert record["command"] in card and "--recipe swiftformer-distil" in record["command"]
    assert metrics["model_origin"]["teacher_command"] in card  # the first of the two steps
    assert "no test-split figures" in card and "validation" in metrics and "test" not in metrics
    assert metrics["train"]["hardware"] in card and "Kermany" in card and "CC BY 4.0" in card
    assert record["precision"]["precision"] in ("bf16", "fp32") and "precision:" in card
    assert f"{metrics['validation']['macro_f1']:.3f}" in card
    # checked at another site (site_test), as `site_check.py --record` keeps it
    assert "**At another site.**" in card and f"macro-F1 {metrics['site_check']['macro_f1']:.3f}" in card


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(SHIPPED_MODEL_DIR)


def test_the_examples_are_chest_xrays_whose_95_percent_sets_hold_their_class(classifier):
    files = sorted(EXAMPLES.glob("*.jpeg"))
    assert sorted(path.name for path in files) == sorted(EXAMPLE_CLASSES)
    for prediction in classify(classifier, files, top_k=3, names=[path.name for path in files]):
        truth = EXAMPLE_CLASSES[prediction.source]
        assert prediction.looks_like_chest_xray, prediction.source
        assert truth in prediction.prediction_sets["95%"], (prediction.source, prediction.prediction_sets)
        if truth != "Viral pneumonia":  # the hard class: only its set is promised
            assert max(prediction.scores, key=prediction.scores.get) == truth, (prediction.source, prediction.scores)


def validation_images(data: Path) -> tuple[list[Path], list[int]]:
    """The validation split the shipped model was trained beside, rebuilt from the Kaggle folder with its run's split
    settings (the same patient-grouped carve train_vit.py made)."""
    settings = read_run(SHIPPED_MODEL_DIR)["data"]
    images, _ = find_labelled_images(data / "chest_xray")
    splits = assign_splits(images, settings["validation_fraction"], settings["split_seed"], settings["keep_kaggle_val"])
    chosen = sorted(
        (image.path, CLASS_NAMES.index(image.class_name))
        for image, split in zip(images, splits, strict=True)
        if split == "validation"
    )
    return [path for path, _ in chosen], [label for _, label in chosen]


@pytest.mark.slow
def test_rescoring_the_validation_split_reproduces_metrics_json(shared_data, classifier):
    paths, labels = validation_images(shared_data)
    recorded = read_metrics(SHIPPED_MODEL_DIR)["validation"]
    assert len(paths) == sum(recorded[f"support_{key}"] for key in CLASS_NAMES)
    order = [DISPLAY_NAMES[key] for key in CLASS_NAMES]
    plain = pipeline("image-classification", model=str(SHIPPED_MODEL_DIR))
    through_pipeline = [
        {item["label"]: item["score"] for item in answer} for answer in plain([str(p) for p in paths], top_k=3)
    ]
    through_predictor = [prediction.scores for prediction in classify(classifier, paths, batch_size=64, draft=False)]
    for answers in (through_pipeline, through_predictor):
        probabilities = np.array([[answer[name] for name in order] for answer in answers])
        figures = classification_metrics(labels, probabilities, list(CLASS_NAMES))
        for key in ("macro_f1", "pneumonia_sensitivity", "pneumonia_specificity"):
            assert figures[key] == pytest.approx(recorded[key], abs=0.005), key
