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
    calibration = fit_calibration(model, held_out, "validation", "validation split")
    prediction_sets = fit_prediction_sets(model, held_out, groups)

    train, train_labels = embed_split(model, processor, dataset["train"], batch_size, desc="Features: train")
    detector = OodDetector.fit(train, train_labels, held_out["validation"][0], score_name)
    ood = ood_summary(
        detector,
        held_out,
        f"train split ({len(train_labels)} images); threshold accepts {ACCEPT_RATE:.0%} of the validation split",
        "validation X-rays",
    )
    return detector, {"calibration": calibration, "ood": ood, "prediction_sets": prediction_sets}


def refit_at_site(model, detector: OodDetector, held_out: dict, groups: list[str], site: str) -> dict:
    """Refit the temperature, the prediction sets and the X-ray check's threshold on a site's own labelled X-rays,
    without retraining: the same fits as `fit_reliability`, with the site's fitting part in the validation split's
    place. The X-ray check keeps the training split's statistics; only its threshold moves.

    `held_out` maps "site fitting part" (the fit's data; `groups` the patient id of each of its images) and "site
    checking part" (scored, never fitted on) to `embed_split` outputs of `model` as loaded, with its earlier
    temperature: the new one is folded on top of it, so "before" is the folder as it was. Logits in `held_out`
    are rescaled in place, `detector`'s thresholds replaced; returns the summary `fit_reliability` returns.
    """
    fit_part = "site fitting part"
    calibration = fit_calibration(model, held_out, fit_part, f"{fit_part} of {site}")
    prediction_sets = fit_prediction_sets(model, held_out, groups, fit_part, f"{fit_part} of {site}")
    detector.fit_thresholds(held_out[fit_part][0])
    ood = ood_summary(
        detector,
        held_out,
        f"train split (the original folder's statistics); threshold accepts {ACCEPT_RATE:.0%} of the {fit_part} "
        f"({len(held_out[fit_part][1])} images of {site})",
        f"X-rays of the {fit_part}",
    )
    return {"calibration": calibration, "ood": ood, "prediction_sets": prediction_sets}


def fit_calibration(model, held_out: dict, fit_split: str, fitted_on: str) -> dict:
    """Fit a temperature on `held_out[fit_split]`'s logits, fold it into `model`'s head (on top of any already
    there) and divide every part's logits by it in place; the calibration error and NLL before and after on each."""
    logits, labels = held_out[fit_split][0]["logits"], held_out[fit_split][1]
    temperature = fit_temperature(logits, labels)
    fold_temperature(model, temperature)
    calibration = {
        "temperature": current_temperature(model),
        "fitted_on": f"{fitted_on} ({len(labels)} images)",
        "by_split": {},
    }
    for split, (outputs, split_labels) in held_out.items():
        before = outputs["logits"]
        outputs["logits"] = before / temperature  # what the calibrated head now gives
        calibration["by_split"][split] = {
            "ece_before": expected_calibration_error(split_labels, softmax(before)),
            "ece_after": expected_calibration_error(split_labels, softmax(outputs["logits"])),
            "nll_before": nll(before, split_labels),
            "nll_after": nll(outputs["logits"], split_labels),
        }
    return calibration


def ood_summary(detector: OodDetector, held_out: dict, fitted_on: str, threshold_on: str) -> dict:
    """The X-ray check's part of metrics.json: score, thresholds, what they were fitted on, and the share of each
    held-out part it accepts."""
    return {
        "score": detector.score_name,
        "threshold": detector.threshold,
        "thresholds": detector.thresholds,
        "fitted_on": fitted_on,
        "threshold_fitted_on": threshold_on,
        "accept_rate": ACCEPT_RATE,
        "accepted": {split: float(detector.check(outputs)[1].mean()) for split, (outputs, _) in held_out.items()},
        "file": OOD_FILE,
    }


def fit_prediction_sets(
    model, held_out: dict, groups: list[str], fit_split: str = "validation", fitted_on: str = "validation split"
) -> dict:
    """Class-conditional conformal prediction sets (`cxr.conformal`) on the calibrated probabilities of
    `held_out[fit_split]`, and their coverage on data the fit did not see: children of that part held out from a
    half-split fit, and every other held-out part (the test split, where the data has one; a site's checking part);
    `groups` (the patient id of each image of the fit's part) keeps a child's images on one side of that
    half-split. The thresholds are in the result ("min_probability"); `save_prediction_sets` writes them into the
    model folder."""
    from cxr.conformal import LEVELS, PredictionSets, held_out_check

    names = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    outputs, labels = held_out[fit_split]
    probabilities = softmax(outputs["logits"])
    sets = PredictionSets.fit(probabilities, labels, names, LEVELS)
    return {
        "method": "class-conditional split-conformal (cxr/conformal.py), score 1 - calibrated probability",
        "min_probability": sets.thresholds,
        "labels": names,
        "fitted_on": f"{fitted_on} ({len(labels)} images)",
        "fit_split": fit_split,
        "fitted_on_images_per_class": sets.fitted_on,
        # the key keeps its name (older folders have it): the children are the fit part's, whatever that was
        "validation_held_out_children": held_out_check(probabilities, labels, groups, names),
        "by_split": {
            split: sets.evaluate(softmax(split_outputs["logits"]), split_labels)
            for split, (split_outputs, split_labels) in held_out.items()
            if split != fit_split
        },
        "file": "conformal.json",
    }


def prediction_sets_of(summary: dict):
    """The `PredictionSets` of `fit_reliability`'s (or `refit_at_site`'s) summary."""
    from cxr.conformal import PredictionSets

    fitted = summary["prediction_sets"]
    return PredictionSets(fitted["labels"], fitted["min_probability"], fitted["fitted_on_images_per_class"])


def save_prediction_sets(model_dir: str | Path, summary: dict) -> Path:
    """Write the prediction-set thresholds of `fit_reliability`'s summary into the model folder (conformal.json)."""
    return prediction_sets_of(summary).save(model_dir)


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
        held_out_children = f"{sets.get('fit_split', 'validation')} children held out from a half-split fit"
        checks = {held_out_children: sets["validation_held_out_children"]} | sets["by_split"]
        for where, report in checks.items():
            for level in sets["min_probability"]:
                per_class = ", ".join(
                    f"{label} {figures['coverage']:.3f} / {figures['mean_set_size']:.2f}"
                    for label, figures in report[level]["by_class"].items()
                    if figures["coverage"] is not None
                )
                lines.append(f"  {where}, {level}: {per_class}")
    return "\n".join(lines)
