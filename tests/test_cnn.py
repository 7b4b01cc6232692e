"""A convolutional network through the same path as the ViT: the ResNet presets train, calibrate, get the chest X-ray
check and Grad-CAM, and their model folder loads in pipeline() and the project's predictor."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, ConvNextConfig, TrainingArguments, pipeline

from cxr.labels import ID2LABEL
from cxr.models import PRESETS, build_model
from cxr.predictor import classify, load_classifier
from cxr.calibration import fold_temperature
from cxr.features import classifier_head, forward_features
from cxr.ood import OOD_FILE, OodDetector
from cxr.saliency import grad_cam
from inputs import chest_like

LABELS = ID2LABEL


def tiny_convnext():
    config = ConvNextConfig(image_size=32, num_stages=2, depths=[1, 1], hidden_sizes=[8, 16], num_labels=3, id2label=LABELS)
    return AutoModelForImageClassification.from_config(config)


def convolutional_models():
    torch.manual_seed(0)
    return {"resnet": build_model("scratch-tiny-resnet", LABELS)[0], "convnext": tiny_convnext()}


# ---- the presets ------------------------------------------------------------------------------------------


def test_cnn_presets_build_through_the_auto_class_with_the_vit_image_processor():
    model, processor, origin = build_model("scratch-resnet", LABELS)
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.id2label == LABELS
    assert processor.size["height"] == processor.size["width"] == model.config.image_size == 128
    assert type(processor).__name__ == type(build_model("scratch-small", LABELS)[1]).__name__
    assert origin.pretrained is False and "scratch-resnet" in origin.describe()
    assert {"scratch-tiny", "scratch-small", "scratch-small-p8", "scratch-base", "scratch-resnet", "scratch-tiny-resnet"} <= set(PRESETS)


# ---- features, Grad-CAM and temperature on the network alone ----------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_forward_features_gives_the_models_own_logits_and_the_same_keys_as_for_a_vit(name):
    model = convolutional_models()[name].eval().requires_grad_(False)
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    outputs = forward_features(model, pixel_values, saliency=True)
    torch.testing.assert_close(outputs["logits"].detach(), expected)
    channels = model.config.hidden_sizes[-1]
    assert outputs["cls"].shape == (3, channels) and outputs["tokens"].shape == (3, 2 * channels)
    assert outputs["hidden_states"][-1].shape == (3, channels, 4, 4)  # the last stage's feature map: 32 px / 8, what Grad-CAM reads
    assert "hidden_states" not in forward_features(model, pixel_values)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_grad_cam_from_the_prediction_pass_matches_a_full_backward_pass(name):
    """Classic Grad-CAM on the last stage's feature map, from one forward pass, equals the textbook computation."""
    model = convolutional_models()[name].eval().requires_grad_(False)
    pixel_values = torch.randn(3, 3, 32, 32)
    classes = [0, 1, 2]
    heat = grad_cam(forward_features(model, pixel_values, saliency=True), classes)
    assert heat.shape == (3, 4, 4)

    reference = copy.deepcopy(model).requires_grad_(True)
    kept = []
    getattr(reference, reference.base_model_prefix).encoder.stages[-1].register_forward_hook(lambda stage, args, output: kept.append(output))
    logits = reference(pixel_values=pixel_values).logits
    (gradient,) = torch.autograd.grad(logits[torch.arange(3), torch.tensor(classes)].sum(), kept[0])
    cam = torch.relu((kept[0].detach() * gradient.mean(dim=(2, 3), keepdim=True)).sum(dim=1)).numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(heat, np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "convnext"])
def test_folding_the_temperature_scales_the_logits_and_keeps_the_argmax(name):
    model = convolutional_models()[name].eval()
    pixel_values = torch.randn(8, 3, 32, 32)
    before = forward_features(model, pixel_values)["logits"]
    fold_temperature(model, 2.5)
    after = forward_features(model, pixel_values)["logits"]
    torch.testing.assert_close(after, before / 2.5)
    assert torch.equal(after.argmax(dim=-1), before.argmax(dim=-1))
    assert model.config.calibration_temperature == pytest.approx(2.5)
    assert classifier_head(model) is (model.classifier[1] if name == "resnet" else model.classifier)  # ResNet's head: Flatten + Linear


# ---- train_vit.py end to end ------------------------------------------------------------------------------


def test_train_vit_writes_a_complete_calibrated_model_folder_for_a_cnn(cnn_model_dir):
    for name in ["model.safetensors", "config.json", "preprocessor_config.json", "metrics.json", "README.md", OOD_FILE, "training_curves.png"]:
        assert (cnn_model_dir / name).is_file(), name
    assert not list(cnn_model_dir.glob("*.bin")), "weights must be safetensors only"
    config = json.loads((cnn_model_dir / "config.json").read_text())
    metrics = json.loads((cnn_model_dir / "metrics.json").read_text())
    assert config["model_type"] == "resnet" and config["calibration_temperature"] == pytest.approx(metrics["calibration"]["temperature"])
    assert "scratch-tiny-resnet" in metrics["model_origin"]["description"] and 0.0 <= metrics["test"]["macro_f1"] <= 1.0

    card = (cnn_model_dir / "README.md").read_text()
    assert "A convolutional network (ResNet) that reads" in card and "Vision Transformer" not in card
    assert "`ResNetForImageClassification`" in card and "input 32 x 32 px" in card and "- resnet" in card
    assert f"T = {metrics['calibration']['temperature']:.3f}" in card


def test_the_saved_head_is_the_best_checkpoints_divided_by_the_temperature(cnn_model_dir):
    from safetensors.torch import load_file

    metrics = json.loads((cnn_model_dir / "metrics.json").read_text())
    final, chosen = load_file(cnn_model_dir / "model.safetensors"), load_file(os.path.join(metrics["best_checkpoint"], "model.safetensors"))
    head = {"classifier.1.weight", "classifier.1.bias"}
    assert head <= final.keys() and final.keys() == chosen.keys()
    assert all(torch.equal(final[key], chosen[key]) for key in final.keys() - head)  # BatchNorm statistics included
    temperature = metrics["calibration"]["temperature"]
    assert all(torch.allclose(final[key], chosen[key] / temperature, rtol=1e-5, atol=1e-7) for key in head)


def test_checkpoint_reload_restores_every_weight_and_batchnorm_statistic(cnn_model_dir, tmp_path):
    from cxr.training import XrayTrainer

    best = json.loads((cnn_model_dir / "metrics.json").read_text())["best_checkpoint"]
    fresh, _, _ = build_model("scratch-tiny-resnet", LABELS)
    trainer = XrayTrainer(model=fresh, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    trainer._load_from_checkpoint(best)
    expected = AutoModelForImageClassification.from_pretrained(best).state_dict()
    assert any("running_mean" in key for key in expected)
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in expected.items())


def test_pipeline_and_the_predictor_load_the_cnn_folder(cnn_model_dir):
    image = Image.fromarray(chest_like(), "L").convert("RGB")
    result = pipeline("image-classification", model=str(cnn_model_dir))(image, top_k=3)
    assert {item["label"] for item in result} == set(LABELS.values())
    assert sum(item["score"] for item in result) == pytest.approx(1.0, abs=1e-5)

    classifier = load_classifier(cnn_model_dir)
    detector = OodDetector.load(cnn_model_dir / OOD_FILE)
    channels = classifier.model.config.hidden_sizes[-1]
    assert detector.class_means["cls"].shape == (3, channels) and detector.class_means["tokens"].shape == (3, 2 * channels)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    xray, not_xray = classify(classifier, [image, noise], saliency=True)
    # The predictor's probabilities are the pipeline's, from the same processor and calibrated weights.
    assert xray.scores == pytest.approx({item["label"]: item["score"] for item in result}, abs=1e-5)
    for prediction in (xray, not_xray):
        assert isinstance(prediction.looks_like_chest_xray, bool) and isinstance(prediction.ood_score, float)
        assert prediction.saliency.shape == (4, 4) and 0.0 <= prediction.saliency.min() and prediction.saliency.max() <= 1.0
    assert not_xray.looks_like_chest_xray is False
