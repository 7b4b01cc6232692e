"""Site recalibration over many patient splits: does refitting on half of a site's children restore the stated
coverage on the other half?

    python -m benchmarks.site_recalibration --model models/swiftformer-xray --site_dir ../shared/data/site_test

`calibrate.py --site_dir` refits once, on one split. This embeds the site's X-rays once and repeats the same refit
(`cxr.reliability.refit_at_site`, on copies of the model and its X-ray check) over --splits random patient splits,
then prints, for the checking part of each split, the coverage and mean size of the folder's own prediction sets
(before) and of the refitted ones (after), overall and per class, as mean ± standard deviation over the splits;
the share flagged by the X-ray check and the calibration error likewise. Target (issue 34): 95 % sets cover
0.95 ± 0.02 on the checking part, each class within 0.05 of 0.95. The site's X-rays are never trained on, and
nothing is chosen by these figures.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoModelForImageClassification

from cxr.conformal import CONFORMAL_FILE, PredictionSets
from cxr.features import embed_split
from cxr.metrics import expected_calibration_error, softmax
from cxr.models import SHIPPED_MODEL_DIR
from cxr.ood import OOD_FILE, OodDetector
from cxr.reliability import refit_at_site
from cxr.site import split_by_patient, too_few_images
from hf_data.loading import load_site

SITE_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "site_test"
TARGET_LEVEL, TARGET_OVERALL, TARGET_PER_CLASS = "95%", 0.02, 0.05


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=SHIPPED_MODEL_DIR, help="Model folder (default: the shipped one)."
    )
    parser.add_argument(
        "--site_dir", type=Path, default=SITE_TEST, help="A site's labelled X-rays (default ../shared/data/site_test)."
    )
    parser.add_argument("--splits", type=int, default=50, help="Random patient splits (default 50).")
    parser.add_argument("--fit_fraction", type=float, default=0.5, help="Share of patients fitted on (default 0.5).")
    parser.add_argument("--batch_size", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print("python -m benchmarks.site_recalibration " + shlex.join(argv if argv is not None else sys.argv[1:]))

    model = AutoModelForImageClassification.from_pretrained(args.model, use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(args.model)
    names = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    detector = OodDetector.load(args.model / OOD_FILE)
    sets = PredictionSets.load(args.model / CONFORMAL_FILE)
    site = load_site(args.site_dir)
    outputs, labels = embed_split(model, processor, site.dataset, args.batch_size, desc="Features: site")

    figures: dict[str, list[float]] = {}

    def record(key: str, value: float | None) -> None:
        if value is not None:
            figures.setdefault(key, []).append(value)

    refused = 0
    for seed in range(args.splits):
        fit = split_by_patient(site.patients, args.fit_fraction, seed)
        if too_few_images(labels[fit], names, args.fit_fraction):
            refused += 1
            continue
        parts = {
            name: ({key: values[chosen].copy() for key, values in outputs.items()}, labels[chosen])
            for name, chosen in (("site fitting part", fit), ("site checking part", ~fit))
        }
        check_outputs, check_labels = parts["site checking part"]
        before_probabilities = softmax(check_outputs["logits"])
        before = sets.evaluate(before_probabilities, check_labels)
        record("flagged before", float(1 - detector.check(check_outputs)[1].mean()))
        record("ECE before", expected_calibration_error(check_labels, before_probabilities))
        groups = [patient for patient, inside in zip(site.patients, fit, strict=True) if inside]
        summary = refit_at_site(copy.deepcopy(model), copy.deepcopy(detector), parts, groups, str(site.source))
        after = summary["prediction_sets"]["by_split"]["site checking part"]
        record("flagged after", 1 - summary["ood"]["accepted"]["site checking part"])
        record("ECE after", summary["calibration"]["by_split"]["site checking part"]["ece_after"])
        for when, report in (("before", before), ("after", after)):
            for level, by_level in report.items():
                record(f"{level} all classes coverage {when}", by_level["coverage"])
                record(f"{level} all classes size {when}", by_level["mean_set_size"])
                for name, by_class in by_level["by_class"].items():
                    record(f"{level} {name} coverage {when}", by_class["coverage"])
                    record(f"{level} {name} size {when}", by_class["mean_set_size"])

    used = args.splits - refused
    print(
        f"{args.model} on {site.source}: {len(labels)} X-rays of {len(set(site.patients))} patients; {used} patient "
        f"splits ({args.fit_fraction:g} of the patients fitted on, the rest checked)"
        + (f", {refused} more refused for too few X-rays of a class" if refused else "")
        + ". Checking part, mean ± sd over the splits:"
    )
    if not used:
        return 1

    def cell(key: str, digits: int = 3) -> str:
        values = np.asarray(figures.get(key, []))
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}" if len(values) else "-"

    print(f"{'':31} {'coverage before':>16} {'coverage after':>16} {'size before':>13} {'size after':>13}")
    for level in sets.thresholds:
        for part in ("all classes", *names):
            print(
                f"{level + ' sets, ' + part:31} {cell(f'{level} {part} coverage before'):>16} "
                f"{cell(f'{level} {part} coverage after'):>16} {cell(f'{level} {part} size before', 2):>13} "
                f"{cell(f'{level} {part} size after', 2):>13}"
            )
    print(f"{'flagged as not a chest X-ray':31} {cell('flagged before'):>16} {cell('flagged after'):>16}")
    print(f"{'calibration error (ECE)':31} {cell('ECE before'):>16} {cell('ECE after'):>16}")

    level = float(TARGET_LEVEL.rstrip("%")) / 100
    overall = np.mean(figures[f"{TARGET_LEVEL} all classes coverage after"])
    per_class = {name: np.mean(figures[f"{TARGET_LEVEL} {name} coverage after"]) for name in names}
    met = abs(overall - level) <= TARGET_OVERALL and all(
        abs(value - level) <= TARGET_PER_CLASS for value in per_class.values()
    )
    print(
        f"Target: {TARGET_LEVEL} sets cover {level:.2f} ± {TARGET_OVERALL} after recalibration, each class within "
        f"{TARGET_PER_CLASS}: {'met' if met else 'NOT met'} (overall {overall:.3f}; "
        + ", ".join(f"{name} {value:.3f}" for name, value in per_class.items())
        + ")."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
