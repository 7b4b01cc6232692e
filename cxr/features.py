"""The one forward pass: logits and the features the out-of-distribution check reads, for any image classifier
`transformers` builds. Prediction, Grad-CAM, the ONNX export and the fitting of calibration and the X-ray check all
read the model through `forward_features`."""

from __future__ import annotations

import contextvars
import math
import threading

import numpy as np
import torch
from tqdm import tqdm

from cxr.transforms import collate, pixel_transform


class OnnxExportError(RuntimeError):
    """`onnx=True`, but torch's ONNX exporter cannot write this forward pass for this architecture (raised by
    `cxr.onnx_runtime`; defined here so that callers can catch it without importing onnxruntime)."""


def forward_features(model, pixel_values: torch.Tensor, saliency: bool = False) -> dict[str, torch.Tensor]:
    """The logits, as the model's own forward computes them, and two penultimate feature vectors per image.

    One path for any image classifier `transformers` builds (ViT, DeiT, Swin, PVTv2, MobileViT, ResNet, ConvNeXt,
    ...): the model's own forward with `output_hidden_states=True`, plus the input of its classifier head. Nothing
    here names an architecture; a new one needs no new code as long as its head is `model.classifier` or
    `model.head` and its hidden states are a token sequence (batch, tokens, features) or a feature map
    (batch, channels, height, width), as every `AutoModelForImageClassification` model we tried returns.

    - "cls": what the classifier head reads (a ViT's final-layernormed CLS token, a Swin's or a CNN's pooled
      vector), read by a forward pre-hook on the head;
    - "tokens": statistics of the last hidden state (before any final normalisation, so it keeps the scale a
      layernorm removes and sees the whole image, not only what the head reads). Its grid positions (the patch
      tokens, or a feature map's cells) give their mean per feature; where the sequence starts with class or
      distillation tokens (ViT, DeiT), those tokens are put before it (benchmarks/ood.py measured CLS + mean patch
      as the better detector for a ViT); where it has none (a CNN, Swin, PVTv2), the head reads little more than
      that mean, so the standard deviation per feature follows it instead: second-order statistics (texture,
      contrast), in which noise, documents and photos differ most from an X-ray.

    `saliency=True` also returns "hidden_states", the model's hidden states with autograd tracking the logits back
    to them (the model's weights should not require gradients, as in `cxr.predictor.load_classifier`):
    `cxr.saliency.grad_cam` takes its gradient at the last of them whose grid the logits depend on.
    Several threads may call it on one model at once (the app's parallel requests): each gets its own tensors.
    """
    model.eval()
    pixel_values = pixel_values.to(model.device, model.dtype)
    if saliency:
        # the graph then reaches every hidden state, whatever the weights
        pixel_values = pixel_values.detach().requires_grad_()
    _install_head_hook(model)
    recorded = []
    token = _HEAD_INPUTS.set(recorded)
    try:
        with torch.set_grad_enabled(saliency):
            outputs = model(pixel_values=pixel_values, output_hidden_states=True)
    finally:
        _HEAD_INPUTS.reset(token)
    if len(recorded) != 1:
        raise RuntimeError(
            f"{type(model).__name__}: its classifier head ran {len(recorded)} times in one forward pass; "
            "forward_features expects one"
        )
    last = outputs.hidden_states[-1].detach()
    grid, prefix = feature_grid(last)
    mean = grid.mean(dim=(2, 3))
    if prefix is not None:
        tokens = torch.cat([prefix.flatten(1), mean], dim=-1)
    else:
        tokens = torch.cat([mean, grid.std(dim=(2, 3), correction=0)], dim=-1)
    features = {"logits": outputs.logits, "cls": recorded[0].detach().flatten(1), "tokens": tokens}
    if saliency:
        features["hidden_states"] = tuple(outputs.hidden_states)
    return features


def feature_grid(hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A hidden state as a feature map (batch, features, rows, columns), and its leading class/distillation tokens.

    A feature map comes as it is (no such tokens: None). A token sequence (batch, tokens, features) ends with its
    patch tokens in row-major order (ViT, DeiT, Swin, LeViT); inputs are square (the image processor resizes to a
    square), so the grid is the largest square that fits and any tokens before it are class/distillation tokens
    (None where there are none)."""
    if hidden_state.dim() == 4:
        return hidden_state, None
    if hidden_state.dim() != 3:
        raise ValueError(
            f"a hidden state of shape {tuple(hidden_state.shape)} is neither a token sequence nor a feature map"
        )
    batch, length, width = hidden_state.shape
    side = math.isqrt(length)
    extra = length - side * side
    grid = hidden_state[:, extra:].transpose(1, 2).reshape(batch, width, side, side)
    return grid, (hidden_state[:, :extra] if extra else None)


def classifier_module(model) -> torch.nn.Module:
    """The module that turns the pooled features into logits: `model.classifier` (ViT, Swin, ResNet, ConvNeXt, PVTv2,
    MobileViT, CvT, ...) or `model.head` (SwiftFormer)."""
    for name in ("classifier", "head"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(
        f"{type(model).__name__} has no `classifier` or `head` module: "
        "not an image classifier forward_features can read"
    )


# The inputs of classifier heads during the current `forward_features` call: each call (each thread) sets its own
# list, so parallel passes through one model never see each other's tensors; None outside such a call.
_HEAD_INPUTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("cxr_head_inputs", default=None)
_HOOK_LOCK = threading.Lock()


def _record_head_input(module, args) -> None:
    kept = _HEAD_INPUTS.get()
    if kept is not None:
        kept.append(args[0])


def _install_head_hook(model) -> None:
    """A forward pre-hook on the classifier head that records its input, installed once per model (so no hook is
    ever added or removed while another thread runs the model); it does nothing outside `forward_features`."""
    head = classifier_module(model)
    if getattr(head, "_cxr_records_input", False):
        return
    with _HOOK_LOCK:
        if not getattr(head, "_cxr_records_input", False):
            head.register_forward_pre_hook(_record_head_input)
            head._cxr_records_input = True


def embed_split(
    model, processor, split, batch_size: int = 64, desc: str = "Features"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`forward_features` (as numpy arrays) and the labels for every image of a dataset split.

    The split comes from `hf_data.load_prepared` (undecoded image column): images go through the training
    transform (the project's one loader, no augmentation), as in evaluation."""
    loader = torch.utils.data.DataLoader(
        split.with_transform(pixel_transform(processor, augment=False)), batch_size=batch_size, collate_fn=collate
    )
    batches, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batches.append(forward_features(model, batch["pixel_values"]))
        labels.append(batch["labels"].numpy())
    return {key: np.concatenate([_numpy(batch[key]) for batch in batches]) for key in batches[0]}, np.concatenate(
        labels
    )


def classifier_heads(model) -> list[torch.nn.Linear]:
    """The Linear layers that give the logits: the classifier module's last Linear (a ViT's, Swin's or ConvNeXt's
    classifier itself; a ResNet's Flatten + Linear), then any other head beside the backbone whose output the model
    averages into the logits (SwiftFormer's distillation head), in the model's module order."""
    heads = []
    for child in model.children():
        if child is model.base_model:
            continue
        linears = [module for module in child.modules() if isinstance(module, torch.nn.Linear)]
        if linears and linears[-1].out_features == model.config.num_labels:
            heads.append(linears[-1])
    if not heads:
        raise TypeError(f"{type(model).__name__} has no Linear head giving its {model.config.num_labels} logits")
    return heads


def _numpy(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
