"""The pieces `train_vit.py` hands to `Trainer`: pixel transforms, the batch collator and the class-weighted loss."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from cxr.augment import augment_xray
from cxr.images import load_image
from cxr.models import input_size


def pixel_transform(processor, augment: bool, seed: int | None = None):
    """A `datasets.Dataset.with_transform` function: image files -> `pixel_values` + `labels`.

    Images are decoded by the project's one loader (`load_image`), optionally augmented, then
    resized and normalised by the model's own image processor, exactly as at inference.
    Expects the dataset's `image` column cast to `datasets.Image(decode=False)`.
    """
    size = input_size(processor)
    rng = random.Random(seed)

    def transform(batch):
        images = [load_image(item["path"] or item["bytes"], draft_size=size) for item in batch["image"]]
        if augment:
            images = [augment_xray(image, size, rng) for image in images]
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
