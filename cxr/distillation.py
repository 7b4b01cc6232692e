"""Hard-label distillation (DeiT, Touvron et al. 2021): the student also learns the top label a trained teacher gives
the same augmented image. The idea is that a convolutional teacher passes on the locality a ViT trained from scratch
on few images lacks. Overrides only `Trainer`'s public `compute_loss`."""

from __future__ import annotations

import torch


class Distillation:
    """A `Trainer` mixin. With a `teacher` (a trained classifier), the training loss is `(1 - distillation_weight)` x
    the loss on the true labels plus `distillation_weight` x the same loss on the teacher's top label for the image
    (`teacher_pixel_values`, from `pixel_transform`). Evaluation and the saved model involve the student alone."""

    def __init__(self, *args, teacher=None, distillation_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device) if teacher is not None else None
        self.distillation_weight = distillation_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_pixel_values = inputs.pop("teacher_pixel_values", None)
        if self.teacher is None or teacher_pixel_values is None:  # no teacher, or an evaluation batch
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        with torch.no_grad():
            teacher_labels = self.teacher(pixel_values=teacher_pixel_values).logits.argmax(dim=-1)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        distillation_loss = self.compute_loss_func(outputs, teacher_labels, num_items_in_batch=num_items_in_batch)
        loss = (1 - self.distillation_weight) * loss + self.distillation_weight * distillation_loss
        return (loss, outputs) if return_outputs else loss
