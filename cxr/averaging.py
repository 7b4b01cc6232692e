"""Weight averaging for `Trainer` (transformers 5.23 has none built in): an exponential moving average of the weights,
updated after every optimizer step and swapped into the model for each evaluation and checkpoint, so validation
scores, the best-checkpoint choice and the saved model are the average's, steadier from epoch to epoch than the
last step's weights. Each checkpoint also keeps the weights being trained (`TRAINING_WEIGHTS`), so `--resume`
continues exactly.

Trainer has no hook between an optimizer step and its evaluate/save, so `WeightAveraging` overrides two private
methods (`_maybe_log_save_evaluate`, `_save_checkpoint`), extends a third (`_load_from_checkpoint`) and calls
`_get_output_dir`; tests/test_workarounds.py pins their signatures."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINING_WEIGHTS = (
    "training_weights.safetensors"  # in a checkpoint whose model is the average: the weights being trained
)


class WeightAveraging:
    """A `Trainer` mixin; `weight_average_decay` > 0 turns it on (0: Trainer as it is)."""

    def __init__(self, *args, weight_average_decay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_average_decay = weight_average_decay
        self.averaged_weights: dict[str, torch.Tensor] | None = None
        self.averaged_step = 0
        self.stashed_weights: dict[str, torch.Tensor] | None = (
            None  # the trained weights while the average is in the model
        )

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # the checkpoint's model: the average, where one was kept
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        training_weights = Path(resume_from_checkpoint) / TRAINING_WEIGHTS
        if self.weight_average_decay and training_weights.is_file():
            self.averaged_weights = {
                name: value.detach().clone() for name, value in self._unwrapped().state_dict().items()
            }
            self._unwrapped().load_state_dict(load_file(training_weights), strict=True)

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
            save_file(
                {name: value.contiguous() for name, value in self.stashed_weights.items()}, folder / TRAINING_WEIGHTS
            )

    def train(self, *args, **kwargs):
        self.averaged_weights, self.averaged_step = None, 0  # a fresh average for each run (and each search trial)
        result = super().train(*args, **kwargs)
        if self.averaged_weights is not None and not self.args.load_best_model_at_end:
            self._unwrapped().load_state_dict(self.averaged_weights, strict=True)  # the average is the model we keep
        return result
