"""Where the evidence for a prediction came from: Grad-CAM on a ViT's patch tokens, blended over the X-ray.

Grad-CAM (Selvaraju et al. 2017) adapted to a Vision Transformer: take the patch tokens that enter the
last transformer block, weight each feature channel by the mean gradient of the chosen class's logit
with respect to it, sum over channels, keep the positive part. The result is one value per patch
(a 14 x 14 grid for a 224 px, 16 px-patch ViT; 8 x 8 for the `scratch-small` preset), stretched back
over the image.

What it shows, honestly: a coarse hint of which patches pushed the model towards that class. It is not a
lesion outline, not a diagnosis, and a model that learned a shortcut (a text marker, the image border)
will show exactly that shortcut, which is the main reason to look at it.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from transformers import Pipeline

SIDE = 512  # the overlay's longest side in pixels: plenty for a preview, small to send


def saliency_overlay(classifier: Pipeline, image: Image.Image, label: str | None = None, opacity: float = 0.6) -> Image.Image:
    """The RGB `image` (from `cxr.images.load_image`) with a Grad-CAM heat map for `label` blended on top.

    `classifier` is the image-classification pipeline from `cxr.predict.load_classifier` (only its model and
    image processor are used). `label` defaults to the model's top class. The result keeps the input's
    aspect ratio, scaled so that its longest side is `SIDE` pixels.
    """
    heat = grad_cam(classifier.model, classifier.image_processor, image, label)
    scale = SIDE / max(image.size)
    base = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    # Patch grid -> image size; bilinear, because a blocky grid looks more precise than it is.
    heat_image = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize(base.size, Image.BILINEAR)
    heat = np.asarray(heat_image, dtype=np.float32)[..., None] / 255.0
    colour = colormaps["jet"](heat[..., 0])[..., :3]
    # Blend in proportion to the heat: patches with no evidence leave the X-ray untouched.
    alpha = opacity * heat
    blended = (1 - alpha) * (np.asarray(base, dtype=np.float32) / 255.0) + alpha * colour
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), mode="RGB")


def grad_cam(model, processor, image: Image.Image, label: str | None = None) -> np.ndarray:
    """Grad-CAM over the patch grid for `label` (default: the top class), scaled to 0..1 (all zeros if no evidence)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixel_values = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"].to(device, dtype)
    with torch.enable_grad():
        outputs = model(pixel_values=pixel_values, output_hidden_states=True)
        logits = outputs.logits[0]
        index = int(logits.argmax()) if label is None else model.config.label2id[label]
        tokens = outputs.hidden_states[-2]  # what the last block reads: patch tokens can still reach the class token
        (gradient,) = torch.autograd.grad(logits[index], tokens)
    patch = model.config.patch_size
    rows, columns = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    # Patch tokens are the last rows*columns tokens (after the class token, and DeiT's distillation token).
    activations = tokens[0, -rows * columns :].detach().float()
    weights = gradient[0, -rows * columns :].float().mean(dim=0)
    cam = torch.relu(activations @ weights).reshape(rows, columns).cpu().numpy()
    peak = cam.max()
    return cam / peak if peak > 0 else np.zeros_like(cam)
