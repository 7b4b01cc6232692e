"""Training-time augmentation for chest X-rays, on whole batches of tensors.

Geometric changes stay small and plausible for a radiograph: a slightly different crop and zoom (area 75-100 % of the
image, aspect 0.9-1.1), a few degrees of rotation (±10°, black where the rotated crop leaves the frame). Intensity
changes imitate different exposure and equipment: brightness and contrast ×0.8-1.2, gamma 0.8-1.25. No horizontal
flip: the heart is on the left, and a mirrored chest is not a real X-ray.

The images arrive as the model's image processor resized them (uint8, `cxr.transforms`); crop and rotation are one
affine resampling (`affine_grid` + `grid_sample`) of the whole batch, the intensity changes elementwise operations.
Every random number comes from torch's global generator, in one draw per batch (`random_views`): Trainer seeds it and
saves its state in each checkpoint, so `--resume` continues with the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AREA = (0.75, 1.0)  # share of the image the crop keeps
ASPECT = (0.9, 1.1)  # crop width / height, log-uniform
DEGREES = 10.0  # rotation, uniform in ±DEGREES
BRIGHTNESS = (0.8, 1.2)
CONTRAST = (0.8, 1.2)
GAMMA = (0.8, 1.25)


@dataclass
class Views:
    """One random view per image of a batch, each field a tensor of shape (N,): the crop box in fractions of the
    image's width and height (`left`, `top`, `width`, `height`), the rotation in radians and the three exposure
    factors. The same views applied to two copies of an image at different sizes (a student and its teacher) show
    both networks the same crop, angle and exposure."""

    left: torch.Tensor
    top: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor
    angle: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor


def random_views(count: int) -> Views:
    """`count` views drawn from torch's global generator (one draw for the batch). Where several processes train one
    model, each seeded alike, all draw the views of the whole step and each takes its own share: without that, every
    process would show its images the same views."""
    rank, processes = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, processes = torch.distributed.get_rank(), torch.distributed.get_world_size()
    views = _draw_views(count * processes)
    share = slice(rank * count, (rank + 1) * count)
    return Views(**{name: getattr(views, name)[share] for name in Views.__dataclass_fields__})


def _draw_views(count: int) -> Views:
    """`count` views from one draw of torch's global generator."""

    def uniform(column: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * column

    u = torch.rand(count, 8, dtype=torch.float64).unbind(1)
    area = uniform(u[0], *AREA)
    aspect = torch.exp(uniform(u[1], math.log(ASPECT[0]), math.log(ASPECT[1])))
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    return Views(
        left=u[2] * (1 - width),
        top=u[3] * (1 - height),
        width=width,
        height=height,
        angle=torch.deg2rad(uniform(u[4], -DEGREES, DEGREES)),
        brightness=uniform(u[5], *BRIGHTNESS),
        contrast=uniform(u[6], *CONTRAST),
        gamma=uniform(u[7], *GAMMA),
    )


def augment_batch(images: torch.Tensor, views: Views) -> torch.Tensor:
    """`images` (N, C, H, W, uint8, as the image processor resized them) -> the views of them, float in [0, 1], same
    shape: each crop box resampled to the whole frame (bilinear) and rotated about the centre, then re-exposed."""
    height, width = images.shape[-2:]
    pixels = images.float() / 255

    # Each output pixel's centre (x, y), normalised to [-1, 1] as grid_sample reads them -> q, the same point in the
    # un-rotated crop -> the crop box's centre + its half-size x q, in the image. Elementwise, per image: (N, H, W).
    x = ((2 * torch.arange(width) + 1) / width - 1).view(1, 1, width)
    y = ((2 * torch.arange(height) + 1) / height - 1).view(1, height, 1)
    cos, sin = per_image(views.angle.cos(), 3), per_image(views.angle.sin(), 3)
    qx, qy = cos * x + sin * y, cos * y - sin * x
    grid = torch.stack(
        [
            per_image(2 * views.left + views.width - 1, 3) + per_image(views.width, 3) * qx,
            per_image(2 * views.top + views.height - 1, 3) + per_image(views.height, 3) * qy,
        ],
        dim=-1,
    )
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (qx.abs() <= 1) & (qy.abs() <= 1)  # where the rotated crop covers the frame: black elsewhere
    pixels = pixels * inside.unsqueeze(1)

    pixels = (pixels * per_image(views.brightness)).clamp(0, 1)
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)  # contrast stretches about the image's mean grey
    pixels = (mean + per_image(views.contrast) * (pixels - mean)).clamp(0, 1)
    return pixels.pow(per_image(views.gamma))


def per_image(values: torch.Tensor, dimensions: int = 4) -> torch.Tensor:
    """(N,) -> float32 (N, 1, ...), to broadcast over each image."""
    return values.float().view(-1, *[1] * (dimensions - 1))
