"""Know when not to answer: calibrated probabilities and an out-of-distribution check, fitted on a trained model.

    python -m cxr.reliability outputs/vit-xray --data_dir data/prepared/chest_xray

Both are fitted on a finished model folder without retraining (train_vit.py calls `fit_reliability` at the end
of every run) and both are saved in that folder, so every way of loading it gets them:

- **Temperature scaling.** One number T > 0, fitted on the validation logits by minimising the negative
  log-likelihood, and folded into the classifier head (its weight and bias divided by T). The saved weights
  then give calibrated probabilities everywhere, plain `pipeline("image-classification", model=FOLDER)`
  included; T is recorded in `config.json` (`calibration_temperature`) and, with the calibration error
  before and after, in `metrics.json`.
- **Out-of-distribution statistics** (`ood.safetensors`). The penultimate features of the training images give
  one mean per class and a shared covariance (Ledoit-Wolf shrinkage). An image's score is the squared
  Mahalanobis distance of its features to the nearest class mean; the threshold accepts 97 % of the
  patient-grouped validation X-rays (ACCEPT_RATE), and anything above it is flagged as "does not look like a pediatric chest
  X-ray". `cxr.predict.load_classifier` loads the file with the weights, so the app, the batch predictor and
  `cxr.predict.classify` give the same verdict (plain `pipeline()` cannot: it returns no features).

Four candidate scores are fitted and thresholded, and `benchmarks/ood.py` compares them: `mahalanobis` (the
default) reads the last encoder block's CLS token and mean patch token, before the final layernorm (for a
convolutional network, the last stage's feature map: mean and standard deviation per channel); `mahalanobis_cls`
the vector the head reads (the final-layernormed CLS token; a CNN's pooled vector); `energy` and `max_softmax`
only the logits.
On the scratch-small model the default flagged every non-X-ray at 95 % acceptance; the head's input missed
8 % of them, and the logit scores were no better than chance.

Why the threshold accepts 97 % and not 95 % of the validation X-rays: the validation copies are 224 px, while real
uploads are full-resolution files, which score higher. On the offline-recipe ViT, a 95 % threshold accepted only
79 % of the 24 full-resolution originals in ../shared/data/xray_originals (94.3 % of all real X-rays); at 97 %, 92 %
of them (96.9 % of all), with every non-X-ray still flagged: the lowest non-X-ray score was 275 against a threshold
of 234 (benchmarks/ood.py prints this sweep).
"""

from __future__ import annotations

import argparse
import contextvars
import json
import shutil
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from cxr.folders import staging_folder, swap_in, write_text_atomic
from cxr.metrics import expected_calibration_error, softmax
from cxr.run_record import calibrated_parts, read_metrics, update_metrics, warn_if_other_split

OOD_FILE = "ood.safetensors"
ACCEPT_RATE = 0.97  # share of real validation X-rays the threshold lets through (why 97 and not 95: see the module docstring)
SCORES = ("mahalanobis", "mahalanobis_cls", "energy", "max_softmax")  # candidate out-of-distribution scores; higher = less like the training X-rays
DEFAULT_SCORE = "mahalanobis"


# ---- one forward pass: logits and the features the out-of-distribution scores read --------------------------


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
    to them (the model's weights should not require gradients, as in `cxr.predict.load_classifier`):
    `cxr.saliency.grad_cam` takes its gradient at the last of them whose grid the logits depend on.
    Several threads may call it on one model at once (the app's parallel requests): each gets its own tensors.
    """
    model.eval()
    pixel_values = pixel_values.to(model.device, model.dtype)
    if saliency:
        pixel_values = pixel_values.detach().requires_grad_()  # the graph then reaches every hidden state, whatever the weights
    _install_head_hook(model)
    recorded = []
    token = _HEAD_INPUTS.set(recorded)
    try:
        with torch.set_grad_enabled(saliency):
            outputs = model(pixel_values=pixel_values, output_hidden_states=True)
    finally:
        _HEAD_INPUTS.reset(token)
    if len(recorded) != 1:
        raise RuntimeError(f"{type(model).__name__}: its classifier head ran {len(recorded)} times in one forward pass; forward_features expects one")
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
        raise ValueError(f"a hidden state of shape {tuple(hidden_state.shape)} is neither a token sequence nor a feature map")
    batch, length, width = hidden_state.shape
    side = math.isqrt(length)
    extra = length - side * side
    grid = hidden_state[:, extra:].transpose(1, 2).reshape(batch, width, side, side)
    return grid, (hidden_state[:, :extra] if extra else None)


def classifier_module(model) -> torch.nn.Module:
    """The module that turns the pooled features into logits: `model.classifier` (ViT, Swin, ResNet, ConvNeXt, PVTv2,
    MobileViT, CvT, ...) or `model.head`."""
    for name in ("classifier", "head"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(model).__name__} has no `classifier` or `head` module: not an image classifier forward_features can read")


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


def embed_split(model, processor, split, batch_size: int = 64, desc: str = "Features") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`forward_features` (as numpy arrays) and the labels for every image of a dataset split.

    The split comes from `hf_data.load_prepared` (undecoded image column): images go through the training
    transform (the project's one loader, no augmentation), as in evaluation."""
    from cxr.training import collate, pixel_transform

    loader = torch.utils.data.DataLoader(split.with_transform(pixel_transform(processor, augment=False)), batch_size=batch_size, collate_fn=collate)
    batches, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batches.append(forward_features(model, batch["pixel_values"]))
        labels.append(batch["labels"].numpy())
    return {key: np.concatenate([_numpy(batch[key]) for batch in batches]) for key in batches[0]}, np.concatenate(labels)


# ---- temperature scaling ----------------------------------------------------------------------------------


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
    return float(F.cross_entropy(torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)))


@torch.no_grad()
def fold_temperature(model, temperature: float) -> None:
    """Divide the classifier head by `temperature`, so the model's own logits are the calibrated ones.

    The applied total is kept in `model.config.calibration_temperature` (saved in config.json), so a later
    refit starts from the uncalibrated head instead of stacking temperatures."""
    head = classifier_head(model)
    head.weight.div_(temperature)
    head.bias.div_(temperature)
    model.config.calibration_temperature = current_temperature(model) * temperature


def classifier_head(model) -> torch.nn.Linear:
    """The Linear layer that gives the logits: the classifier module itself (ViT, Swin, ConvNeXt) or its last Linear
    (ResNet's is Flatten + Linear)."""
    return [module for module in classifier_module(model).modules() if isinstance(module, torch.nn.Linear)][-1]


def current_temperature(model) -> float:
    """The temperature already folded into this model's head (1.0 for an uncalibrated model)."""
    return float(getattr(model.config, "calibration_temperature", 1.0))


# ---- out-of-distribution scores ---------------------------------------------------------------------------


def mahalanobis_score(features: np.ndarray, class_means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean (shared covariance)."""
    features = np.asarray(features, dtype=np.float64)
    centered = features[:, None, :] - class_means[None, :, :]  # (images, classes, features)
    distances = ((centered @ precision) * centered).sum(axis=-1)
    return distances.min(axis=1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Free energy -logsumexp(logits) (Liu et al. 2020): high where no class has a large logit."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=1)
    return -(peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1)))


def max_softmax_score(logits: np.ndarray) -> np.ndarray:
    """Minus the top probability (Hendrycks & Gimpel 2017): high where the model is unsure."""
    return -softmax(np.asarray(logits, dtype=np.float64)).max(axis=1)


def accept_threshold(scores: np.ndarray, accept_rate: float = ACCEPT_RATE) -> float:
    """The score up to which `accept_rate` of these (in-distribution) scores lie: halfway between the last one
    accepted and the first one flagged, so float noise in a recomputed score (another batch size, float32
    statistics) does not flip the image at the boundary. Where all are accepted (small sets), a little above the largest."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    accepted = min(len(ordered), int(np.ceil(accept_rate * len(ordered))))
    if accepted == len(ordered):
        return float(ordered[-1] + 1e-3 * (ordered[-1] - ordered[0]) + 1e-9)
    return float((ordered[accepted - 1] + ordered[accepted]) / 2)


# Which features each Mahalanobis score reads (see `forward_features`).
MAHALANOBIS_FEATURES = {"mahalanobis": "tokens", "mahalanobis_cls": "cls"}


@dataclass
class OodDetector:
    """Training-split feature statistics, and the ACCEPT_RATE threshold of every candidate score.

    `class_means[kind]` is (classes, features) and `precision[kind]` the inverse of the shared, shrunk covariance,
    for each feature kind of `forward_features` ("tokens", "cls"). `score_name` is the score that decides."""

    class_means: dict[str, np.ndarray]
    precision: dict[str, np.ndarray]
    thresholds: dict[str, float]  # score name -> largest score still accepted
    score_name: str = DEFAULT_SCORE

    @classmethod
    def fit(cls, train: dict[str, np.ndarray], train_labels: np.ndarray, validation: dict[str, np.ndarray], score_name: str = DEFAULT_SCORE) -> "OodDetector":
        """Class means and Ledoit-Wolf precision from `train`, thresholds from `validation` (both `forward_features` outputs)."""
        from sklearn.covariance import LedoitWolf

        classes = np.unique(train_labels)
        class_means, precision = {}, {}
        for kind in MAHALANOBIS_FEATURES.values():
            features = np.asarray(train[kind], dtype=np.float64)
            class_means[kind] = np.stack([features[train_labels == label].mean(axis=0) for label in classes])
            centered = features - class_means[kind][np.searchsorted(classes, train_labels)]
            precision[kind] = LedoitWolf(assume_centered=True).fit(centered).precision_
        detector = cls(class_means, precision, thresholds={}, score_name=score_name)
        detector.thresholds = {name: accept_threshold(values) for name, values in detector.scores(validation).items()}
        return detector

    def scores(self, outputs: dict) -> dict[str, np.ndarray]:
        """Every candidate score for a batch of `forward_features` outputs; higher means less like the training X-rays."""
        scores = {name: mahalanobis_score(_numpy(outputs[kind]), self.class_means[kind], self.precision[kind]) for name, kind in MAHALANOBIS_FEATURES.items()}
        logits = _numpy(outputs["logits"])
        return scores | {"energy": energy_score(logits), "max_softmax": max_softmax_score(logits)}

    def check(self, outputs: dict) -> tuple[np.ndarray, np.ndarray]:
        """(score, looks like a chest X-ray) per image, by the chosen score and its threshold."""
        score = self.scores(outputs)[self.score_name]
        return score, score <= self.threshold

    @property
    def threshold(self) -> float:
        return self.thresholds[self.score_name]

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / OOD_FILE
        tensors = {f"{kind}.class_means": value.astype(np.float32) for kind, value in self.class_means.items()}
        tensors |= {f"{kind}.precision": value.astype(np.float32) for kind, value in self.precision.items()}
        metadata = {"score": self.score_name, "thresholds": json.dumps(self.thresholds), "accept_rate": str(ACCEPT_RATE)}
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OodDetector":
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key).astype(np.float64) for key in handle.keys()}
        kinds = sorted({key.split(".")[0] for key in tensors})
        return cls(
            class_means={kind: tensors[f"{kind}.class_means"] for kind in kinds},
            precision={kind: tensors[f"{kind}.precision"] for kind in kinds},
            thresholds=json.loads(metadata["thresholds"]),
            score_name=metadata["score"],
        )


def _numpy(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


# ---- fitting both on a model ------------------------------------------------------------------------------


def fit_reliability(model, processor, dataset, batch_size: int = 64, score_name: str = DEFAULT_SCORE) -> tuple[OodDetector, dict]:
    """Fit the temperature (validation split) and the out-of-distribution statistics (training split) for `model`.

    Folds the temperature into `model`'s head in place (undoing any earlier one first) and returns the detector
    and a summary for metrics.json: the temperature, the calibration error and NLL before and after on every
    held-out split, and the out-of-distribution score, threshold and acceptance rate.
    `dataset` is the `DatasetDict` of `hf_data.load_prepared`.
    """
    fold_temperature(model, 1.0 / current_temperature(model))  # back to the uncalibrated head
    held_out = {split: embed_split(model, processor, dataset[split], batch_size, desc=f"Features: {split}") for split in dataset if split != "train"}

    temperature = fit_temperature(held_out["validation"][0]["logits"], held_out["validation"][1])
    fold_temperature(model, temperature)
    calibration = {"temperature": temperature, "fitted_on": f"validation split ({len(held_out['validation'][1])} images)", "by_split": {}}
    for split, (outputs, labels) in held_out.items():
        raw = outputs["logits"]
        outputs["logits"] = raw / temperature  # what the calibrated head now gives
        calibration["by_split"][split] = {
            "ece_before": expected_calibration_error(labels, softmax(raw)),
            "ece_after": expected_calibration_error(labels, softmax(outputs["logits"])),
            "nll_before": nll(raw, labels),
            "nll_after": nll(outputs["logits"], labels),
        }

    prediction_sets = fit_prediction_sets(model, dataset, held_out)

    train, train_labels = embed_split(model, processor, dataset["train"], batch_size, desc="Features: train")
    detector = OodDetector.fit(train, train_labels, held_out["validation"][0], score_name)
    ood = {
        "score": score_name,
        "threshold": detector.threshold,
        "thresholds": detector.thresholds,
        "fitted_on": f"train split ({len(train_labels)} images); threshold accepts {ACCEPT_RATE:.0%} of the validation split",
        "accept_rate": ACCEPT_RATE,
        "accepted": {split: float(detector.check(outputs)[1].mean()) for split, (outputs, _) in held_out.items()},
        "file": OOD_FILE,
    }
    return detector, {"calibration": calibration, "ood": ood, "prediction_sets": prediction_sets}


def fit_prediction_sets(model, dataset, held_out: dict) -> dict:
    """Class-conditional conformal prediction sets (`cxr.conformal`) on the calibrated validation probabilities, and
    their coverage on data the fit did not see: validation children held out from a half-split fit, and every
    other held-out split (the test split, where the data has one). The thresholds are in the result
    ("min_probability"); `save_prediction_sets` writes them into the model folder."""
    from cxr.conformal import LEVELS, PredictionSets, held_out_check
    from hf_data.prepare import read_patient_id

    names = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    outputs, labels = held_out["validation"]
    probabilities = softmax(outputs["logits"])
    sets = PredictionSets.fit(probabilities, labels, names, LEVELS)
    children = [read_patient_id(Path(image["path"]).name) for image in dataset["validation"]["image"]]
    return {
        "method": "class-conditional split-conformal (cxr/conformal.py), score 1 - calibrated probability",
        "min_probability": sets.thresholds,
        "labels": names,
        "fitted_on": f"validation split ({len(labels)} images)",
        "fitted_on_images_per_class": sets.fitted_on,
        "validation_held_out_children": held_out_check(probabilities, labels, children, names),
        "by_split": {split: sets.evaluate(softmax(split_outputs["logits"]), split_labels)
                     for split, (split_outputs, split_labels) in held_out.items() if split != "validation"},
        "file": "conformal.json",
    }


def save_prediction_sets(model_dir: str | Path, summary: dict) -> Path:
    """Write the prediction-set thresholds of `fit_reliability`'s summary into the model folder (conformal.json)."""
    from cxr.conformal import PredictionSets

    fitted = summary["prediction_sets"]
    return PredictionSets(fitted["labels"], fitted["min_probability"], fitted["fitted_on_images_per_class"]).save(model_dir)


def save_reliability(model_dir: str | Path, detector: OodDetector, summary: dict) -> None:
    """Write the detector and the prediction-set thresholds (the weights are saved by the caller, the figures go into
    metrics.json through `cxr.run_record`)."""
    model_dir = Path(model_dir)
    detector.save(model_dir)
    save_prediction_sets(model_dir, summary)


def describe_reliability(summary: dict) -> str:
    """A few lines for the terminal."""
    calibration, ood = summary["calibration"], summary["ood"]
    lines = [f"Temperature T = {calibration['temperature']:.3f}, fitted on the {calibration['fitted_on']} and folded into the classifier head."]
    for split, figures in calibration["by_split"].items():
        lines.append(f"  {split}: ECE {figures['ece_before']:.4f} -> {figures['ece_after']:.4f}, NLL {figures['nll_before']:.4f} -> {figures['nll_after']:.4f}")
    lines.append(f"Out-of-distribution check: {ood['score']} score, threshold {ood['threshold']:.4g}; statistics from the {ood['fitted_on']}.")
    lines += [f"  {split}: {share:.1%} accepted" for split, share in ood["accepted"].items()]
    if "prediction_sets" in summary:
        sets = summary["prediction_sets"]
        lines.append(f"Prediction sets (class-conditional conformal), fitted on the {sets['fitted_on']}: coverage / mean set size per class")
        checks = {"validation children held out from a half-split fit": sets["validation_held_out_children"]} | sets["by_split"]
        for where, report in checks.items():
            for level in sets["min_probability"]:
                per_class = ", ".join(f"{label} {figures['coverage']:.3f} / {figures['mean_set_size']:.2f}"
                                      for label, figures in report[level]["by_class"].items() if figures["coverage"] is not None)
                lines.append(f"  {where}, {level}: {per_class}")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------------


def load_data(data_dir: str, prepared_dir: str | None, validation_fraction: float, seed: int, synthetic_images_per_class: int):
    """A prepared imagefolder tree as is, or a raw source (Kaggle / class folders / 'synthetic') prepared the way train_vit.py does."""
    from cxr.data import default_prepared_dir
    from hf_data import load_prepared, make_synthetic_dataset, prepare_dataset
    from hf_data.prepare import MANIFEST_NAME

    path = Path(data_dir).expanduser()
    if (path / MANIFEST_NAME).is_file():
        prepared = path
    else:
        source = make_synthetic_dataset(Path("data/synthetic"), images_per_class=synthetic_images_per_class) if data_dir == "synthetic" else path
        prepared = Path(prepared_dir or default_prepared_dir(source, validation_fraction, seed, keep_kaggle_val=False))
        print(prepare_dataset(source, prepared, validation_fraction=validation_fraction, seed=seed).summary())
    return load_prepared(prepared)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr.reliability",
        description="Fit temperature scaling and the out-of-distribution check on a trained model folder, without retraining, "
        "and save both into it in place: the temperature folded into the classifier head (model.safetensors, config.json), "
        f"the feature statistics and threshold in {OOD_FILE}, the figures in metrics.json.",
    )
    parser.add_argument("model_dir", type=Path, help="Model folder written by train_vit.py (rewritten in place).")
    parser.add_argument(
        "--data_dir", required=True,
        help="The data the model was trained on: a prepared tree (data/prepared/<name>, with manifest.csv), the raw folder given to "
        "train_vit.py (prepared again with the same patient-grouped split), or 'synthetic'.",
    )
    parser.add_argument("--prepared_dir", default=None, help="Where to prepare a raw --data_dir. Default: data/prepared/<name of data_dir>.")
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="As given to train_vit.py (raw --data_dir only; default 0.1).")
    parser.add_argument("--seed", type=int, default=42, help="As given to train_vit.py (raw --data_dir only; default 42).")
    parser.add_argument("--synthetic_images_per_class", type=int, default=200, help="As given to train_vit.py (--data_dir synthetic only; default 200).")
    parser.add_argument("--score", choices=SCORES, default=DEFAULT_SCORE, help=f"Which out-of-distribution score decides (default {DEFAULT_SCORE}; benchmarks/ood.py compares them).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass during feature extraction (default 64).")
    args = parser.parse_args(argv)

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not (args.model_dir / "config.json").is_file():
        parser.error(f"no model at {args.model_dir} (no config.json there)")
    dataset = load_data(args.data_dir, args.prepared_dir, args.validation_fraction, args.seed, args.synthetic_images_per_class)
    if "validation" not in dataset or "train" not in dataset:
        parser.error(f"{args.data_dir} has no train and validation splits")
    warn_if_other_split(args.model_dir, dataset)
    model = AutoModelForImageClassification.from_pretrained(args.model_dir, use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(args.model_dir)

    detector, summary = fit_reliability(model, processor, dataset, batch_size=args.batch_size, score_name=args.score)
    # Rewritten files go into a staging sibling, swapped in at once: a crash leaves the folder as it was, never new
    # weights beside old statistics. The rest is carried over; ONNX exports of the old weights are not.
    staging = staging_folder(args.model_dir)
    model.save_pretrained(staging)
    for name in ("metrics.json", "README.md"):
        if (args.model_dir / name).is_file():
            shutil.copy2(args.model_dir / name, staging / name)
    save_reliability(staging, detector, summary)
    update_metrics(staging, **calibrated_parts(read_metrics(staging), summary))
    update_card(staging, summary)
    swap_in(staging, args.model_dir, replaced=("*.onnx",))
    print(describe_reliability(summary))
    print(f"Saved into {args.model_dir}: calibrated head (model.safetensors, config.json), {OOD_FILE}, conformal.json, metrics.json.")
    return 0


def update_card(model_dir: Path, summary: dict) -> None:
    """Replace (or add) the reliability section of the folder's model card."""
    from cxr.card import replace_reliability_section

    card = model_dir / "README.md"
    if card.is_file():
        write_text_atomic(card, replace_reliability_section(card.read_text(), summary))


if __name__ == "__main__":
    raise SystemExit(main())
