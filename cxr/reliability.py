"""After training: fit calibration, the chest X-ray check and prediction sets on a model, and save them into its folder.

    python calibrate.py outputs/vit-xray --data_dir data/prepared/chest_xray

All three are fitted on a finished model folder without retraining (train_vit.py calls `fit_reliability` at the end
of every run; `calibrate.py` refits a folder in place) and saved in that folder, so every way of loading it gets
them: the temperature folded into the head (`cxr.calibration`), the X-ray check's statistics (`cxr.ood`,
`ood.safetensors`) and the prediction-set thresholds (`cxr.conformal`, `conformal.json`).
"""

from __future__ import annotations

from pathlib import Path

from cxr.calibration import current_temperature, fit_temperature, fold_temperature, nll
from cxr.features import embed_split
from cxr.metrics import expected_calibration_error, softmax
from cxr.ood import ACCEPT_RATE, DEFAULT_SCORE, OOD_FILE, OodDetector


def fit_reliability(
    model, processor, dataset, groups: list[str], batch_size: int = 64, score_name: str = DEFAULT_SCORE
) -> tuple[OodDetector, dict]:
    """Fit the temperature (validation split) and the out-of-distribution statistics (training split) for `model`.

    Folds the temperature into `model`'s head in place (undoing any earlier one first) and returns the detector
    and a summary for metrics.json: the temperature, the calibration error and NLL before and after on every
    held-out split, and the out-of-distribution score, threshold and acceptance rate.
    `dataset` is the `DatasetDict` of `hf_data.load_prepared`; `groups` the patient id of each validation image
    (`hf_data.loading.validation_patient_ids`).
    """
    fold_temperature(model, 1.0 / current_temperature(model))  # back to the uncalibrated head
    held_out = {
        split: embed_split(model, processor, dataset[split], batch_size, desc=f"Features: {split}")
        for split in dataset
        if split != "train"
    }

    temperature = fit_temperature(held_out["validation"][0]["logits"], held_out["validation"][1])
    fold_temperature(model, temperature)
    calibration = {
        "temperature": temperature,
        "fitted_on": f"validation split ({len(held_out['validation'][1])} images)",
        "by_split": {},
    }
    for split, (outputs, labels) in held_out.items():
        raw = outputs["logits"]
        outputs["logits"] = raw / temperature  # what the calibrated head now gives
        calibration["by_split"][split] = {
            "ece_before": expected_calibration_error(labels, softmax(raw)),
            "ece_after": expected_calibration_error(labels, softmax(outputs["logits"])),
            "nll_before": nll(raw, labels),
            "nll_after": nll(outputs["logits"], labels),
        }

    prediction_sets = fit_prediction_sets(model, held_out, groups)

    train, train_labels = embed_split(model, processor, dataset["train"], batch_size, desc="Features: train")
    detector = OodDetector.fit(train, train_labels, held_out["validation"][0], score_name)
    ood = {
        "score": score_name,
        "threshold": detector.threshold,
        "thresholds": detector.thresholds,
        "fitted_on": f"train split ({len(train_labels)} images); "
        f"threshold accepts {ACCEPT_RATE:.0%} of the validation split",
        "accept_rate": ACCEPT_RATE,
        "accepted": {split: float(detector.check(outputs)[1].mean()) for split, (outputs, _) in held_out.items()},
        "file": OOD_FILE,
    }
    return detector, {"calibration": calibration, "ood": ood, "prediction_sets": prediction_sets}


def fit_prediction_sets(model, held_out: dict, groups: list[str]) -> dict:
    """Class-conditional conformal prediction sets (`cxr.conformal`) on the calibrated validation probabilities, and
    their coverage on data the fit did not see: validation children held out from a half-split fit, and every
    other held-out split (the test split, where the data has one); `groups` (the patient id of each validation image)
    keeps a child's images on one side of that half-split. The thresholds are in the result ("min_probability");
    `save_prediction_sets` writes them into the model folder."""
    from cxr.conformal import LEVELS, PredictionSets, held_out_check

    names = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    outputs, labels = held_out["validation"]
    probabilities = softmax(outputs["logits"])
    sets = PredictionSets.fit(probabilities, labels, names, LEVELS)
    return {
        "method": "class-conditional split-conformal (cxr/conformal.py), score 1 - calibrated probability",
        "min_probability": sets.thresholds,
        "labels": names,
        "fitted_on": f"validation split ({len(labels)} images)",
        "fitted_on_images_per_class": sets.fitted_on,
        "validation_held_out_children": held_out_check(probabilities, labels, groups, names),
        "by_split": {
            split: sets.evaluate(softmax(split_outputs["logits"]), split_labels)
            for split, (split_outputs, split_labels) in held_out.items()
            if split != "validation"
        },
        "file": "conformal.json",
    }


def save_prediction_sets(model_dir: str | Path, summary: dict) -> Path:
    """Write the prediction-set thresholds of `fit_reliability`'s summary into the model folder (conformal.json)."""
    from cxr.conformal import PredictionSets

    fitted = summary["prediction_sets"]
    return PredictionSets(fitted["labels"], fitted["min_probability"], fitted["fitted_on_images_per_class"]).save(
        model_dir
    )


def save_reliability(model_dir: str | Path, detector: OodDetector, summary: dict) -> None:
    """Write the detector and the prediction-set thresholds (the weights are saved by the caller, the figures go into
    metrics.json through `cxr.run_record`)."""
    model_dir = Path(model_dir)
    detector.save(model_dir)
    save_prediction_sets(model_dir, summary)


def describe_reliability(summary: dict) -> str:
    """A few lines for the terminal."""
    calibration, ood = summary["calibration"], summary["ood"]
    lines = [
        f"Temperature T = {calibration['temperature']:.3f}, fitted on the {calibration['fitted_on']} "
        "and folded into the classifier head."
    ]
    for split, figures in calibration["by_split"].items():
        lines.append(
            f"  {split}: ECE {figures['ece_before']:.4f} -> {figures['ece_after']:.4f}, "
            f"NLL {figures['nll_before']:.4f} -> {figures['nll_after']:.4f}"
        )
    lines.append(
        f"Out-of-distribution check: {ood['score']} score, threshold {ood['threshold']:.4g}; "
        f"statistics from the {ood['fitted_on']}."
    )
    lines += [f"  {split}: {share:.1%} accepted" for split, share in ood["accepted"].items()]
    if "prediction_sets" in summary:
        sets = summary["prediction_sets"]
        lines.append(
            f"Prediction sets (class-conditional conformal), fitted on the {sets['fitted_on']}: "
            "coverage / mean set size per class"
        )
        checks = {"validation children held out from a half-split fit": sets["validation_held_out_children"]} | sets[
            "by_split"
        ]
        for where, report in checks.items():
            for level in sets["min_probability"]:
                per_class = ", ".join(
                    f"{label} {figures['coverage']:.3f} / {figures['mean_set_size']:.2f}"
                    for label, figures in report[level]["by_class"].items()
                    if figures["coverage"] is not None
                )
                lines.append(f"  {where}, {level}: {per_class}")
    return "\n".join(lines)
