"""Where the evidence for a prediction came from: Grad-CAM on the network's last feature grid, blended over the X-ray.

Grad-CAM (Selvaraju et al. 2017): take a late grid of activations, weight each feature channel by the mean
gradient of the chosen class's logit with respect to it, sum over channels, keep the positive part.
The grid is the last hidden state the model returns whose grid the logits depend on, for any architecture: for a
convolutional network (ResNet, ConvNeXt) the classic one, the last stage's feature map (4 x 4 for the
`scratch-resnet` preset); for a Swin its last stage's tokens laid out as their window grid; for a Vision
Transformer the patch tokens that enter the last transformer block: one value per patch (a 14 x 14 grid for a
224 px, 16 px-patch ViT; 8 x 8 for the `scratch-small` preset). The grid is stretched back over the image.

What it shows, honestly: a coarse hint of which regions pushed the model towards that class. It is not a
lesion outline, not a diagnosis, and a model that learned a shortcut (a text marker, the image border)
will show exactly that shortcut, which is the main reason to look at it.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from cxr.features import feature_grid

SIDE = 512  # the overlay's longest side in pixels: plenty for a preview, small to send
JET = np.round(255 * colormaps["jet"](np.arange(256) / 255)[:, :3]).astype(np.uint8)  # heat 0..255 -> RGB colour


def saliency_overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.6) -> Image.Image:
    """The RGB `image` (from `cxr.images.load_image`) with the heat map `heat` (from `grad_cam`, 0..1) blended on top.

    The result keeps the input's aspect ratio, scaled so that its longest side is `SIDE` pixels.
    Done on 8-bit images in Pillow, several times faster than a float blend in numpy
    (docs/feature-path-and-prediction-sets.md).
    """
    scale = SIDE / max(image.size)
    base = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
    )
    # Feature grid -> image size; bilinear, because a blocky grid looks more precise than it is.
    heat_image = Image.fromarray(np.round(heat * 255).astype(np.uint8), mode="L").resize(base.size, Image.BILINEAR)
    colour = Image.merge("RGB", [heat_image.point(JET[:, channel].tolist()) for channel in range(3)])
    # Blend in proportion to the heat: patches with no evidence leave the X-ray untouched.
    return Image.composite(colour, base, heat_image.point(lambda value: round(opacity * value)))


def grad_cam(outputs: dict[str, torch.Tensor], class_indices: list[int]) -> np.ndarray:
    """Grad-CAM over the feature grid, one map per image of the batch for its class in `class_indices`.

    `outputs` comes from `cxr.features.forward_features(..., saliency=True)`. The grid is the last of its
    "hidden_states" whose grid the chosen logits depend on, as `cxr.features.feature_grid` lays it out: a CNN's,
    PVTv2's or MobileViT's last feature map, a Swin's last token sequence, and for a ViT or DeiT the tokens entering
    the last block (the last block's output reaches the head only through its class token, so its patch tokens get
    no gradient; one block earlier they still reach the class token). The choice is made by the gradient itself,
    not by the architecture's name. Returns an array (batch, rows, columns), each map scaled to 0..1 (all zeros
    where there is no evidence).
    """
    logits = outputs["logits"]
    # Images of a batch do not interact, so one backward pass of the sum gives each image its own gradient.
    chosen = logits[torch.arange(len(class_indices)), torch.as_tensor(class_indices)].sum()
    for hidden_state in reversed(outputs["hidden_states"]):
        (gradient,) = torch.autograd.grad(chosen, hidden_state, retain_graph=True, allow_unused=True)
        if gradient is None:
            continue
        grid_gradient = feature_grid(gradient)[0]
        if bool(grid_gradient.any()):
            break
    else:
        raise ValueError("the logits depend on no hidden state's grid: nothing for Grad-CAM to show")
    activations = feature_grid(hidden_state.detach())[0].float()
    # one weight per channel, the gradient's spatial mean
    weights = grid_gradient.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((activations * weights).sum(dim=1)).cpu().numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
