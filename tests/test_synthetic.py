"""make_synthetic_dataset: a generated stand-in data set, so the pipeline runs with no download."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from cxr.images import load_image
from cxr.labels import CLASS_NAMES
from helpers import folder_checksums
from hf_data import load_prepared, make_synthetic_dataset, prepare_dataset
from hf_data.__main__ import main

FOLDERS = ("bacteria", "normal", "viral")
FILE_NAME = re.compile(r"synthetic_person(\d{4})_[0-2]\.png")


def images_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix == ".png")


def digest(folder: Path) -> dict[str, str]:
    return {name: checksum for name, checksum in folder_checksums(folder).items() if name.endswith(".png")}


def test_the_set_has_class_folders_named_files_and_a_readme_saying_they_are_not_xrays(tmp_path):
    output = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=40, size=64, seed=0)

    assert output == (tmp_path / "synthetic").resolve()
    readme = (output / "SYNTHETIC_README.txt").read_text()
    assert "NOT CHEST X-RAYS" in readme and "pipeline" in readme
    images = images_under(output)
    assert {path.parent.relative_to(output).as_posix() for path in images} == {
        f"{s}/{c}" for s in ("train", "test") for c in FOLDERS
    }
    assert all(FILE_NAME.fullmatch(path.name) for path in images)

    per_class = Counter(path.parent.name for path in images)
    assert per_class == dict.fromkeys(FOLDERS, 40)
    test_share = sum(path.parent.parent.name == "test" for path in images) / len(images)
    assert 0.15 <= test_share <= 0.3

    folders_of_patient, images_of_patient = defaultdict(set), Counter()
    for path in images:
        patient = FILE_NAME.fullmatch(path.name)[1]
        folders_of_patient[patient].add(path.parent.relative_to(output))
        images_of_patient[patient] += 1
    assert all(len(folders) == 1 for folders in folders_of_patient.values())  # one split, one class
    assert set(images_of_patient.values()) == {1, 2, 3}


def test_images_decode_as_grayscale_of_the_asked_size(tmp_path):
    output = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=5, size=96, seed=2)
    for path in images_under(output):
        with Image.open(path) as image:
            assert (image.mode, image.size) == ("L", (96, 96))
        assert load_image(path).size == (96, 96)


def test_same_seed_same_images_other_seed_different(tmp_path):
    first = digest(make_synthetic_dataset(tmp_path / "a", images_per_class=10, seed=4))
    assert digest(make_synthetic_dataset(tmp_path / "b", images_per_class=10, seed=4)) == first
    other = digest(make_synthetic_dataset(tmp_path / "c", images_per_class=10, seed=5))
    assert set(other.values()).isdisjoint(first.values())


def test_classes_are_learnable_by_a_tiny_model(tmp_path):
    output = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=40, size=64, seed=0)

    def pixels_and_labels(split: str) -> tuple[np.ndarray, list[str]]:
        paths = images_under(output / split)
        pixels = [np.asarray(Image.open(path).resize((16, 16)), dtype=np.float32).ravel() / 255 for path in paths]
        return np.stack(pixels), [path.parent.name for path in paths]

    model = LogisticRegression(max_iter=2000).fit(*pixels_and_labels("train"))
    assert model.score(*pixels_and_labels("test")) >= 0.85


def test_prepare_reads_synthetic_patients_and_loads(tmp_path):
    source = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=30, seed=1)
    report = prepare_dataset(source, tmp_path / "prepared")

    assert report.skipped == []  # the README beside the split folders is not an image
    assert list(report.counts) == ["train", "validation", "test"]
    assert {name: sum(report.counts[split][name] for split in report.counts) for name in CLASS_NAMES} == dict.fromkeys(
        CLASS_NAMES, 30
    )
    manifest = (tmp_path / "prepared" / "manifest.csv").read_text().splitlines()[1:]
    assert all(re.fullmatch(r"\d{4}", row.split(",")[3]) for row in manifest)  # patient id from person0007 -> 0007

    dataset = load_prepared(tmp_path / "prepared")
    assert dataset["train"].features["label"].names == list(CLASS_NAMES)
    assert sum(dataset[split].num_rows for split in dataset) == 90


def test_rerun_replaces_its_own_images_only(tmp_path):
    output = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=20)
    (output / "my_notes.txt").write_text("keep me")
    make_synthetic_dataset(output, images_per_class=5)
    assert len(images_under(output)) == 15
    assert (output / "my_notes.txt").read_text() == "keep me"

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "photo.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty"):
        make_synthetic_dataset(tmp_path / "theirs")
    with pytest.raises(ValueError, match="at least 32"):
        make_synthetic_dataset(tmp_path / "tiny", size=16)


def test_the_command_line_draws_the_set_and_says_it_is_not_xrays(tmp_path, capsys):
    assert (
        main(["synthetic", str(tmp_path / "synthetic"), "--images_per_class", "6", "--size", "48", "--seed", "3"]) == 0
    )
    assert "not X-rays" in capsys.readouterr().out
    assert len(images_under(tmp_path / "synthetic")) == 18
