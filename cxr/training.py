"""The pieces `train_vit.py` hands to `Trainer`: pixel transforms, the batch collator, the class-weighted loss, and a
`Trainer` that reloads checkpoints correctly."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from cxr.augment import augment_xray
from cxr.images import load_image
from cxr.models import input_size


def pixel_transform(processor, augment: bool):
    """A `datasets.Dataset.with_transform` function: image files -> `pixel_values` + `labels`.

    Images are decoded by the project's one loader (`load_image`), optionally augmented, then
    resized and normalised by the model's own image processor, exactly as at inference.
    Expects the `image` column as `hf_data.load_prepared` gives it: undecoded (path or bytes).
    """
    size = input_size(processor)

    def transform(batch):
        images = [load_image(item["path"] or item["bytes"], draft_size=size) for item in batch["image"]]
        if augment:
            # Python's global generator: Trainer seeds it and saves its state in each checkpoint, so --resume is exact.
            images = [augment_xray(image, size, random) for image in images]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch["label"]}

    return transform


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1), so the rarer normal and viral classes count as much as bacterial."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def weighted_loss(weights: torch.Tensor, label_smoothing: float = 0.0):
    """A `compute_loss_func` for `Trainer`: cross-entropy with per-class weights."""

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        return F.cross_entropy(logits, labels, weight=weights.to(logits.device), label_smoothing=label_smoothing)

    return compute_loss


class XrayTrainer(Trainer):
    """`Trainer` whose checkpoint reloads go through `from_pretrained`.

    transformers 5.23's Trainer reloads a checkpoint (for `resume_from_checkpoint` and
    `load_best_model_at_end`) with a raw `load_state_dict(strict=False)`. `save_pretrained` writes ViT
    weights under their legacy names (`vit.encoder.layer.*`) while the model now calls them
    `vit.layers.*`, so every encoder weight is silently skipped: resume restarts from random weights and
    "best model" is really the last one (huggingface/transformers#43701). `from_pretrained` applies the
    renaming, so we load through it and copy the weights in, strictly.
    """

    def _load_weights(self, checkpoint: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        reloaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self):
        self._load_weights(self.state.best_model_checkpoint)
