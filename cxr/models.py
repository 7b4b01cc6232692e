"""Which network to train: a pretrained checkpoint (Hub id or local folder) or a preset built from a config.

Offline, no weights can be downloaded, so the presets below build a ViT with random weights from a
`ViTConfig` alone. `build_model` always says which of the two it did, so the outputs can be honest.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

DEFAULT_CHECKPOINT = "google/vit-base-patch16-224-in21k"
DEFAULT_MODEL_DIR = "outputs/vit-xray"  # where train_vit.py writes and app.py reads, unless told otherwise

# ViT architectures trained from scratch (random init). Keys are what `--model` accepts.
PRESETS: dict[str, dict] = {
    # For tests and smoke runs only: trains in seconds, learns little.
    "scratch-tiny": dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    # The offline workhorse: ViT-Tiny width, 6 layers, 128 px (64 patches); an epoch of the Kaggle train split takes minutes on 2 CPU cores.
    "scratch-small": dict(image_size=128, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768),
    # Same width and depth with 8-pixel patches at 96 px (144 patches): smaller patches suit ViTs trained from scratch on few images.
    "scratch-small-p8": dict(image_size=96, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768),
    # The ViT-B/16 architecture at 224 px (the default checkpoint's shape) with random weights: for benchmarks, or GPUs.
    "scratch-base": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


@dataclass
class ModelOrigin:
    """Where a model's starting weights came from; written into metrics.json and the model card."""

    name: str  # the --model value
    pretrained: bool

    def describe(self) -> str:
        if self.pretrained:
            return f"fine-tuned from pretrained weights `{self.name}`"
        return f"trained from scratch (random initialisation, no pretrained weights) with the `{self.name}` preset"


def build_model(name: str, id2label: dict[int, str]):
    """Return (model, image_processor, ModelOrigin) for a preset name, a Hub id or a local folder."""
    label2id = {label: index for index, label in id2label.items()}
    if name in PRESETS:
        config = ViTConfig(**PRESETS[name], num_labels=len(id2label), id2label=id2label, label2id=label2id)
        size = PRESETS[name]["image_size"]
        # Same normalisation as Google's ViT checkpoints, so a scratch model and a fine-tuned one read pixels alike.
        processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return ViTForImageClassification(config), processor, ModelOrigin(name, pretrained=False)
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        model = AutoModelForImageClassification.from_pretrained(
            name, num_labels=len(id2label), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
        )
    except OSError as error:
        raise SystemExit(
            f"Could not load the checkpoint '{name}': {error}\n"
            "Without network access no pretrained weights can be downloaded. Train from scratch instead with "
            f"one of the presets: --model {' | '.join(PRESETS)} (see README)."
        ) from error
    return model, processor, ModelOrigin(name, pretrained=True)


def input_size(processor) -> int:
    """The side length in pixels that the image processor resizes to."""
    size = processor.size
    return int(size.get("height") or size.get("shortest_edge"))
