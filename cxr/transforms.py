"""From an image file in a prepared split to the tensors a model reads: `pixel_transform` (the project's one loader,
optional augmentation, the model's own image processor) and `collate`, shared by training, evaluation and the
feature pass."""

from __future__ import annotations

import random

import torch

from cxr.augment import augment_xray
from cxr.images import load_image
from cxr.models import input_size


def pixel_transform(processor, augment: bool, teacher_processor=None):
    """A `datasets.Dataset.with_transform` function: image files -> `pixel_values` + `labels`.

    Images are decoded by the project's one loader (`load_image`), optionally augmented, then
    resized and normalised by the model's own image processor, exactly as at inference.
    Expects the `image` column as `hf_data.load_prepared` gives it: undecoded (path or bytes).
    With a `teacher_processor` (distillation), the same augmented image also goes through the teacher's own
    processor as `teacher_pixel_values`: both networks see one view, each at its own input size.
    """
    size = max(input_size(processor), input_size(teacher_processor) if teacher_processor else 0)

    def transform(batch):
        images = [load_image(item["path"] or item["bytes"], draft_size=size) for item in batch["image"]]
        if augment:
            # Python's global generator: Trainer seeds it and saves its state in each checkpoint, so --resume is exact.
            images = [augment_xray(image, size, random) for image in images]
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        if teacher_processor is None:
            return {"pixel_values": pixel_values, "labels": batch["label"]}
        return {
            "pixel_values": pixel_values,
            "teacher_pixel_values": teacher_processor(images, return_tensors="pt")["pixel_values"],
            "labels": batch["label"],
        }

    return transform


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        key: torch.tensor([example[key] for example in examples])
        if key == "labels"
        else torch.stack([example[key] for example in examples])
        for key in examples[0]
    }
