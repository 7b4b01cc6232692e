"""The speed benchmark measures any model the presets build: its operation count and ceiling hold for every family,
a path an architecture cannot take says why instead of stopping the run, and the bar for predict.py's default is
applied as written."""

import shutil
import subprocess
import sys

import pytest

import predict
from benchmarks import speed
from benchmarks.speed import PATHS, PLAIN, REFERENCE, Operations, ceiling, count_operations, runtimes_clearing_bar
from cxr.labels import ID2LABEL
from cxr.models import PRESETS, build_model, input_size
from cxr.predictor import RUNTIMES
from helpers import validation_images

# One preset per architecture family (config class) the presets name, the first listed (the smallest where a family
# has several).
FAMILIES = {}
for name, (config_class, _) in PRESETS.items():
    FAMILIES.setdefault(config_class.__name__, name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gets_an_operation_count_and_a_ceiling(family):
    model, processor, _ = build_model(FAMILIES[family], ID2LABEL)
    operations = count_operations(model, input_size(processor))
    assert operations.total > 0, f"{family}: no operations counted"
    assert 0 <= operations.linear <= operations.total
    float32, int8 = ceiling(operations, 100.0), ceiling(operations, 100.0, 400.0)
    assert 0 < float32 < float("inf")
    assert float32 <= int8 <= 4 * float32


def test_a_vit_is_counted_as_the_hand_count_says():
    """scratch-small counted by hand: patch embedding, per layer the q, k, v, o and MLP matrices and the two attention
    products (a multiply-add = 2), and the head. Attention runs as one fused CPU kernel the counter must be told of."""
    model, _, _ = build_model("scratch-small", ID2LABEL)
    config = model.config
    patches, d, m = (config.image_size // config.patch_size) ** 2, config.hidden_size, config.intermediate_size
    tokens = patches + 1
    embedding = 2 * patches * 3 * config.patch_size**2 * d
    layer = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d
    head = 2 * d * len(ID2LABEL)
    operations = count_operations(model, config.image_size)
    assert operations.total == embedding + config.num_hidden_layers * layer + head
    assert operations.linear == config.num_hidden_layers * 2 * tokens * (4 * d * d + 2 * d * m) + head


def test_a_resnet_has_almost_nothing_for_int8_to_quantize():
    model, processor, _ = build_model("scratch-resnet", ID2LABEL)
    operations = count_operations(model, input_size(processor))
    assert 0 < operations.linear < 0.001 * operations.total  # the head only: the rest is convolutions
    assert ceiling(operations, 100.0, 400.0) == pytest.approx(ceiling(operations, 100.0), rel=0.001)


def test_ceiling_runs_the_linear_share_at_the_int8_rate():
    operations = Operations(total=2_000_000_000, linear=1_000_000_000)
    assert ceiling(operations, 100.0) == pytest.approx(50.0)  # 2 GFLOP at 100 GFLOP/s
    assert ceiling(operations, 100.0, 400.0) == pytest.approx(80.0)  # 1 at 100 and 1 at 400: 12.5 ms


def test_every_runtime_predict_offers_is_measured():
    assert {path[0] for path in PATHS.values() if path} == set(RUNTIMES)
    assert predict.DEFAULT_RUNTIME in RUNTIMES


def rows_for(rate: dict[str, float], labels_wrong: dict[str, int], verdicts_wrong: dict[str, int], n: int = 1000):
    """Benchmark rows for `n` check images: each path's images/s and how many labels and verdicts differ from the
    reference."""
    rows = {}
    for path_name in PATHS:
        wrong_labels, wrong_verdicts = labels_wrong.get(path_name, 0), verdicts_wrong.get(path_name, 0)
        verdicts = [False] * wrong_verdicts + [True] * (n - wrong_verdicts)
        rows[path_name] = dict(
            rate=rate.get(path_name, 1.0),
            check_labels=["b"] * wrong_labels + ["a"] * (n - wrong_labels),
            check_verdicts=[None] * n if path_name == PLAIN else verdicts,  # the plain pipeline has no X-ray check
            batch_effect=None if path_name == PLAIN else 0.0,
        )
    return rows


def test_the_default_bar_needs_speed_labels_and_verdicts():
    rates = {
        REFERENCE: 3.0,  # exact decode: not what predict.py runs, never proposed
        "batched fp32 + draft decode": 1.4,  # too slow
        "torch int8 + draft decode": 2.0,
        "ORT fp32 + draft decode": 1.6,
        "ORT int8 + draft decode": 3.0,
    }
    rows = rows_for(
        rates,
        labels_wrong={"torch int8 + draft decode": 6, "ORT fp32 + draft decode": 5},  # 99.4 %: out; 99.5 %: in
        verdicts_wrong={"ORT int8 + draft decode": 11, "ORT fp32 + draft decode": 10},  # 98.9 %: out; 99.0 %: in
    )
    cleared = runtimes_clearing_bar(rows, rows[REFERENCE])
    assert [name for name, *_ in cleared] == ["onnx"]
    assert cleared[0][1:] == (pytest.approx(1.6), pytest.approx(0.995), pytest.approx(0.99))


def test_the_default_bar_needs_scores_that_do_not_depend_on_the_batch():
    rows = rows_for({"ORT fp32 + draft decode": 2.0, "ORT int8 + draft decode": 3.0}, {}, {})
    rows["ORT int8 + draft decode"]["batch_effect"] = 3e-3  # activations quantized per batch
    rows["ORT fp32 + draft decode"]["batch_effect"] = 2e-7  # summation order
    assert [name for name, *_ in runtimes_clearing_bar(rows, rows[REFERENCE])] == ["onnx"]


def test_a_folder_without_the_xray_check_clears_no_bar():
    rows = rows_for({"ORT int8 + draft decode": 3.0}, {}, {})
    for row in rows.values():
        row["check_verdicts"] = [None] * len(row["check_labels"])
    assert runtimes_clearing_bar(rows, rows[REFERENCE]) == []


def test_a_path_the_architecture_cannot_take_says_why(tmp_path):
    """MobileViT V2 does not export to ONNX (docs/model-comparison.md): its ORT rows carry the reason."""
    model, processor, _ = build_model("scratch-mobilevit", ID2LABEL)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    row = speed.worker(str(tmp_path), "ORT fp32 + draft decode", [], 8, [])
    assert "cannot be exported to ONNX" in row["error"]


@pytest.mark.slow  # six fresh worker processes
def test_the_benchmark_runs_to_the_end_on_a_trained_folder(tiny_model_dir, tmp_path):
    folder, images = tmp_path / "model", tmp_path / "images"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    images.mkdir()
    for image in validation_images(tiny_model_dir)[:3]:
        shutil.copy(image, images / image.name)
    command = [sys.executable, "-m", "benchmarks.speed", "--model", str(folder), "--images", str(images)]
    command += ["--repeat", "1", "--agreement_images", "0", "--requests", "0"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    rows = [line for line in finished.stdout.splitlines() if line.startswith(str(folder))]
    assert [path_name for path_name in PATHS if any(path_name in row for row in rows)] == list(PATHS)
    # every predictor row has an X-ray check agreement and a batch effect
    assert all("%" in row.split()[-2] and float(row.split()[-1]) >= 0 for row in rows[1:])
    assert (
        "GFLOP per image" in finished.stdout
        and f"predict.py's default now: {predict.DEFAULT_RUNTIME}" in finished.stdout
    )
