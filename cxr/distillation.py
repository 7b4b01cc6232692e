"""Distillation from a trained teacher: the student also learns what the teacher says of the same augmented image.
Hard (DeiT, Touvron et al. 2021): the teacher's top label. Soft (Hinton et al. 2015): the teacher's whole probability
vector, by KL divergence at a temperature, which also passes on how unsure it is between bacterial and viral. The
idea is that a convolutional teacher passes on the locality a transformer trained from scratch on few images lacks.
Overrides only `Trainer`'s public `compute_loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILLATION_KINDS = ("hard", "soft")


def soft_distillation_loss(student_logits, teacher_logits, temperature: float, num_items_in_batch=None):
    """KL(teacher || student) of the temperature-softened probabilities, times temperature² so that its gradients
    keep their size whatever the temperature (Hinton et al. 2015), summed over the batch and divided like
    `cxr.training.weighted_loss` (by the images in the whole accumulated step)."""
    total = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        log_target=True,
        reduction="sum",
    )
    count = num_items_in_batch if num_items_in_batch is not None else len(student_logits)
    return total * temperature**2 / count


class Distillation:
    """A `Trainer` mixin. With a `teacher` (a trained classifier), the training loss is `(1 - distillation_weight)` x
    the loss on the true labels plus `distillation_weight` x the loss against the teacher on the same image
    (`teacher_pixel_values`, from `pixel_transform`): the true-label loss on its top label (`distillation="hard"`), or
    `soft_distillation_loss` at `distillation_temperature` (`"soft"`). Evaluation and the saved model involve the
    student alone."""

    def __init__(
        self,
        *args,
        teacher=None,
        distillation_weight: float = 0.5,
        distillation: str = "hard",
        distillation_temperature: float = 1.0,
        **kwargs,
    ):
        if distillation not in DISTILLATION_KINDS:
            raise ValueError(f"distillation must be one of {DISTILLATION_KINDS}, not {distillation!r}.")
        if distillation_temperature <= 0:
            raise ValueError(f"distillation_temperature must be positive, not {distillation_temperature}.")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device) if teacher is not None else None
        self.distillation_weight = distillation_weight
        self.distillation = distillation
        self.distillation_temperature = distillation_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_pixel_values = inputs.pop("teacher_pixel_values", None)
        if self.teacher is None or teacher_pixel_values is None:  # no teacher, or an evaluation batch
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        with torch.no_grad():
            teacher_logits = self.teacher(pixel_values=teacher_pixel_values).logits
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.distillation == "soft":
            distillation_loss = soft_distillation_loss(
                outputs["logits"], teacher_logits, self.distillation_temperature, num_items_in_batch
            )
        else:
            distillation_loss = self.compute_loss_func(
                outputs, teacher_logits.argmax(dim=-1), num_items_in_batch=num_items_in_batch
            )
        loss = (1 - self.distillation_weight) * loss + self.distillation_weight * distillation_loss
        return (loss, outputs) if return_outputs else loss
