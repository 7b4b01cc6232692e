"""Training-time augmentation for chest X-rays, with Pillow only (torchvision does not import beside the CPU torch
here).

Geometric changes stay small and plausible for a radiograph: a slightly different crop and zoom, a
few degrees of rotation. Intensity changes (brightness, contrast, gamma) imitate different exposure
and equipment. No horizontal flip: the heart is on the left, and a mirrored chest is not a real X-ray.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageEnhance


def augment_xray(image: Image.Image, size: int, rng: random.Random = random) -> Image.Image:
    """A randomly cropped, rotated and re-exposed copy of `image`, resized to `size` x `size`."""
    width, height = image.size
    area_fraction = rng.uniform(0.75, 1.0)
    aspect = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
    crop_width = min(width, round(math.sqrt(area_fraction * width * height * aspect)))
    crop_height = min(height, round(math.sqrt(area_fraction * width * height / aspect)))
    left = rng.randint(0, width - crop_width)
    top = rng.randint(0, height - crop_height)
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + crop_width, top + crop_height))

    image = image.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    gamma = rng.uniform(0.8, 1.25)
    return image.point([round(255 * (value / 255) ** gamma) for value in range(256)] * len(image.getbands()))
