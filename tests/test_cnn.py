"""A convolutional network through the same path as the ViT: the ResNet presets train, calibrate, get the chest X-ray
check and Grad-CAM, and their model folder loads in pipeline() and the project's predictor. The model-folder tests run
on both tiny runs (`trained_folder`: the ViT's and the ResNet's), since every architecture must pass them; the
feature-path tests for every family are in tests/test_architectures.py."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, ConvNextConfig, TrainingArguments, pipeline

from cxr.calibration import fold_temperature
from cxr.features import classifier_heads, forward_features
from cxr.labels import ID2LABEL
from cxr.models import PRESETS, build_model
from cxr.ood import OOD_FILE, OodDetector
from cxr.predictor import classify, load_classifier
from cxr.run_record import read_metrics
from inputs import chest_like

LABELS = ID2LABEL


def tiny_convnext():
    config = ConvNextConfig(
        image_size=32, num_stages=2, depths=[1, 1], hidden_sizes=[8, 16], num_labels=3, id2label=LABELS
    )
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
    assert {
        "scratch-tiny",
        "scratch-small",
        "scratch-small-p8",
        "scratch-base",
        "scratch-resnet",
        "scratch-tiny-resnet",
    } <= set(PRESETS)


# ---- temperature on the network alone (features and Grad-CAM: tests/test_architectures.py) ------------------------


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
    # ResNet's head: Flatten + Linear
    assert classifier_heads(model) == [model.classifier[1] if name == "resnet" else model.classifier]


# ---- train_vit.py end to end: what every model folder holds and does, for the ViT and the ResNet run ------


# family -> (the preset of its tiny run, the head's weights, words its card must have, words it must not have)
FAMILIES = {
    "vit": (
        "scratch-tiny",
        {"classifier.weight", "classifier.bias"},
        ["A Vision Transformer that reads", "`ViTForImageClassification`", "- vit"],
        [],
    ),
    "resnet": (
        "scratch-tiny-resnet",
        {"classifier.1.weight", "classifier.1.bias"},  # ResNet's head: Flatten + Linear
        ["A convolutional network (ResNet) that reads", "`ResNetForImageClassification`", "- resnet"],
        ["Vision Transformer"],
    ),
}


@pytest.fixture(params=["vit", pytest.param("resnet", marks=pytest.mark.slow)])
def trained_folder(request):
    """(family, model folder) of each tiny train_vit.py run: the ViT's (tiny_model_dir), then the ResNet's
    (cnn_model_dir)."""
    return request.param, request.getfixturevalue({"vit": "tiny_model_dir", "resnet": "cnn_model_dir"}[request.param])


def test_train_vit_writes_a_complete_calibrated_model_folder(trained_folder):
    family, folder = trained_folder
    preset, _, card_has, card_lacks = FAMILIES[family]
    for name in [
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "metrics.json",
        "README.md",
        OOD_FILE,
        "training_curves.png",
        "confusion_matrix_validation.png",
    ]:
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin")), "weights must be safetensors only"
    config = json.loads((folder / "config.json").read_text())
    metrics = read_metrics(folder)
    assert config["model_type"] == family and config["calibration_temperature"] == pytest.approx(
        metrics["calibration"]["temperature"]
    )
    assert preset in metrics["model_origin"]["description"] and 0.0 <= metrics["test"]["macro_f1"] <= 1.0

    card = (folder / "README.md").read_text()
    assert all(words in card for words in card_has) and not any(words in card for words in card_lacks)
    assert "input 32 x 32 px" in card
    assert f"T = {metrics['calibration']['temperature']:.3f}" in card


def test_the_saved_head_is_the_best_checkpoints_divided_by_the_temperature(trained_folder):
    from safetensors.torch import load_file

    family, folder = trained_folder
    metrics = read_metrics(folder)
    final, chosen = (
        load_file(folder / "model.safetensors"),
        load_file(os.path.join(metrics["best_checkpoint"], "model.safetensors")),
    )
    head = FAMILIES[family][1]  # the calibration temperature is folded into the head
    assert head <= final.keys() and final.keys() == chosen.keys()
    assert all(torch.equal(final[key], chosen[key]) for key in final.keys() - head)  # BatchNorm statistics included
    temperature = metrics["calibration"]["temperature"]
    assert all(torch.allclose(final[key], chosen[key] / temperature, rtol=1e-5, atol=1e-7) for key in head)


def test_checkpoint_reload_restores_every_weight_and_batchnorm_statistic(trained_folder, tmp_path):
    # Guards the workaround for huggingface/transformers#43701: the stock Trainer leaves ViT encoder weights random
    # here.
    from cxr.training import XrayTrainer

    family, folder = trained_folder
    best = read_metrics(folder)["best_checkpoint"]
    fresh, _, _ = build_model(FAMILIES[family][0], LABELS)
    trainer = XrayTrainer(model=fresh, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    trainer._load_from_checkpoint(best)
    expected = AutoModelForImageClassification.from_pretrained(best).state_dict()
    assert family != "resnet" or any("running_mean" in key for key in expected)
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in expected.items())


def test_pipeline_and_the_predictor_load_the_folder_and_agree(trained_folder):
    family, folder = trained_folder
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90), dtype=np.uint8)).convert("RGB")
    image = Image.fromarray(chest_like(), "L").convert("RGB")
    classify_in_pipeline = pipeline("image-classification", model=str(folder))
    for picture in (noise, image):  # three labels summing to one, whatever the picture
        result = classify_in_pipeline(picture, top_k=3)
        assert {item["label"] for item in result} == set(LABELS.values())
        assert sum(item["score"] for item in result) == pytest.approx(1.0, abs=1e-5)

    classifier = load_classifier(folder)
    detector = OodDetector.load(folder / OOD_FILE)
    width = classifier.model.config.hidden_sizes[-1] if family == "resnet" else classifier.model.config.hidden_size
    assert detector.class_means["cls"].shape == (3, width) and detector.class_means["tokens"].shape == (3, 2 * width)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    xray, not_xray = classify(classifier, [image, noise], saliency=True)
    # The predictor's probabilities are the pipeline's, from the same processor and calibrated weights.
    assert xray.scores == pytest.approx({item["label"]: item["score"] for item in result}, abs=1e-5)
    for prediction in (xray, not_xray):
        assert isinstance(prediction.looks_like_chest_xray, bool) and isinstance(prediction.ood_score, float)
        assert (
            prediction.saliency.shape == (4, 4)
            and 0.0 <= prediction.saliency.min()
            and prediction.saliency.max() <= 1.0
        )
    assert not_xray.looks_like_chest_xray is False
