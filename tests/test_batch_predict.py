"""The batch predictor: whole folders to CSV/JSON, bad files reported, non-X-rays flagged, same answers as the plain
pipeline."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import predict
from cxr.images import load_image
from cxr.labels import ID2LABEL
from cxr.predictor import classify, find_image_files, load_classifier


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "clinic"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index in range(5):
        Image.fromarray(rng.integers(0, 255, (120 + index * 30, 100), dtype=np.uint8)).save(
            folder / f"xray_{index}.png"
        )
    Image.fromarray(rng.integers(0, 255, (400, 500), dtype=np.uint8)).save(folder / "sub" / "big.jpeg", quality=90)
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.jpeg").write_bytes((folder / "sub" / "big.jpeg").read_bytes()[:2000])
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    return folder


def test_folder_to_csv_keeps_every_file_and_reports_bad_ones(tiny_model_dir, mixed_folder, tmp_path, capsys):
    output = tmp_path / "out" / "predictions.csv"
    assert (
        predict.main([str(mixed_folder), "--model", str(tiny_model_dir), "--output", str(output), "--batch_size", "4"])
        == 0
    )
    assert "6 do not look like a pediatric chest X-ray" in capsys.readouterr().out
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0])[-3:] == ["ood_score", "looks_like_chest_xray", "error"]
    assert len(rows) == 8  # 6 images + 2 broken files; readme.txt is not picked up
    by_name = {row["file"].split("/")[-1]: row for row in rows}
    assert "not an image" in by_name["notes.png"]["error"]
    assert "truncated" in by_name["cut.jpeg"]["error"]
    good = [row for row in rows if not row["error"]]
    assert len(good) == 6
    for row in good:
        assert {row["label_1"], row["label_2"], row["label_3"]} == set(ID2LABEL.values())
        scores = [float(row[f"score_{rank}"]) for rank in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)
        assert row["looks_like_chest_xray"] == "false" and float(row["ood_score"]) > 0  # random noise is no X-ray
    assert by_name["notes.png"]["looks_like_chest_xray"] == by_name["notes.png"]["ood_score"] == ""


def test_json_output_gives_each_file_its_predictions_or_its_error(tiny_model_dir, mixed_folder, tmp_path):
    output = tmp_path / "predictions.json"
    predict.main(
        [
            str(mixed_folder / "xray_0.png"),
            str(mixed_folder / "notes.png"),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(output),
        ]
    )
    rows = json.loads(output.read_text())
    assert [row["error"] is None for row in rows] == [True, False]
    assert len(rows[0]["predictions"]) == 3
    assert rows[0]["looks_like_chest_xray"] is False and isinstance(rows[0]["ood_score"], float)
    assert rows[1]["looks_like_chest_xray"] is None and rows[1]["ood_score"] is None


def test_a_model_without_statistics_leaves_the_flag_empty_and_says_why(tiny_model_dir, mixed_folder, tmp_path, capsys):
    old_model = tmp_path / "old-model"
    shutil.copytree(tiny_model_dir, old_model, ignore=shutil.ignore_patterns("checkpoint-*", "ood.safetensors"))
    output = tmp_path / "predictions.csv"
    assert predict.main([str(mixed_folder / "xray_0.png"), "--model", str(old_model), "--output", str(output)]) == 0
    assert "python calibrate.py" in capsys.readouterr().err
    [row] = list(csv.DictReader(output.open()))
    assert row["label_1"] and row["looks_like_chest_xray"] == row["ood_score"] == ""


def test_batched_scores_equal_one_image_at_a_time_pipeline(tiny_model_dir, mixed_folder):
    files = [path for path in find_image_files([mixed_folder]) if path.name.startswith(("xray", "big"))]
    batched = classify(load_classifier(tiny_model_dir), files, batch_size=4)
    plain = pipeline("image-classification", model=str(tiny_model_dir))
    for path, prediction in zip(files, batched, strict=True):
        single = {item["label"]: item["score"] for item in plain(load_image(path, draft_size=32), top_k=3)}
        assert prediction.scores.keys() == single.keys()
        assert all(prediction.scores[label] == pytest.approx(single[label], abs=1e-5) for label in single)
        assert prediction.looks_like_chest_xray is False  # random noise; the flag is batch-size independent too
    again = classify(load_classifier(tiny_model_dir), files, batch_size=1)
    assert [p.ood_score for p in again] == pytest.approx([p.ood_score for p in batched], rel=1e-4)


def test_missing_model_is_a_clear_message(mixed_folder, tmp_path, capsys):
    assert (
        predict.main([str(mixed_folder), "--model", str(tmp_path / "none"), "--output", str(tmp_path / "p.csv")]) == 1
    )
    assert "train_vit.py" in capsys.readouterr().err
