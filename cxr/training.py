"""The pieces `train_vit.py` (and `pretrain_mae.py`) hand to `Trainer` besides `cxr.transforms`: the
class-weighted loss, a `Trainer` that reloads checkpoints correctly and can evaluate, select and save a moving average
of the weights and learn from a teacher network, and two checks on the run itself (a writable output folder up
front, peak memory at the end)."""

from __future__ import annotations

import os
import json
import resource
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR



def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1), so the rarer normal and viral classes count as much as bacterial."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def weighted_loss(weights: torch.Tensor, label_smoothing: float = 0.0):
    """A `compute_loss_func` for `Trainer`: cross-entropy with per-class weights, averaged over the images of a step."""

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        total = F.cross_entropy(logits, labels, weight=weights.to(logits.device), label_smoothing=label_smoothing, reduction="sum")
        # Given a compute_loss_func, Trainer leaves the division to it and passes the number of images in the whole
        # (gradient-accumulated) step: summing per micro-batch and dividing by that total makes 2 x 16 images with
        # --gradient_accumulation_steps 2 the same step as 32 at once. Evaluation passes no count: average the batch.
        return total / (num_items_in_batch if num_items_in_batch is not None else len(labels))

    return compute_loss


TRAINING_WEIGHTS = "training_weights.safetensors"  # in a checkpoint whose model is the average: the weights being trained


class XrayTrainer(Trainer):
    """`Trainer` whose checkpoint reloads go through `from_pretrained`, with optional weight averaging.

    transformers 5.23's Trainer reloads a checkpoint (for `resume_from_checkpoint` and
    `load_best_model_at_end`) with a raw `load_state_dict(strict=False)`. `save_pretrained` writes ViT
    weights under their legacy names (`vit.encoder.layer.*`) while the model now calls them
    `vit.layers.*`, so every encoder weight is silently skipped: resume restarts from random weights and
    "best model" is really the last one (huggingface/transformers#43701). `from_pretrained` applies the
    renaming, so we load through it and copy the weights in, strictly.

    `weight_average_decay` > 0 keeps an exponential moving average of the weights, updated after every optimizer
    step, and swaps it into the model for each evaluation and checkpoint: validation scores, the best-checkpoint
    choice and the saved model are the average's, which is steadier from epoch to epoch than the weights of the
    last step. Each checkpoint also keeps the weights being trained (`TRAINING_WEIGHTS`), so `--resume` continues
    exactly. Trainer has no built-in averaging (transformers 5.23).

    With a `teacher` (a trained classifier; distillation as in DeiT, Touvron et al. 2021, with hard labels) the
    training loss is `(1 - distillation_weight)` x the loss on the true labels plus `distillation_weight` x the same
    loss on the teacher's top label for the same augmented image (`teacher_pixel_values` from `pixel_transform`).
    DeiT's idea is that a convolutional teacher passes on the locality a ViT trained from scratch on few images
    lacks (measured here, it helped the offline ViT a little: README). Evaluation and the saved model involve the
    student alone.
    """

    def __init__(self, *args, weight_average_decay: float = 0.0, teacher=None, distillation_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_average_decay = weight_average_decay
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device) if teacher is not None else None
        self.distillation_weight = distillation_weight
        self.averaged_weights: dict[str, torch.Tensor] | None = None
        self.averaged_step = 0
        self.stashed_weights: dict[str, torch.Tensor] | None = None  # the trained weights while the average is in the model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_pixel_values = inputs.pop("teacher_pixel_values", None)
        if self.teacher is None or teacher_pixel_values is None:  # no teacher, or an evaluation batch
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            teacher_labels = self.teacher(pixel_values=teacher_pixel_values).logits.argmax(dim=-1)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        distillation_loss = self.compute_loss_func(outputs, teacher_labels, num_items_in_batch=num_items_in_batch)
        loss = (1 - self.distillation_weight) * loss + self.distillation_weight * distillation_loss
        return (loss, outputs) if return_outputs else loss

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _load_weights(self, checkpoint: str) -> None:
        model = self._unwrapped()
        reloaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._load_weights(resume_from_checkpoint)
        training_weights = Path(resume_from_checkpoint) / TRAINING_WEIGHTS
        if self.weight_average_decay and training_weights.is_file():
            self.averaged_weights = {name: value.detach().clone() for name, value in self._unwrapped().state_dict().items()}
            self._unwrapped().load_state_dict(load_file(training_weights), strict=True)

    def _load_best_model(self):
        self._load_weights(self.state.best_model_checkpoint)

    def _update_average(self) -> None:
        step = self.state.global_step
        if step <= self.averaged_step:  # Trainer calls us again at the end of an epoch for the same step
            return
        current = self._unwrapped().state_dict()
        if self.averaged_weights is None:
            self.averaged_weights = {name: value.detach().clone() for name, value in current.items()}
        else:
            decay = min(self.weight_average_decay, (1 + step) / (10 + step))  # early on, forget the random start faster
            with torch.no_grad():
                for name, value in current.items():
                    average = self.averaged_weights[name]
                    if average.is_floating_point():
                        average.lerp_(value, 1 - decay)
                    else:
                        average.copy_(value)
        self.averaged_step = step

    @contextmanager
    def _averaged_weights_in_model(self):
        model = self._unwrapped()
        self.stashed_weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.averaged_weights, strict=True)
        try:
            yield
        finally:
            model.load_state_dict(self.stashed_weights, strict=True)
            self.stashed_weights = None

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if not self.weight_average_decay:
            return super()._maybe_log_save_evaluate(*args, **kwargs)
        self._update_average()
        if not (self.control.should_evaluate or self.control.should_save):
            return super()._maybe_log_save_evaluate(*args, **kwargs)
        with self._averaged_weights_in_model():
            return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.stashed_weights is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_file({name: value.contiguous() for name, value in self.stashed_weights.items()}, folder / TRAINING_WEIGHTS)

    def train(self, *args, **kwargs):
        self.averaged_weights, self.averaged_step = None, 0  # a fresh average for each run (and each search trial)
        result = super().train(*args, **kwargs)
        if self.averaged_weights is not None and not self.args.load_best_model_at_end:
            self._unwrapped().load_state_dict(self.averaged_weights, strict=True)  # the average is the model we keep
        return result


def check_writable(output_dir: Path) -> None:
    """Exit with a clear message unless `output_dir` can be created and a file written in it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise SystemExit(f"Cannot write the model folder {output_dir}: {error.strerror or error}. Choose a writable --output_dir.") from None


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def find_checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """The checkpoint folders in `output_dir`, oldest first: (complete, incomplete). Trainer writes trainer_state.json
    last, so a checkpoint without a readable one was cut short (the run was killed or the disk filled while saving)."""
    complete, incomplete = [], []
    folders = [path for path in output_dir.glob("checkpoint-*") if path.is_dir() and path.name.split("-")[1].isdigit()]
    for folder in sorted(folders, key=lambda path: int(path.name.split("-")[1])):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete.append(folder)
        except (OSError, ValueError):
            incomplete.append(folder)
    return complete, incomplete


def checkpoint_to_resume(output_dir: Path, resume: bool, overwrite: bool, should_save: bool) -> str | None:
    """The checkpoint a run continues from: the newest complete one with `resume` (none is a clear error), else None.

    Nothing the user made is deleted unasked: a run that is neither resuming nor told to overwrite stops before any
    work when `output_dir` holds checkpoints or a trained model. With `resume`, the saving process removes the
    checkpoints an interrupted save left incomplete; with `overwrite`, all old checkpoints (the old model itself is
    replaced only when the new one is complete: train_vit.py swaps the finished folder in)."""
    complete, incomplete = find_checkpoints(output_dir)
    if resume and not complete:
        cut_short = f" (only {len(incomplete)} cut short while saving)" if incomplete else ""
        raise SystemExit(f"--resume was given but {output_dir} holds no checkpoint to resume from{cut_short}.")
    if not resume and not overwrite and (complete or incomplete or (output_dir / "config.json").is_file()):
        found = f"{len(complete) + len(incomplete)} checkpoint(s)" if complete or incomplete else "a trained model"
        raise SystemExit(
            f"{output_dir} already holds {found} from an earlier run. Pass --resume to continue it, --overwrite_output_dir "
            "to start afresh (its checkpoints are deleted and its model replaced), or choose another --output_dir."
        )
    if should_save:
        for folder in incomplete:  # a run killed while saving leaves a checkpoint without its trainer_state.json
            print(f"Removing {folder}: an interrupted save left it incomplete.")
            shutil.rmtree(folder)
        if complete and not resume:
            print(f"Starting afresh (--overwrite_output_dir): removing the old checkpoints in {output_dir}.")
            for folder in complete:
                shutil.rmtree(folder)
    return str(complete[-1]) if resume else None
