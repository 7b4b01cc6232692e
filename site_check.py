"""Check a model folder on a site's own labelled X-rays: do its promises hold there?

    python site_check.py models/swiftformer-xray path/to/site_xrays --output_dir outputs/site-checks/mine

Prints macro-F1, F1 per class, pneumonia sensitivity and specificity, the calibration error, each prediction set's
coverage and mean size per class, and the share the chest X-ray check flags, with 95 % confidence intervals, beside
the folder's own validation figures (its metrics.json); then says plainly which promises do not hold on these X-rays.
Writes a plot (site_check.png) and its figures (site_check.json) into --output_dir. Nothing is fitted or changed:
`calibrate.py MODEL --site_dir SITE --output_dir NEW` refits the reliability parts at the site.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning: see app.py

from cxr.features import embed_split
from cxr.models import SHIPPED_MODEL_DIR
from cxr.predictor import ModelNotFoundError, load_classifier, model_summary
from cxr.site import BOOTSTRAP_RESAMPLES, check_site, describe_site_check, record_site_check, write_site_check
from hf_data.loading import load_site


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python site_check.py",
        description="Check a model folder on a site's own labelled X-rays: macro-F1 and F1 per class, pneumonia "
        "sensitivity and specificity, the calibration error, each prediction set's coverage and mean size per class "
        "and the share the chest X-ray check flags, with 95 % confidence intervals, beside the folder's own "
        "validation figures; it says which promises do not hold there, and writes site_check.png and "
        "site_check.json. Nothing is changed: calibrate.py --site_dir refits at the site.",
    )
    parser.add_argument(
        "site_dir",
        type=Path,
        help="Labelled X-rays from the site: the Kaggle layout (NORMAL/ and PNEUMONIA/, the subtype and patient in "
        "Kaggle's file names) or class folders (normal/, bacteria/, viral/). Patient ids come from Kaggle-style "
        "names; otherwise each file is its own patient.",
    )
    parser.add_argument(
        "--model",
        default=str(SHIPPED_MODEL_DIR),
        help="Model folder to check (written by train_vit.py or calibrate.py). Default: the model that ships with the "
        "code (models/swiftformer-xray).",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="Where to write site_check.png and site_check.json. Default: outputs/site-checks/<model>-on-<site>.",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"Resamples of patients behind the F1 and calibration-error intervals (default {BOOTSTRAP_RESAMPLES}).",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass (default 64).")
    parser.add_argument(
        "--record",
        action="store_true",
        help="Also keep the check's headline figures in the folder's metrics.json and card (the folder is rewritten "
        "whole; its model, X-ray check and sets stay as they are).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        classifier = load_classifier(args.model)
    except ModelNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    metrics = model_summary(args.model)
    if "model" not in metrics:
        print(f"{args.model} has no metrics.json with its own figures to compare with.", file=sys.stderr)
        return 1
    site = load_site(args.site_dir)
    if (metrics.get("site_recalibration") or {}).get("data") == str(site.source):
        print(
            f"Note: {args.model} was recalibrated on part of these X-rays, so its sets look better here than on new "
            "ones: its metrics.json (site_recalibration) has the figures on the part held out of that fit.",
            file=sys.stderr,
        )
    outputs, labels = embed_split(classifier.model, classifier.image_processor, site.dataset, args.batch_size)
    report = {"model": args.model, "site": str(site.source), "skipped_files": len(site.skipped)} | check_site(
        outputs,
        labels,
        site.patients,
        metrics,
        classifier.ood_detector,
        classifier.prediction_sets,
        resamples=args.bootstrap,
    )
    output_dir = args.output_dir or Path("outputs/site-checks") / f"{Path(args.model).name}-on-{site.source.name}"
    plot, figures = write_site_check(report, output_dir)
    print(describe_site_check(report))
    print(f"\nWrote {plot} and its figures, {figures}.")
    if args.record:
        record_site_check(Path(args.model), report)
        print(f"Recorded in {args.model}/metrics.json and its card.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
