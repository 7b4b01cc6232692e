"""Which network to train: a pretrained checkpoint (Hub id or local folder) or a preset built from a config.

Offline, no weights can be downloaded, so the presets below build a network with random weights from a config
alone: Vision Transformers (`ViTConfig`), transformers with built-in locality (Swin, PVTv2, MobileViT V2, CvT, LeViT,
SwiftFormer) and, for comparison, small ResNets (`ResNetConfig`), all through `AutoModelForImageClassification` and
the same image processor; a folder holding only a config.json is built the same way. `build_model` always says which
(pretrained, preset, config, or weights of unrecorded origin) it did, so the outputs can be honest; a folder written
by `pretrain_mae.py` (a ViT pretrained on the X-rays themselves, no downloads) says so in its pretraining.json, and
that goes into the description too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    CvtConfig,
    LevitConfig,
    MobileViTV2Config,
    PretrainedConfig,
    PvtV2Config,
    ResNetConfig,
    SwiftFormerConfig,
    SwinConfig,
    ViTConfig,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from cxr.run_record import trained_split_sizes

DEFAULT_CHECKPOINT = "google/vit-base-patch16-224-in21k"
# The model that ships with the code (its card: models/swiftformer-xray/README.md): what app.py, predict.py, a
# Space and the benchmarks read unless told otherwise. Training never writes there unless told to.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "swiftformer-xray"
DEFAULT_ENCODER_DIR = "outputs/mae-encoder"  # where pretrain_mae.py writes and --recipe vit-mae reads

# Architectures trained from scratch (random init): name -> (config class, its arguments). Keys are what `--model`
# accepts; `image_size` is the input side in pixels the image processor resizes to.
PRESETS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    # For tests and smoke runs only: trains in seconds, learns little.
    "scratch-tiny": (
        ViTConfig,
        dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
    ),
    # The offline workhorse: ViT-Tiny width, 6 layers, 128 px (64 patches); small enough that a CPU trains it on the
    # Kaggle train split.
    "scratch-small": (
        ViTConfig,
        dict(
            image_size=128,
            patch_size=16,
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=3,
            intermediate_size=768,
        ),
    ),
    # Same width and depth with 8-pixel patches at 96 px (144 patches): smaller patches suit ViTs trained from scratch
    # on few images.
    "scratch-small-p8": (
        ViTConfig,
        dict(
            image_size=96,
            patch_size=8,
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=3,
            intermediate_size=768,
        ),
    ),
    # The ViT-B/16 architecture at 224 px (the default checkpoint's shape) with random weights: for benchmarks, or GPUs.
    "scratch-base": (
        ViTConfig,
        dict(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
    ),
    # The convolutional baseline for scratch-small: ResNet-18's layout (basic blocks, 2-2-2-2) at a quarter of its
    # width, 128 px (a 4 x 4 map after the last stage). About the same parameters (2.8 M) and training time per image
    # on a CPU.
    # ResNetConfig has no image_size field; it is kept in config.json as a record of the input size, as a ViT's is.
    "scratch-resnet": (
        ResNetConfig,
        dict(
            image_size=128, layer_type="basic", embedding_size=32, depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 128, 256]
        ),
    ),
    # For tests: two one-block stages, 32 px (a 4 x 4 map after the last stage).
    "scratch-tiny-resnet": (
        ResNetConfig,
        dict(image_size=32, layer_type="basic", embedding_size=8, depths=[1, 1], hidden_sizes=[8, 16]),
    ),
    # Transformers with the locality a plain ViT lacks, for the offline architecture comparison at about the ViT's cost
    # (docs/model-comparison.md: a measured pilot chose each one's size and resolution).
    # Swin (windowed attention, patch merging): Swin-T's layout at half width and three stages, 4-px patches at 128 px,
    # 8 x 8 windows on grids of 32, 16 and 8 tokens (the last stage's one window is global attention).
    "scratch-swin": (
        SwinConfig,
        dict(image_size=128, patch_size=4, embed_dim=48, depths=[2, 2, 6], num_heads=[3, 6, 12], window_size=8),
    ),
    # PVTv2 (overlapping convolutional patch embeddings, spatial-reduction attention): the B0 layout of Wang et al.
    # 2022, at 128 px.
    "scratch-pvt": (
        PvtV2Config,
        dict(image_size=128, hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8]),
    ),
    # MobileViT V2 (MobileNet convolutions interleaved with separable-attention transformer blocks): MobileViTV2-0.5,
    # 128 px.
    "scratch-mobilevit": (MobileViTV2Config, dict(image_size=128, width_multiplier=0.5)),
    # CvT (convolutional token embeddings and projections): CvT-13's three stages at half width and 1-2-4 blocks,
    # 128 px.
    # CvtConfig has no image_size field; as for the ResNet, it is kept in config.json as a record of the input size.
    "scratch-cvt": (CvtConfig, dict(image_size=128, embed_dim=[32, 96, 192], num_heads=[1, 2, 3], depth=[1, 2, 4])),
    # LeViT (a four-convolution stem, then attention stages that shrink the grid): LeViT-128S of Graham et al. 2021 at
    # 160 px (10 x 10, 5 x 5 and 3 x 3 tokens). LeViT has two classification heads; `architectures` picks the plain one,
    # which a fresh config cannot choose by itself.
    "scratch-levit": (
        LevitConfig,
        dict(
            image_size=160,
            hidden_sizes=[128, 256, 384],
            depths=[2, 3, 4],
            num_attention_heads=[4, 6, 8],
            key_dim=[16, 16, 16],
            architectures=["LevitForImageClassification"],
        ),
    ),
    # SwiftFormer (a convolution-transformer hybrid: depthwise-convolution blocks with batch norm, and one efficient
    # additive-attention block closing each of its four stages): SwiftFormer-XS of Shaker et al. 2023 at 128 px.
    "scratch-swiftformer": (SwiftFormerConfig, dict(image_size=128)),
}


PRETRAINING_FILE = "pretraining.json"  # written by pretrain_mae.py beside the encoder's weights


@dataclass
class ModelOrigin:
    """Where a model's starting weights came from; written into metrics.json and the model card."""

    name: str  # the --model value
    pretrained: bool
    pretraining: str | None = None  # for a pretrain_mae.py folder: how its weights were made (in-domain, no downloads)
    teacher: str | None = None  # with --teacher: the trained model whose predictions it also learned from
    teacher_command: str | None = None  # the command that trained the teacher (its run.json), for the card
    teacher_figures: str | None = None  # the teacher's own validation figures, for the card
    base_model: str | None = (
        None  # the Hub id it was fine-tuned from (None for presets and local folders): the card's `base_model`
    )

    from_config: bool = False  # not pretrained: built from the config.json in the folder `name` rather than a preset
    unrecorded: bool = (
        False  # a local folder with weights but no record of how they were made (e.g. saved from a config)
    )

    def describe(self) -> str:
        if self.pretraining:
            start = f"fine-tuned from `{self.name}`, {self.pretraining}"
        elif self.unrecorded:
            start = (
                f"started from the weights in the local folder `{self.name}` "
                "(random if it was saved from a config: the folder does not record how they were made)"
            )
        elif self.pretrained:
            start = f"fine-tuned from pretrained weights `{self.name}`"
        elif self.from_config:
            start = (
                "trained from scratch (random initialisation, no pretrained weights) "
                f"with the architecture in `{self.name}/config.json`"
            )
        else:
            start = f"trained from scratch (random initialisation, no pretrained weights) with the `{self.name}` preset"
        return start + (
            f", learning also from the predictions of the trained model `{self.teacher}` (distillation)"
            if self.teacher
            else ""
        )


def build_model(name: str, id2label: dict[int, str]):
    """Return (model, image_processor, ModelOrigin) for a preset name, a Hub id or a local folder."""
    label2id = {label: index for index, label in id2label.items()}
    if name in PRESETS:
        model, processor = build_preset(name, id2label)
        return model, processor, ModelOrigin(name, pretrained=False)
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        # A folder with a config and no weights (`SomeConfig(...).save_pretrained(folder)`): that architecture from
        # scratch.
        config = AutoConfig.from_pretrained(folder, num_labels=len(id2label), id2label=id2label, label2id=label2id)
        processor = (
            AutoImageProcessor.from_pretrained(folder)
            if (folder / "preprocessor_config.json").is_file()
            else square_processor(config_image_size(config))
        )
        return (
            AutoModelForImageClassification.from_config(config),
            processor,
            ModelOrigin(name, pretrained=False, from_config=True),
        )
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        # id2label sets the number of labels; a head of another size (e.g. ImageNet's) is replaced by a new one.
        model = AutoModelForImageClassification.from_pretrained(
            name, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
    except OSError as error:
        missing_folder = is_local_path(name) and not Path(name).expanduser().exists()
        raise SystemExit(
            f"Could not load the checkpoint '{name}': {error}\n"
            + (
                f"There is no folder '{name}' here "
                "(an encoder for --recipe vit-mae is written by `python pretrain_mae.py`).\n"
                if missing_folder
                else ""
            )
            + "Without network access no pretrained weights can be downloaded. Train from scratch instead with "
            f"one of the presets: --model {' | '.join(PRESETS)} (see README)."
        ) from error
    pretraining = Path(name) / PRETRAINING_FILE
    description = json.loads(pretraining.read_text())["description"] if pretraining.is_file() else None
    # A local folder that is neither a trained model folder (metrics.json) nor an MAE encoder (pretraining.json) may
    # hold random weights saved from a config: say where the weights came from rather than calling them pretrained.
    unrecorded = folder.is_dir() and description is None and not (folder / "metrics.json").is_file()
    return (
        model,
        processor,
        ModelOrigin(
            name,
            pretrained=True,
            pretraining=description,
            base_model=None if is_local_path(name) else name,
            unrecorded=unrecorded,
        ),
    )


def load_teacher(folder: str, id2label: dict[int, str], split_sizes: dict[str, int] | None):
    """Return (model, image_processor) of a model folder written by train_vit.py, to distil from (`--teacher`).

    Refused, with the reason, unless it predicts the same classes in the same order and was trained on the same
    train/validation split (sizes in its metrics.json): a teacher that trained on this run's validation images would
    leak them into the student, and its scores on them would flatter. `split_sizes` None: not checked here (with
    several processes, the one that prepared the data checks for all).
    """
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"No trained model at '{folder}' to learn from (no config.json there): "
            "train the teacher first, e.g. with --model scratch-resnet."
        )
    model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True)
    if {int(index): label for index, label in model.config.id2label.items()} != id2label:
        raise SystemExit(
            f"The teacher '{folder}' predicts {model.config.id2label}, not this data set's classes {id2label}."
        )
    teacher_sizes = trained_split_sizes(path)
    if split_sizes is not None and teacher_sizes != split_sizes:
        raise SystemExit(
            f"The teacher '{folder}' was trained on other splits ({teacher_sizes or 'unknown: no metrics.json'}) "
            f"than this run's ({split_sizes}): it may have seen this run's validation images. "
            "Train it on the same data, --validation_fraction and --split_seed."
        )
    return model, AutoImageProcessor.from_pretrained(path)


def is_local_path(name: str) -> bool:
    """Whether a model name means a folder on this machine rather than a Hub id ("owner/name"): this project's
    default folders, a path starting with . / or ~, any other number of slashes, or a path whose first folder exists
    here."""
    return (
        name in (str(SHIPPED_MODEL_DIR), DEFAULT_ENCODER_DIR)
        or name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or Path(name).expanduser().parent.exists()
    )


def default_output_dir(model: str) -> str:
    """Where train_vit.py writes when no --output_dir is given: outputs/<architecture family>-xray, after what --model
    builds (outputs/swiftformer-xray, outputs/resnet-xray; outputs/vit-xray for the default ViT, as before)."""
    if model in PRESETS:
        family = PRESETS[model][0].model_type
    elif model == DEFAULT_CHECKPOINT:
        family = "vit"
    else:
        try:
            family = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError):  # offline and not cached, or not a model: its own name says it best
            family = Path(model).name
    return f"outputs/{family.replace('_', '-')}-xray"


def build_preset(name: str, id2label: dict[int, str], **overrides):
    """(model with random weights, image processor) of a preset, with any config arguments replaced by `overrides`
    (e.g. image_size=160 for a pilot at another resolution)."""
    config_class, arguments = PRESETS[name]
    arguments = {**arguments, **overrides}
    config = config_class(
        **arguments,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
    )
    return AutoModelForImageClassification.from_config(config), square_processor(arguments["image_size"])


def preset_image_processor(name: str) -> ViTImageProcessorPil:
    """The image processor of a preset: resize to its `image_size` and scale to [-1, 1]."""
    return square_processor(PRESETS[name][1]["image_size"])


def square_processor(size: int) -> ViTImageProcessorPil:
    """Resize to size x size and scale to [-1, 1]: the same resize and normalisation as Google's ViT checkpoints for
    every network trained here from scratch, convolutional ones included, so a scratch model and a fine-tuned one read
    pixels alike and a comparison differs only in the network."""
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def config_image_size(config: PretrainedConfig) -> int:
    """The input side a config records (`image_size`, an int or a pair); 224, the usual ImageNet size, if none."""
    size = getattr(config, "image_size", None) or 224
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def input_size(processor) -> int:
    """The side length in pixels that the image processor resizes to."""
    size = processor.size
    return int(size.get("height") or size.get("shortest_edge"))
