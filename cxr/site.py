"""A model at another site: does it keep its promises on the site's own labelled X-rays, and how to refit them there.

A model folder's promises are fitted on its validation split (children from the training collection): the
calibrated probabilities, the X-ray check that flags ACCEPT_RATE's complement of real X-rays, and prediction sets
that contain the true label for 90 % / 95 % of X-rays of each class. They hold for X-rays like those, not
necessarily for another hospital's. `check_site` measures every one of them on a site's labelled X-rays beside the
folder's own validation figures, with 95 % confidence intervals (Wilson for shares, a bootstrap over patients for
F1 and calibration error), and says which do not hold there (`site_check.py`). `calibrate.py --site_dir` refits
them on part of the site's X-rays (`cxr.reliability.refit_at_site`), split by patient with `split_by_patient`, and
checks them on the rest; `too_few_images` stops it where a class has too few X-rays for the stated coverage.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from statistics import NormalDist

import matplotlib.pyplot as plt  # cxr.metrics (imported below) picks the Agg backend before any figure is drawn
import numpy as np

from cxr.conformal import LEVELS, PredictionSets, images_needed, level_name
from cxr.folders import write_text_atomic
from cxr.metrics import classification_metrics, softmax
from cxr.ood import ACCEPT_RATE

CONFIDENCE = 0.95  # of every interval reported
BOOTSTRAP_RESAMPLES = 1000
REPORT_FILE, PLOT_FILE = "site_check.json", "site_check.png"
LEVEL_COLOURS = {"90%": "tab:orange", "95%": "tab:green"}


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """Wilson score interval of a share (Wilson 1927): honest for small counts and shares near 0 or 1."""
    if trials == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * np.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def bootstrap_intervals(
    statistic, patients: list[str], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile intervals of each figure `statistic(image indices)` returns, over resamples of whole patients (a
    child's X-rays are not independent of each other)."""
    children = np.array(sorted(set(patients)))
    images_of = {child: [] for child in children}
    for index, child in enumerate(patients):
        images_of[child].append(index)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        chosen = np.concatenate([images_of[child] for child in rng.choice(children, len(children))])
        for key, value in statistic(chosen).items():
            draws.setdefault(key, []).append(value)
    tail = 100 * (1 - CONFIDENCE) / 2
    return {
        key: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
        for key, values in draws.items()
    }


def figure(name: str, value: float | None, interval: list[float] | None, reference: float | None, better: str) -> dict:
    """One reported figure: the site's value and interval beside the model's own (`reference`), and the verdict:
    "worse" where the whole interval is on the wrong side of the reference, "better" on the right side, "consistent"
    where the interval holds it."""
    verdict = None
    if value is not None and interval is not None and reference is not None:
        low, high = interval
        slack = 1e-9  # a share of all hits has 1.0 as its upper bound, up to float rounding
        worse = high < reference - slack if better == "higher" else low > reference + slack
        improved = low > reference + slack if better == "higher" else high < reference - slack
        verdict = "worse" if worse else "better" if improved else "consistent"
    return {"name": name, "site": value, "interval": interval, "model": reference, "better": better, "verdict": verdict}


def share_figure(name: str, hits: np.ndarray, reference: float | None, better: str) -> dict:
    hits = np.asarray(hits, dtype=bool)
    value = float(hits.mean()) if len(hits) else None
    return figure(name, value, wilson_interval(int(hits.sum()), len(hits)), reference, better)


def check_site(
    outputs: dict,
    labels: np.ndarray,
    patients: list[str],
    metrics: dict,
    detector=None,
    sets: PredictionSets | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict:
    """Every promise of a model folder measured on a site's labelled X-rays.

    `outputs` are `forward_features` outputs of the folder's model as loaded (its temperature folded in), `labels`
    the true class ids, `patients` each image's patient id, `metrics` the folder's metrics.json (its own figures),
    `detector` and `sets` its X-ray check and prediction sets (None where it has none); `resamples` 0 leaves out the
    bootstrap (F1 and ECE then have no interval). Returns a JSON-ready dict:
    "classification" (figures with intervals, beside the validation split's), "prediction_sets" (coverage and mean
    size per level, overall and per class, beside the promised level), "xray_check" (the share flagged), and
    "not_held" / "unclear": plain sentences for every promise the site's X-rays break, or cannot settle.
    """
    labels = np.asarray(labels)
    probabilities = softmax(outputs["logits"])  # as the sets were fitted: at the logits' own precision
    class_keys, names = metrics["model"]["class_keys"], metrics["model"]["labels"]
    own = metrics.get("validation", {})
    figures = classification_metrics(labels, probabilities, class_keys)
    resampled = ["macro_f1", *(f"f1_{key}" for key in class_keys), "expected_calibration_error"]
    intervals = (
        bootstrap_intervals(
            lambda chosen: {
                key: value
                for key, value in classification_metrics(labels[chosen], probabilities[chosen], class_keys).items()
                if key in resampled
            },
            patients,
            resamples,
        )
        if resamples
        else {}
    )
    normal = class_keys.index("normal")
    rows = {
        "macro_f1": figure("macro-F1", figures["macro_f1"], intervals.get("macro_f1"), own.get("macro_f1"), "higher"),
        **{
            f"f1_{key}": figure(
                f"F1 {name}", figures[f"f1_{key}"], intervals.get(f"f1_{key}"), own.get(f"f1_{key}"), "higher"
            )
            for key, name in zip(class_keys, names, strict=True)
        },
        "pneumonia_sensitivity": share_figure(
            "pneumonia sensitivity",
            probabilities.argmax(1)[labels != normal] != normal,
            own.get("pneumonia_sensitivity"),
            "higher",
        ),
        "pneumonia_specificity": share_figure(
            "pneumonia specificity",
            probabilities.argmax(1)[labels == normal] == normal,
            own.get("pneumonia_specificity"),
            "higher",
        ),
        "expected_calibration_error": figure(
            "calibration error (ECE)",
            figures["expected_calibration_error"],
            intervals.get("expected_calibration_error"),
            own.get("expected_calibration_error"),
            "lower",
        ),
    }
    report = {
        "images": len(labels),
        "patients": len(set(patients)),
        "images_per_class": {name: int((labels == k).sum()) for k, name in enumerate(names)},
        "classification": rows,
        "prediction_sets": set_coverage(probabilities, labels, names, sets, metrics) if sets else None,
        "xray_check": None,
    }
    if detector is not None:
        flagged = ~detector.check(outputs)[1]
        accepted_on_validation = metrics.get("ood", {}).get("accepted", {}).get("validation")
        promise = 1 - metrics.get("ood", {}).get("accept_rate", ACCEPT_RATE)
        report["xray_check"] = share_figure("flagged as not a chest X-ray", flagged, promise, "lower") | {
            "model_validation": None if accepted_on_validation is None else 1 - accepted_on_validation
        }
    report["not_held"], report["unclear"] = verdicts(report)
    return report


def set_coverage(
    probabilities: np.ndarray, labels: np.ndarray, names: list[str], sets: PredictionSets, metrics: dict
) -> dict:
    """Coverage (with Wilson intervals, against the promised level) and mean set size, per level, overall and per
    class; beside them the coverage the folder measured on its own held-out children."""
    own = metrics.get("prediction_sets", {}).get("validation_held_out_children", {})
    report = {}
    for level_key, inside in sets.members(probabilities).items():
        level = float(level_key.rstrip("%")) / 100
        covered, size = inside[np.arange(len(labels)), labels], inside.sum(axis=1)
        parts = {"all classes": np.ones(len(labels), dtype=bool)} | {name: labels == k for k, name in enumerate(names)}
        report[level_key] = {}
        for part, chosen in parts.items():
            measured_own = own.get(level_key, {})
            measured_own = measured_own if part == "all classes" else measured_own.get("by_class", {}).get(part, {})
            report[level_key][part] = share_figure(
                f"{level_key} set coverage, {part}", covered[chosen], level, "higher"
            ) | {
                "images": int(chosen.sum()),
                "mean_set_size": float(size[chosen].mean()) if chosen.any() else None,
                "model_validation": measured_own.get("coverage"),
            }
    return report


def verdicts(report: dict) -> tuple[list[str], list[str]]:
    """Plain sentences: the promises the site's X-rays break (their interval wholly on the wrong side), and those
    they cannot settle (the value on the wrong side, the interval not)."""
    not_held, unclear = [], []

    def interval(row):
        return f"95 % CI {row['interval'][0]:.3f}-{row['interval'][1]:.3f}"

    for row in report["classification"].values():
        if row["verdict"] == "worse":
            side = "below" if row["better"] == "higher" else "above"
            not_held.append(
                f"{row['name']}: {row['site']:.3f} here ({interval(row)}), {side} the {row['model']:.3f} of the "
                "model's validation split."
            )
    for level_key, parts in (report["prediction_sets"] or {}).items():
        for part, row in parts.items():
            if row["site"] is None or row["site"] >= row["model"]:
                continue
            sentence = (
                f"{level_key} sets, {part}: cover {row['site']:.3f} of {row['images']} X-rays ({interval(row)}), "
                f"promised {row['model']:.2f}"
            )
            if row["verdict"] == "worse":
                not_held.append(sentence + ".")
            else:
                unclear.append(sentence + f"; {row['images']} X-rays cannot tell whether that is chance.")
    check = report["xray_check"]
    if check and check["site"] is not None and check["site"] > check["model"]:
        low, high = check["interval"]
        sentence = (
            f"The chest X-ray check flags {check['site']:.1%} of these real X-rays (95 % CI {low:.1%}-{high:.1%}), "
            f"where it should flag about {check['model']:.0%}"
        )
        if check["verdict"] == "worse":
            not_held.append(sentence + ".")
        else:
            unclear.append(sentence + "; within chance at this count.")
    return not_held, unclear


def describe_site_check(report: dict) -> str:
    """The report for the terminal: every figure beside the model's own, then where the promises do not hold."""

    def cell(value, interval):
        if value is None:
            return "-"
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"

    def own(value):
        return "-" if value is None else f"{value:.3f}"

    per_class = ", ".join(f"{count} {name.lower()}" for name, count in report["images_per_class"].items())
    lines = [
        f"Site check of {report.get('model', 'the model')} on {report.get('site', 'the site')}: "
        f"{report['images']} X-rays of {report['patients']} patients ({per_class}).",
        f"Figures with {CONFIDENCE:.0%} confidence intervals (Wilson for shares; bootstrap over patients for F1 and "
        "ECE), beside the model's own validation figures (metrics.json).",
        "",
        f"{'':34} {'this site':>24}  {'model':>8}",
    ]
    for row in report["classification"].values():
        lines.append(f"{row['name']:34} {cell(row['site'], row['interval']):>24}  {own(row['model']):>8}")
    if report["xray_check"]:
        row = report["xray_check"]
        lines.append(
            f"{row['name']:34} {cell(row['site'], row['interval']):>24}  {own(row['model_validation']):>8}"
            f"  (promise: about {row['model']:.0%} of real X-rays)"
        )
    for level_key, parts in (report["prediction_sets"] or {}).items():
        lines += [
            "",
            f"{level_key} sets: coverage [CI] / mean size; promised {level_key} per class; beside it the model's own "
            "held-out children",
        ]
        for part, row in parts.items():
            size = "-" if row["mean_set_size"] is None else f"{row['mean_set_size']:.2f}"
            lines.append(
                f"  {part:32} {cell(row['site'], row['interval']):>24} / {size:>4}  {own(row['model_validation']):>8}"
                f"  ({row['images']} X-rays)"
            )
    lines.append("")
    if report["not_held"]:
        lines.append("Where the model's promises do NOT hold on these X-rays:")
        lines += [f"  - {sentence}" for sentence in report["not_held"]]
    else:
        lines.append("Every promise holds on these X-rays, within the confidence intervals.")
    if report["unclear"]:
        lines.append("Below the promise, but too few X-rays to tell:")
        lines += [f"  - {sentence}" for sentence in report["unclear"]]
    if report["not_held"]:
        model, site = report.get("model", "MODEL_DIR"), report.get("site", "SITE_DIR")
        lines.append(
            "Recalibrate at this site (a new model folder, no retraining): "
            f"python calibrate.py {model} --site_dir {site} --output_dir NEW_MODEL_DIR"
        )
    return "\n".join(lines)


def plot_site_check(report: dict, path: str | Path) -> Path:
    """Three panels: the classification figures with their intervals beside the model's own; each prediction set's
    coverage per class against the promised level; the mean set size per class."""
    path = Path(path)
    rows = list(report["classification"].values()) + ([report["xray_check"]] if report["xray_check"] else [])
    sets = report["prediction_sets"] or {}
    figure_, axes = plt.subplots(1, 3, figsize=(16, 5), dpi=110, gridspec_kw={"width_ratios": [1.3, 1.2, 1]})
    axis = axes[0]
    for position, row in enumerate(rows):
        if row["site"] is None:
            continue
        low, high = row["interval"] or (row["site"], row["site"])
        colour = "tab:red" if row["verdict"] == "worse" else "tab:blue"
        axis.errorbar(
            row["site"],
            position,
            xerr=[[max(0.0, row["site"] - low)], [max(0.0, high - row["site"])]],
            fmt="o",
            color=colour,
            capsize=3,
        )
        reference = row.get("model_validation", row["model"]) if row is report["xray_check"] else row["model"]
        if reference is not None:
            axis.plot(reference, position, "k|", markersize=14, markeredgewidth=2)
    axis.set_yticks(range(len(rows)), [row["name"] for row in rows])
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), title="This site (95 % CI) vs the model's validation (|)")
    axis.grid(alpha=0.3, axis="x")

    axis = axes[1]
    parts = list(next(iter(sets.values()))) if sets else []
    for offset, (level_key, by_part) in zip(np.linspace(-0.15, 0.15, max(len(sets), 1)), sets.items(), strict=False):
        colour = LEVEL_COLOURS.get(level_key)
        level = float(level_key.rstrip("%")) / 100
        for position, part in enumerate(parts):
            row = by_part[part]
            if row["site"] is None:
                continue
            low, high = row["interval"]
            axis.errorbar(
                position + offset,
                row["site"],
                yerr=[[max(0.0, row["site"] - low)], [max(0.0, high - row["site"])]],
                fmt="o",
                color=colour,
                capsize=3,
                label=level_key if position == 0 else None,
            )
        axis.axhline(level, color=colour, linestyle="--", linewidth=1)
    axis.set_xticks(range(len(parts)), parts, rotation=15)
    lows = [row["interval"][0] for by_part in sets.values() for row in by_part.values() if row["interval"]]
    lowest = min(lows, default=0.0)
    axis.set(ylim=(max(0.0, lowest - 0.05), 1.01), title="Prediction-set coverage per class (-- promised)")
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3, axis="y")

    axis = axes[2]
    width = 0.8 / max(len(sets), 1)
    for index, (level_key, by_part) in enumerate(sets.items()):
        sizes = [by_part[part]["mean_set_size"] or 0 for part in parts]
        axis.bar(
            np.arange(len(parts)) + (index - (len(sets) - 1) / 2) * width,
            sizes,
            width,
            label=level_key,
            color=LEVEL_COLOURS.get(level_key),
        )
    axis.set_xticks(range(len(parts)), parts, rotation=15)
    axis.set(ylim=(0, 3), title="Mean set size (labels per X-ray)")
    axis.legend()
    figure_.suptitle(f"{report.get('model', '')} on {report.get('site', '')}: {report['images']} X-rays")
    figure_.tight_layout()
    figure_.savefig(path)
    plt.close(figure_)
    return path


def write_site_check(report: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """The plot and, beside it, its figures as JSON."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / REPORT_FILE, json.dumps(report, indent=2))
    return plot_site_check(report, output_dir / PLOT_FILE), output_dir / REPORT_FILE


def split_by_patient(patients: list[str], fit_fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """True for the images of a random `fit_fraction` of the patients (the fitting part), False for the rest (the
    checking part): a child's X-rays are never on both sides."""
    children = sorted(set(patients))
    chosen = set(np.random.default_rng(seed).permutation(children)[: round(fit_fraction * len(children))].tolist())
    return np.array([child in chosen for child in patients])


def too_few_images(labels: np.ndarray, names: list[str], fit_fraction: float, levels=LEVELS) -> str | None:
    """Why these fitting-part labels cannot give every class a threshold at every level (None where they can): a
    class with fewer than `images_needed` X-rays could only be put in every set, a weaker promise than stated."""
    needed = images_needed(max(levels))
    labels = np.asarray(labels)
    short = {name: int((labels == k).sum()) for k, name in enumerate(names) if (labels == k).sum() < needed}
    if not short:
        return None
    lines = [
        f"Too few X-rays to fit {level_name(max(levels))} prediction sets: each class needs at least {needed} in the "
        f"fitting part (the finite-sample quantile of split-conformal prediction), and"
    ]
    for name, count in short.items():
        more = needed - count
        lines.append(
            f"  {name}: {count} in the fitting part, {more} short; about {int(np.ceil(more / fit_fraction))} more "
            f"{name.lower()} X-rays (of new patients) at --site_fit_fraction {fit_fraction:g}."
        )
    lines.append("Nothing was written. Add X-rays of those classes, or raise --site_fit_fraction.")
    return "\n".join(lines)


def recalibration_record(
    *,
    source_model: str | Path,
    site: str | Path,
    command: str,
    labels: np.ndarray,
    patients: list[str],
    fit: np.ndarray,
    names: list[str],
    fit_fraction: float,
    seed: int,
    skipped: int,
    checked: dict,
) -> dict:
    """What metrics.json keeps of a site recalibration: the data, the two parts' counts, the date, the command, and
    the checking part's figures before and after (`check_site` reports, their sets part)."""
    labels, fit = np.asarray(labels), np.asarray(fit)

    def part(chosen):
        return {
            "images": int(chosen.sum()),
            "patients": len({patient for patient, inside in zip(patients, chosen, strict=True) if inside}),
            "images_per_class": {name: int((labels[chosen] == k).sum()) for k, name in enumerate(names)},
        }

    return {
        "source_model": str(Path(source_model).expanduser().resolve()),
        "data": str(Path(site).expanduser().resolve()),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "refitted": ["temperature", "prediction-set thresholds", "X-ray check threshold"],
        "kept": ["weights", "X-ray check statistics (training split)"],
        "split": f"by patient, {fit_fraction:g} of the patients to the fitting part, seed {seed}",
        "skipped_files": skipped,
        "fitting_part": part(fit),
        "checking_part": part(~fit),
        "checking_part_coverage": checked,
    }


def recalibrate_at_site(
    model,
    processor,
    dataset,
    patients: list[str],
    fit: np.ndarray,
    metrics: dict,
    detector,
    sets,
    site: str,
    batch_size: int = 64,
) -> tuple[dict, dict]:
    """Refit a model's reliability parts on a site's fitting part and check them on its checking part, before and
    after: embeds the site's X-rays once with `model` as loaded, checks the checking part with the folder's own
    `detector` and `sets`, refits (`cxr.reliability.refit_at_site`: the temperature folded into `model`'s head,
    `detector`'s threshold replaced) and checks again. `dataset` is a split of undecoded images and labels (as
    `hf_data.loading.load_site` gives it), `fit` True for the images of the fitting part (`split_by_patient`).
    Returns the reliability summary (for metrics.json, as `fit_reliability`'s) and the before/after comparison."""
    from cxr.features import embed_split
    from cxr.reliability import prediction_sets_of, refit_at_site

    outputs, labels = embed_split(model, processor, dataset, batch_size, desc="Features: site")
    fit = np.asarray(fit)
    parts = {
        name: ({key: values[chosen] for key, values in outputs.items()}, labels[chosen])
        for name, chosen in (("site fitting part", fit), ("site checking part", ~fit))
    }
    checking_patients = [patient for patient, inside in zip(patients, fit, strict=True) if not inside]
    before = check_site(*parts["site checking part"], checking_patients, metrics, detector, sets, resamples=0)
    fitting_patients = [patient for patient, inside in zip(patients, fit, strict=True) if inside]
    summary = refit_at_site(model, detector, parts, fitting_patients, site)
    after = check_site(
        *parts["site checking part"],
        checking_patients,
        metrics | summary,
        detector,
        prediction_sets_of(summary),
        resamples=0,
    )
    return summary, compare_checks(before, after)


def compare_checks(before: dict, after: dict) -> dict:
    """The checking part's figures before and after a recalibration: calibration error, share flagged, and each
    set's coverage (with its interval after) and mean size, overall and per class."""

    def site(row):
        return None if row is None else row["site"]

    comparison = {
        "images": after["images"],
        "patients": after["patients"],
        "expected_calibration_error": {
            "before": site(before["classification"]["expected_calibration_error"]),
            "after": site(after["classification"]["expected_calibration_error"]),
        },
        "flagged": {"before": site(before["xray_check"]), "after": site(after["xray_check"])},
        "prediction_sets": {},
    }
    for level_key, parts in (after["prediction_sets"] or {}).items():
        comparison["prediction_sets"][level_key] = {
            part: {
                "images": row["images"],
                "before": site(((before["prediction_sets"] or {}).get(level_key) or {}).get(part)),
                "after": row["site"],
                "after_interval": row["interval"],
                "mean_set_size_before": (((before["prediction_sets"] or {}).get(level_key) or {}).get(part) or {}).get(
                    "mean_set_size"
                ),
                "mean_set_size_after": row["mean_set_size"],
            }
            for part, row in parts.items()
        }
    return comparison


def describe_comparison(comparison: dict) -> str:
    """The before/after table of a recalibration's checking part, for the terminal."""

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    ece, flagged = comparison["expected_calibration_error"], comparison["flagged"]
    lines = [
        f"Checking part ({comparison['images']} X-rays of {comparison['patients']} patients, none used in the fit), "
        "before -> after recalibration:",
        f"  calibration error (ECE)           {number(ece['before'])} -> {number(ece['after'])}",
        f"  flagged as not a chest X-ray      {number(flagged['before'])} -> {number(flagged['after'])}",
    ]
    for level_key, parts in comparison["prediction_sets"].items():
        lines.append(f"  {level_key} sets: coverage before -> after [{CONFIDENCE:.0%} CI], mean size before -> after")
        for part, row in parts.items():
            interval = row["after_interval"]
            interval = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
            lines.append(
                f"    {part:22} {number(row['before'])} -> {number(row['after'])} {interval:16} "
                f"{number(row['mean_set_size_before'], 2)} -> {number(row['mean_set_size_after'], 2)}"
                f"  ({row['images']} X-rays)"
            )
    return "\n".join(lines)


def site_check_record(report: dict, date: str) -> dict:
    """The headline of a site check, as metrics.json keeps it (`site_check.py --record`) and the card shows it."""
    rows = report["classification"]
    sets = report["prediction_sets"]
    return {
        "site": report["site"],
        "date": date,
        "images": report["images"],
        "images_per_class": report["images_per_class"],
        "macro_f1": rows["macro_f1"]["site"],
        "pneumonia_specificity": rows["pneumonia_specificity"]["site"],
        "pneumonia_sensitivity": rows["pneumonia_sensitivity"]["site"],
        "coverage_95": {part: row["site"] for part, row in sets["95%"].items()},
        "coverage_90": {part: row["site"] for part, row in sets["90%"].items()},
        "flagged": report["xray_check"]["site"],
        "not_held": report["not_held"],
    }


def record_site_check(folder: Path, report: dict) -> None:
    """Keep a site check's headline in the folder's metrics.json and card, written whole (staging, checksums, swap)."""
    import datetime
    import shutil

    from cxr.card import render_model_card
    from cxr.folders import staging_folder, swap_in
    from cxr.run_record import read_metrics, read_run, update_metrics, write_checksums

    staging = staging_folder(folder)
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".onnx":  # ONNX exports are a cache beside the record, carried over
            shutil.copy2(path, staging / path.name)
    update_metrics(staging, site_check=site_check_record(report, datetime.date.today().isoformat()))
    render_model_card(read_run(staging), read_metrics(staging)).save(staging / "README.md")
    write_checksums(staging)
    swap_in(staging, folder)
