"""One feature path for every architecture: the chest X-ray check's features, Grad-CAM and the ONNX export read a
ViT, a Swin, a ResNet, a ConvNeXt, a PVTv2, a CvT, a LeViT and a SwiftFormer (each built tiny from its config)
through the same code, and train_vit.py turns a Swin folder into a complete model folder that pipeline() loads."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    CvtConfig,
    LevitConfig,
    PvtV2Config,
    SwiftFormerConfig,
    SwinConfig,
    pipeline,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from cxr.calibration import fold_temperature
from cxr.features import classifier_heads, feature_grid, forward_features
from cxr.labels import ID2LABEL
from cxr.models import PRESETS, build_model, config_image_size, input_size
from cxr.onnx_runtime import OUTPUTS, load_onnx_features
from cxr.ood import OOD_FILE, OodDetector
from cxr.predictor import classify, load_classifier
from cxr.run_record import read_metrics
from cxr.saliency import grad_cam, saliency_overlay
from inputs import chest_like

LABELS = ID2LABEL
LABEL_IDS = {label: index for index, label in LABELS.items()}
SIZE = 32


def tiny_swin_config():
    # 4 px patches at 32 px: an 8 x 8 token grid, windows of 4, one patch merging -> a 4 x 4 grid of 32 features.
    return SwinConfig(
        image_size=SIZE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        num_labels=3,
        id2label=LABELS,
        label2id=LABEL_IDS,
    )


def tiny_pvt_config():
    return PvtV2Config(
        image_size=SIZE,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        num_labels=3,
        id2label=LABELS,
        label2id=LABEL_IDS,
    )


def tiny_cvt_config():
    # Stride 4, 2, 2 at 32 px: grids of 8, 4 and 2; the last stage carries the class token the head reads. Stage i needs
    # more than i blocks: transformers 5.23 indexes the per-stage drop-path list by the stage number.
    return CvtConfig(
        embed_dim=[8, 16, 32],
        num_heads=[1, 2, 2],
        depth=[1, 2, 3],
        mlp_ratio=[2.0, 2.0, 2.0],
        num_labels=3,
        id2label=LABELS,
        label2id=LABEL_IDS,
    )


def tiny_convnext_config():
    # Two stages at 32 px: stride 4, then 2 -> a 4 x 4 map of 16 channels.
    return ConvNextConfig(
        image_size=SIZE,
        num_stages=2,
        depths=[1, 1],
        hidden_sizes=[8, 16],
        num_labels=3,
        id2label=LABELS,
        label2id=LABEL_IDS,
    )


# LeViT's stem always divides the side by 16: 128 px gives an 8 x 8 grid, then 4 x 4 after its one subsampling.
LEVIT_SIZE = 128


def tiny_levit_config():
    return LevitConfig(
        image_size=LEVIT_SIZE,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_attention_heads=[2, 2],
        key_dim=[8, 8],
        mlp_ratio=[2, 2],
        attention_ratio=[2, 2],
        down_ops=[["Subsample", 8, 2, 4, 2, 2], [""]],
        architectures=["LevitForImageClassification"],  # LeViT has two heads; a fresh config names no choice
        num_labels=3,
        id2label=LABELS,
        label2id=LABEL_IDS,
    )


def tiny_swiftformer_config():
    # Stem stride 4 at 32 px, then one downsampling: an 8 x 8 map (a convolution block, then the attention block),
    # then a 4 x 4 map of 16 channels. Its logits average two Linear heads on the same pooled features.
    return SwiftFormerConfig(
        image_size=SIZE,
        depths=[2, 1],
        embed_dims=[8, 16],
        downsamples=[True, True],
        mlp_ratio=2,
        num_labels=3,
        id2label=LABELS,
        label2id=LABEL_IDS,
    )


def input_side(family: str) -> int:
    return LEVIT_SIZE if family == "levit" else SIZE


TINY_CONFIGS = {
    "swin": tiny_swin_config,
    "convnext": tiny_convnext_config,
    "pvt_v2": tiny_pvt_config,
    "cvt": tiny_cvt_config,
    "levit": tiny_levit_config,
    "swiftformer": tiny_swiftformer_config,
}


def build(family: str):
    torch.manual_seed(0)
    if family == "vit":
        model = build_model("scratch-tiny", LABELS)[0]
    elif family == "resnet":
        model = build_model("scratch-tiny-resnet", LABELS)[0]
    else:
        model = AutoModelForImageClassification.from_config(TINY_CONFIGS[family]())
    return model.eval().requires_grad_(False)


# family -> (grid side Grad-CAM reads, features the head reads, size of the "tokens" features)
FAMILIES = {
    "vit": (4, 32, 2 * 32),  # CLS + mean patch token of the last block (32 wide)
    "swin": (4, 32, 2 * 32),  # no class token: mean and standard deviation of the last 4 x 4 tokens
    "resnet": (4, 16, 2 * 16),  # the last stage's 4 x 4 map of 16 channels
    "convnext": (4, 16, 2 * 16),  # the same shape, after a LayerNorm-ed pooling
    "pvt_v2": (4, 32, 2 * 32),  # the last stage's 4 x 4 map of 32 channels
    # The head reads the last stage's class token; that stage's 2 x 2 grid reaches it only through the token, so
    # Grad-CAM takes the second stage's 4 x 4 grid (as a ViT's, one block earlier).
    "cvt": (4, 32, 2 * 32),
    "levit": (4, 32, 2 * 32),  # the last stage's 4 x 4 tokens, mean-pooled (through a BatchNorm) by the head
    "swiftformer": (4, 16, 2 * 16),  # the last stage's 4 x 4 map of 16 channels, batch-normed and mean-pooled
}
EARLIER_GRID = ("vit", "cvt")  # families whose last grid reaches the logits only through a class token
CONVOLUTIONAL = ("resnet", "convnext", "swiftformer")  # their hidden states are feature maps already


@pytest.mark.parametrize("family", FAMILIES)
def test_features_are_the_models_own_logits_and_the_heads_input(family):
    model = build(family)
    side, width, tokens = FAMILIES[family]
    pixels = input_side(family)
    pixel_values = torch.randn(5, 3, pixels, pixels)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        head_input = []
        hook = classifier_heads(model)[0].register_forward_pre_hook(
            lambda module, args: head_input.append(args[0]) and None
        )
        model(pixel_values=pixel_values)
        hook.remove()
    outputs = forward_features(model, pixel_values)
    torch.testing.assert_close(outputs["logits"], expected)
    torch.testing.assert_close(outputs["cls"], head_input[0])  # exactly what the Linear layer giving the logits reads
    assert outputs["cls"].shape == (5, width) and outputs["tokens"].shape == (5, tokens)
    # Grad-CAM's pass gives the same logits and keys, plus the hidden states; the plain pass keeps none of them.
    with_saliency = forward_features(model, pixel_values, saliency=True)
    torch.testing.assert_close(with_saliency["logits"].detach(), expected)
    assert "hidden_states" not in outputs and set(with_saliency) == set(outputs) | {"hidden_states"}
    if family in CONVOLUTIONAL:  # the last stage's feature map, what Grad-CAM reads: 32 px / 8
        assert with_saliency["hidden_states"][-1].shape == (5, width, side, side)
    assert torch.isfinite(outputs["tokens"]).all()
    # The out-of-distribution check fits and scores on these features, whatever the family.
    train = {name: value.numpy() for name, value in forward_features(model, torch.randn(60, 3, pixels, pixels)).items()}
    detector = OodDetector.fit(train, np.arange(60) % 3, train)
    scores, accepted = detector.check(outputs)
    assert scores.shape == (5,) and np.isfinite(scores).all() and accepted.dtype == bool


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_cam_reads_the_last_grid_the_logits_depend_on_and_overlays_it(family):
    model = build(family)
    side, pixels = FAMILIES[family][0], input_side(family)
    pixel_values = torch.randn(3, 3, pixels, pixels)
    classes = [0, 1, 2]
    outputs = forward_features(model, pixel_values, saliency=True)
    heat = grad_cam(outputs, classes)
    assert heat.shape == (3, side, side) and heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() > 0.0

    # The textbook computation on a copy with its own full backward pass: the last hidden state for all but the
    # ViT, whose last block reaches the head only through its class token (so one block earlier).
    reference = copy.deepcopy(model).requires_grad_(True)
    states = reference(pixel_values=pixel_values, output_hidden_states=True)
    state = states.hidden_states[-2 if family in EARLIER_GRID else -1]
    (gradient,) = torch.autograd.grad(states.logits[torch.arange(3), torch.tensor(classes)].sum(), state)
    grid, gradient_grid = feature_grid(state.detach())[0], feature_grid(gradient)[0]
    cam = torch.relu((grid * gradient_grid.mean(dim=(2, 3), keepdim=True)).sum(dim=1)).numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)  # an image with no positive evidence has an all-zero map
    np.testing.assert_allclose(heat, np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0), atol=1e-5)

    image = Image.fromarray(chest_like(), "L").convert("RGB")
    overlay = np.asarray(saliency_overlay(image, heat[0]))
    assert overlay.shape == (410, 512, 3) and overlay.dtype == np.uint8 and overlay.max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_the_temperature_divides_the_logits_whatever_the_head(family):
    # SwiftFormer averages two heads into its logits: dividing only one would change the argmax, not calibrate.
    model = build(family)
    pixels = input_side(family)
    pixel_values = torch.randn(6, 3, pixels, pixels)
    before = forward_features(model, pixel_values)["logits"]
    fold_temperature(model, 2.5)
    torch.testing.assert_close(forward_features(model, pixel_values)["logits"], before / 2.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_runs_and_agrees_with_torch(family, tmp_path):
    model = build(family)
    fold_temperature(model, 1.5)  # the exported head is the calibrated one, as in a model folder
    pixels = input_side(family)
    session = load_onnx_features(model, pixels, int8=False, folder=tmp_path)
    assert (tmp_path / "model.onnx").is_file()
    for batch in (1, 4):  # the batch axis is dynamic
        pixel_values = torch.randn(batch, 3, pixels, pixels)
        expected, actual = forward_features(model, pixel_values), session(pixel_values)
        for name in OUTPUTS:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def swin_model_dir(tmp_path_factory, train_tiny_model):
    """train_vit.py --model FOLDER, where FOLDER holds a tiny Swin built from its config (random weights) and an image
    processor."""
    workdir = tmp_path_factory.mktemp("swin_run")
    start = workdir / "swin-start"
    AutoModelForImageClassification.from_config(tiny_swin_config()).save_pretrained(start)
    ViTImageProcessorPil(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(start)
    return train_tiny_model(workdir, str(start))


@pytest.mark.slow
def test_train_vit_turns_a_swin_folder_into_a_complete_model_folder(swin_model_dir):
    for name in ["model.safetensors", "config.json", "preprocessor_config.json", "metrics.json", "README.md", OOD_FILE]:
        assert (swin_model_dir / name).is_file(), name
    config = json.loads((swin_model_dir / "config.json").read_text())
    metrics = read_metrics(swin_model_dir)
    assert config["model_type"] == "swin" and config["calibration_temperature"] == pytest.approx(
        metrics["calibration"]["temperature"]
    )
    assert 0.0 <= metrics["test"]["macro_f1"] <= 1.0
    # the card names the family
    assert "A Swin Transformer (windowed attention)" in (swin_model_dir / "README.md").read_text()

    image = Image.fromarray(chest_like(), "L").convert("RGB")
    result = pipeline("image-classification", model=str(swin_model_dir))(image, top_k=3)
    assert {item["label"] for item in result} == set(LABELS.values())
    classifier = load_classifier(swin_model_dir)
    assert classifier.ood_detector is not None
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    xray, not_xray = classify(classifier, [image, noise], saliency=True)
    assert xray.scores == pytest.approx({item["label"]: item["score"] for item in result}, abs=1e-5)
    for prediction in (xray, not_xray):
        assert isinstance(prediction.looks_like_chest_xray, bool) and prediction.saliency.shape == (4, 4)


def test_a_config_folder_is_trained_from_scratch_and_saved_weights_are_not_called_pretrained(tmp_path):
    # A folder holding only a config.json: that architecture with random weights, and the origin says so.
    config_only = tmp_path / "config-only"
    tiny_swin_config().save_pretrained(config_only)
    model, processor, origin = build_model(str(config_only), LABELS)
    assert type(model).__name__ == "SwinForImageClassification" and input_size(processor) == SIZE
    assert not origin.pretrained and origin.describe().startswith("trained from scratch (random initialisation")
    # Weights saved from a config (random) beside no record of how they were made: not "pretrained weights".
    saved = tmp_path / "saved"
    AutoModelForImageClassification.from_config(tiny_swin_config()).save_pretrained(saved)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(saved)
    description = build_model(str(saved), LABELS)[2].describe()
    assert "pretrained weights" not in description and "does not record how they were made" in description


@pytest.mark.parametrize(
    "preset, most_parameters",
    [
        ("scratch-swin", 4e6),
        ("scratch-pvt", 4e6),
        ("scratch-mobilevit", 4e6),
        ("scratch-cvt", 4e6),
        ("scratch-levit", 8e6),  # LeViT-128S: more weights, but fewer operations per image than the ViT
        ("scratch-swiftformer", 4e6),
    ],
)
def test_comparison_presets_build_at_the_size_their_processor_resizes_to(preset, most_parameters):
    model, processor, origin = build_model(preset, LABELS)
    assert config_image_size(model.config) == input_size(processor) == PRESETS[preset][1]["image_size"]
    assert 1e6 < model.num_parameters() < most_parameters and not origin.pretrained
