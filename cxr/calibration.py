"""Temperature scaling: one number T > 0, fitted on the validation logits by minimising the negative
log-likelihood, and folded into the classifier head (its weight and bias divided by T). The saved weights then give
calibrated probabilities everywhere, plain `pipeline("image-classification", model=FOLDER)` included; T is recorded
in `config.json` (`calibration_temperature`) and, with the calibration error before and after, in `metrics.json`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxr.features import classifier_heads


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on these labels (LBFGS on log T)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(
        F.cross_entropy(torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long))
    )


@torch.no_grad()
def fold_temperature(model, temperature: float) -> None:
    """Divide the classifier head(s) by `temperature`, so the model's own logits are the calibrated ones.

    The applied total is kept in `model.config.calibration_temperature` (saved in config.json), so a later
    refit starts from the uncalibrated head instead of stacking temperatures."""
    for head in classifier_heads(model):  # all of them where the logits average several (SwiftFormer)
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    model.config.calibration_temperature = current_temperature(model) * temperature


def current_temperature(model) -> float:
    """The temperature already folded into this model's head (1.0 for an uncalibrated model)."""
    return float(getattr(model.config, "calibration_temperature", 1.0))
