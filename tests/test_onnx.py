"""The ONNX Runtime path: the float32 graph computes what PyTorch computes, int8 keeps the answers and the X-ray
check, and the graph cached in the model folder follows the weights."""

import csv
import shutil

import onnx
import pytest
import torch
from transformers import AutoModelForImageClassification

import predict
from cxr import onnx_runtime
from cxr.calibration import fold_temperature
from cxr.features import forward_features
from cxr.labels import ID2LABEL
from cxr.onnx_runtime import FINGERPRINT_KEY, ONNX_FILES, load_onnx_features
from cxr.predictor import classify, load_classifier
from cxr.run_record import write_checksums
from helpers import validation_images


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny model folder without any graph cached there by other tests (predict.py's default runtime
    exports one), so the graphs cached into it stay out of the shared fixture."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.onnx"))
    return copy


@pytest.fixture
def xrays(tiny_model_dir):
    """The tiny model's own (synthetic) validation images: what it was trained for, so its answers are not coin
    flips."""
    files = validation_images(tiny_model_dir)
    return files[::2][:16]


def test_float32_graph_computes_what_torch_computes(model_dir):
    reference, exported = load_classifier(model_dir), load_classifier(model_dir, onnx=True)
    assert (model_dir / ONNX_FILES[False]).is_file()
    size = reference.model.config.image_size
    for batch in (1, 5):  # the batch axis is dynamic (traced with 2)
        pixels = torch.randn(batch, 3, size, size)
        expected, actual = forward_features(reference.model, pixels), exported.onnx_features(pixels)
        for name in ("logits", "cls", "tokens"):
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)


def test_int8_keeps_the_top_label_and_the_xray_check(model_dir, xrays):
    reference = classify(load_classifier(model_dir), xrays)
    quantized = classify(load_classifier(model_dir, onnx=True, int8=True), xrays)
    operators = {node.op_type for node in onnx.load(str(model_dir / ONNX_FILES[True])).graph.node}
    assert {
        "DynamicQuantizeLinear",
        "MatMulInteger",
    } <= operators  # really int8, not the float32 graph under another name
    decided = 0
    for int8, float32 in zip(quantized, reference, strict=True):
        assert int8.scores.keys() == float32.scores.keys()
        assert all(int8.scores[label] == pytest.approx(float32.scores[label], abs=0.02) for label in float32.scores)
        best, second = sorted(float32.scores.values(), reverse=True)[:2]
        if best - second > 0.04:  # not a near tie (this tiny model has some), so int8 must pick the same label
            assert int8.top_label == float32.top_label
            decided += 1
        assert isinstance(int8.ood_score, float) and isinstance(int8.looks_like_chest_xray, bool)
        assert int8.ood_score == pytest.approx(float32.ood_score, rel=0.2)
    assert decided >= len(xrays) // 2


def test_cached_graph_is_reused_until_the_weights_change(model_dir, monkeypatch):
    exports = []
    real_export = onnx_runtime.export
    monkeypatch.setattr(onnx_runtime, "export", lambda *args: exports.append(args) or real_export(*args))
    load_classifier(model_dir, onnx=True)
    load_classifier(model_dir, onnx=True)
    assert len(exports) == 1

    # Recalibrate as `python calibrate.py` does: new head weights in the same folder.
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    fold_temperature(model, 2.0)
    model.save_pretrained(model_dir)
    write_checksums(model_dir)  # as calibrate.py records what it wrote
    classifier = load_classifier(model_dir, onnx=True)
    assert len(exports) == 2
    size = model.config.image_size
    pixels = torch.randn(3, 3, size, size)
    torch.testing.assert_close(
        classifier.onnx_features(pixels)["logits"], forward_features(model, pixels)["logits"], rtol=1e-4, atol=1e-5
    )


def test_without_a_writable_folder_nothing_is_cached(model_dir):
    classifier = load_classifier(model_dir)
    # as for a Hub id
    features = load_onnx_features(classifier.model, classifier.model.config.image_size, int8=False, folder=None)
    assert FINGERPRINT_KEY in features.session.get_modelmeta().custom_metadata_map
    assert not any(model_dir.glob("*.onnx"))


def test_grad_cam_asks_for_the_torch_model(model_dir, xrays):
    with pytest.raises(ValueError, match="Grad-CAM"):
        classify(load_classifier(model_dir, onnx=True), xrays[:1], saliency=True)


def test_the_batch_predictor_runs_through_onnx_int8(model_dir, xrays, tmp_path):
    output = tmp_path / "predictions.csv"
    assert (
        predict.main([*map(str, xrays[:4]), "--model", str(model_dir), "--output", str(output), "--onnx", "--int8"])
        == 0
    )
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 4 and all(row["label_1"] and row["looks_like_chest_xray"] in ("true", "false") for row in rows)


def test_an_architecture_the_exporter_cannot_write_is_a_clear_error(xrays, tmp_path, capsys):
    # MobileViT V2's fold exports to Col2Im, which torch's exporter cannot write at the opset used here.
    from transformers import MobileViTV2Config
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    folder = tmp_path / "mobilevit"
    config = MobileViTV2Config(
        image_size=64, width_multiplier=0.25, n_attn_blocks=[1, 1, 1], num_labels=3, id2label=ID2LABEL
    )
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    output = tmp_path / "predictions.csv"
    assert predict.main([str(xrays[0]), "--model", str(folder), "--output", str(output), "--onnx"]) == 1
    assert "cannot be exported to ONNX" in capsys.readouterr().err and not output.exists()
    # nothing half-written left behind
    assert not list(folder.glob("*.onnx")) and not list(folder.glob(".onnx-export-*"))
    # PyTorch still serves it, asked for or by default (which falls back to it and says so)
    assert predict.main([str(xrays[0]), "--model", str(folder), "--output", str(output), "--runtime", "torch"]) == 0
    assert "cannot be exported" not in capsys.readouterr().err
    assert predict.main([str(xrays[0]), "--model", str(folder), "--output", str(output)]) == 0
    assert "cannot be exported to ONNX here; running it with torch" in capsys.readouterr().err
    assert list(csv.DictReader(output.open()))[0]["label_1"]


def test_the_batch_predictor_runs_onnx_unless_told_otherwise(model_dir, xrays, tmp_path):
    # the default that cleared benchmarks.speed's bar on the shipped model; --int8 alone still means PyTorch's int8
    output = tmp_path / "predictions.csv"
    assert predict.main([*map(str, xrays[:4]), "--model", str(model_dir), "--output", str(output)]) == 0
    assert (model_dir / ONNX_FILES[False]).is_file() and not (model_dir / ONNX_FILES[True]).is_file()
    expected = classify(load_classifier(model_dir), xrays[:4])  # float32 either way
    rows = list(csv.DictReader(output.open()))
    assert [float(row["score_1"]) for row in rows] == pytest.approx(
        [max(p.scores.values()) for p in expected], abs=1e-5
    )

    (model_dir / ONNX_FILES[False]).unlink()
    assert predict.main([*map(str, xrays[:4]), "--model", str(model_dir), "--output", str(output), "--int8"]) == 0
    assert not any(model_dir.glob("*.onnx"))
