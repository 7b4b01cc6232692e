"""Mixup (Zhang et al. 2018) of training batches: each image is blended with another image of its batch,
λ·a + (1 − λ)·b with λ ~ Beta(α, α), and its label alike. With a teacher (`cxr.distillation`) the teacher is shown
the same blend, so the student learns the teacher's answers between images too ("function matching", Beyer et al.
2022, "Knowledge distillation: A good teacher is patient and consistent"). Overrides only `Trainer`'s public
`compute_loss`; evaluation batches pass unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIXED_INPUTS = ("pixel_values", "teacher_pixel_values")  # the views a training batch carries (cxr.transforms)


def mix_batch(inputs: dict, alpha: float, num_classes: int) -> dict:
    """A copy of the batch `inputs` with each image blended with another of the batch (one λ and one pairing for
    every view) and `labels` turned into the matching blend of one-hot vectors, which `cxr.training.weighted_loss`
    takes as class probabilities."""
    labels = inputs["labels"]
    share = torch.distributions.Beta(alpha, alpha).sample().item()
    partner = torch.randperm(len(labels), device=labels.device)
    mixed = dict(inputs)
    for key in MIXED_INPUTS:
        if key in inputs:
            mixed[key] = share * inputs[key] + (1 - share) * inputs[key][partner]
    one_hot = F.one_hot(labels, num_classes).float()
    mixed["labels"] = share * one_hot + (1 - share) * one_hot[partner]
    return mixed


class Mixup:
    """A `Trainer` mixin: with `mixup_alpha` > 0, each training batch goes through `mix_batch` before the loss (and
    the teacher, when `cxr.distillation.Distillation` comes after this class). 0 leaves batches as they are."""

    def __init__(self, *args, mixup_alpha: float = 0.0, **kwargs):
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be 0 (off) or positive, not {mixup_alpha}.")
        super().__init__(*args, **kwargs)
        self.mixup_alpha = mixup_alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mixup_alpha > 0 and model.training and "labels" in inputs:
            inputs = mix_batch(inputs, self.mixup_alpha, self.model.config.num_labels)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
