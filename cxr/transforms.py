"""From an image file in a prepared split to the tensors a model reads: `pixel_transform` and `collate`, shared by
training, evaluation and the feature pass.

    file -> load_image (the one loader) -> the image processor's resize, as uint8   (or that row of cxr.pixel_cache)
         -> [augmentation of the whole batch as tensors: cxr.augment] -> the processor's rescale and normalisation

The model's image processor is split in two around the augmentation: its resize (and crop, where it has one) makes
the uint8 image the pixel cache keeps, and its rescale and normalisation are applied to the batch. Without
augmentation the result is what the processor gives at inference (tests/test_pixel_cache.py).
"""

from __future__ import annotations

import json

import torch

from cxr.augment import augment_batch, random_views
from cxr.images import load_image
from cxr.models import input_size

NORMALISATION = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")  # the processor's 2nd half


def pixel_transform(processor, augment: bool, teacher_processor=None, cache=None):
    """A `datasets.Dataset.with_transform` function: image files -> `pixel_values` + `labels`.

    `datasets` calls it once per batch (the DataLoader fetches a batch at a time), so the augmentation runs on the
    batch. Each image is read from `cache` (a `cxr.pixel_cache.PixelCache`) where it holds the image, else decoded by
    the project's one loader; then optionally augmented and normalised as the model's image processor does.
    Expects the `image` column as `hf_data.load_prepared` gives it: undecoded (path or bytes).
    With a `teacher_processor` (distillation), the same view (crop, rotation, exposure) of each image also goes to
    the teacher as `teacher_pixel_values`, at the teacher's own input size and normalisation.
    """
    networks = {"pixel_values": processor}
    if teacher_processor is not None:
        networks["teacher_pixel_values"] = teacher_processor
    draft_size = max(input_size(network) for network in networks.values())

    def transform(batch):
        sources = [item["path"] or item["bytes"] for item in batch["image"]]
        decoded = {}

        def decode(index: int):
            if index not in decoded:  # once for both networks
                decoded[index] = load_image(sources[index], draft_size=draft_size)
            return decoded[index]

        # torch's global generator: Trainer seeds it and saves its state in each checkpoint, so --resume is exact.
        views = random_views(len(sources)) if augment else None
        result, resized = {}, {}
        for key, network in networks.items():
            settings = resize_settings(network)
            if settings not in resized:  # a teacher that resizes as the student does shares its view, made once
                pixels = resized_pixels(sources, network, cache, decode)
                resized[settings] = augment_batch(pixels, views) if augment else pixels.float() / 255
            result[key] = processor_normalize(network, resized[settings])
        return result | {"labels": batch["label"]}

    return transform


def resized_pixels(sources: list, processor, cache, decode) -> torch.Tensor:
    """(N, C, H, W) uint8: each image as `processor` resizes it, from `cache` where it holds the image (C may be 1
    there: grey), else `decode(index)`d and resized now."""
    rows = cache.rows_of(sources, processor) if cache is not None else [None] * len(sources)
    missing = [index for index, row in enumerate(rows) if row is None]
    if not missing:
        return torch.from_numpy(cache.array(processor)[rows])
    fresh = processor_resize(processor, [decode(index) for index in missing])
    if len(missing) == len(sources):
        return fresh
    pixels = torch.empty((len(sources), *fresh.shape[1:]), dtype=torch.uint8)
    pixels[missing] = fresh
    held = [index for index, row in enumerate(rows) if row is not None]
    pixels[held] = torch.from_numpy(cache.array(processor)[[rows[index] for index in held]])  # 1 channel: broadcast
    return pixels


def processor_resize(processor, images: list) -> torch.Tensor:
    """The first half of `processor`: its resize (and crop, where it has one), as (N, 3, H, W) uint8."""
    pixels = processor(images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    return pixels if pixels.dtype == torch.uint8 else pixels.round().clamp(0, 255).to(torch.uint8)


def resize_settings(processor) -> str:
    """The processor's configuration less its normalisation, as canonical JSON: two processors with the same settings
    make the same uint8 image of a file (and share a pixel cache)."""
    settings = {key: value for key, value in processor.to_dict().items() if key not in NORMALISATION}
    return json.dumps(settings, sort_keys=True, default=str)


def processor_normalize(processor, pixels: torch.Tensor) -> torch.Tensor:
    """The second half of `processor`: `pixels` (N, C, H, W; the uint8 values / 255, so in [0, 1]) rescaled and
    normalised as the processor does it, with as many channels as its mean and standard deviation have (a grey
    batch is expanded)."""
    scale = 255 * (processor.rescale_factor if processor.do_rescale else 1.0)
    pixels = pixels * scale
    if processor.do_normalize:
        mean = torch.as_tensor(processor.image_mean, dtype=pixels.dtype).reshape(1, -1, 1, 1)
        std = torch.as_tensor(processor.image_std, dtype=pixels.dtype).reshape(1, -1, 1, 1)
        pixels = (pixels - mean) / std
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        key: torch.tensor([example[key] for example in examples])
        if key == "labels"
        else torch.stack([example[key] for example in examples])
        for key in examples[0]
    }
