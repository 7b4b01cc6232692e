"""Refit calibration, the chest X-ray check and the prediction sets on a finished model folder: in place on its own
data, or into a new folder on a new site's labelled X-rays.

    python calibrate.py outputs/vit-xray --data_dir data/prepared/chest_xray
    python calibrate.py models/swiftformer-xray --site_dir SITE_XRAYS --output_dir models/swiftformer-xray-site

train_vit.py fits all three at the end of every run; the first command fits them again without retraining (after
the data changed, or for a folder trained before they existed), with `cxr.reliability.fit_reliability`. The second
refits them on part of a site's X-rays, chosen by patient, checks them on the rest and writes a new folder
(`cxr.site.recalibrate_at_site`); the original stays as it was. `site_check.py` says whether a site needs it.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from cxr.card import replace_reliability_section
from cxr.conformal import CONFORMAL_FILE, PredictionSets
from cxr.folders import staging_folder, swap_in, write_text_atomic
from cxr.ood import DEFAULT_SCORE, OOD_FILE, SCORES, OodDetector
from cxr.reliability import describe_reliability, fit_reliability, save_reliability
from cxr.run_record import (
    CHECKSUMS_FILE,
    calibrated_parts,
    read_metrics,
    update_metrics,
    warn_if_other_split,
    write_checksums,
)
from cxr.site import describe_comparison, recalibrate_at_site, recalibration_record, split_by_patient, too_few_images
from hf_data.loading import load_model_data, load_site, validation_patient_ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python calibrate.py",
        description="Fit temperature scaling, the out-of-distribution check and the prediction sets on a trained "
        "model folder, without retraining, and save them into it in place: the temperature folded into the classifier "
        f"head (model.safetensors, config.json), the feature statistics and threshold in {OOD_FILE}, the set "
        "thresholds in conformal.json, the figures in metrics.json. With --site_dir, refit them on a new site's "
        "labelled X-rays instead and write a new folder (--output_dir).",
    )
    parser.add_argument(
        "model_dir", type=Path, help="Model folder written by train_vit.py (rewritten in place, unless --site_dir)."
    )
    parser.add_argument(
        "--data_dir",
        help="The data the model was trained on: a prepared tree (data/prepared/<name>, with manifest.csv), "
        "the raw folder given to train_vit.py (prepared again with the same patient-grouped split), or 'synthetic'. "
        "Required unless --site_dir.",
    )
    parser.add_argument(
        "--site_dir",
        type=Path,
        help="Labelled X-rays from a new site (the Kaggle layout, NORMAL/ and PNEUMONIA/ with Kaggle's file names, or "
        "class folders normal/, bacteria/, viral/): refit the temperature, the prediction-set thresholds and the X-ray "
        "check's threshold on part of them (split by patient), report coverage on the rest, and write the result as a "
        "new model folder (--output_dir). The weights and the X-ray check's training statistics are kept; nothing is "
        "retrained. Never use X-rays the model was trained on.",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        help="With --site_dir: the new model folder (must not exist yet, or be empty); the original is left as it is.",
    )
    parser.add_argument(
        "--site_fit_fraction",
        type=float,
        default=0.5,
        help="With --site_dir: the share of the site's patients whose X-rays the parts are fitted on; the others "
        "check them (default 0.5).",
    )
    parser.add_argument(
        "--site_split_seed",
        type=int,
        default=0,
        help="With --site_dir: random seed of the patient split into fitting and checking parts (default 0).",
    )
    parser.add_argument(
        "--prepared_dir",
        default=None,
        help="Where to prepare a raw --data_dir. Default: data/prepared/<name of data_dir>.",
    )
    parser.add_argument(
        "--validation_fraction",
        type=float,
        default=0.1,
        help="As given to train_vit.py (raw --data_dir only; default 0.1).",
    )
    parser.add_argument(
        "--split_seed", type=int, default=42, help="As given to train_vit.py (raw --data_dir only; default 42)."
    )
    # the old spelling
    parser.add_argument("--seed", dest="split_seed", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--synthetic_images_per_class",
        type=int,
        default=200,
        help="As given to train_vit.py (--data_dir synthetic only; default 200).",
    )
    parser.add_argument(
        "--score",
        choices=SCORES,
        default=DEFAULT_SCORE,
        help=f"Which out-of-distribution score decides (default {DEFAULT_SCORE}; benchmarks/ood.py compares them).",
    )
    parser.add_argument(
        "--batch_size", type=int, default=64, help="Images per forward pass during feature extraction (default 64)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if not (args.model_dir / "config.json").is_file():
        parser.error(f"no model at {args.model_dir} (no config.json there)")
    if args.site_dir is not None:
        return recalibrate_site(parser, args)
    if args.data_dir is None:
        parser.error("give --data_dir (refit in place on the model's own data) or --site_dir (a new site's X-rays)")
    dataset = load_model_data(
        args.data_dir, args.prepared_dir, args.validation_fraction, args.split_seed, args.synthetic_images_per_class
    )
    if "validation" not in dataset or "train" not in dataset:
        parser.error(f"{args.data_dir} has no train and validation splits")
    warn_if_other_split(args.model_dir, dataset)
    model = AutoModelForImageClassification.from_pretrained(args.model_dir, use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(args.model_dir)

    detector, summary = fit_reliability(
        model, processor, dataset, validation_patient_ids(dataset), batch_size=args.batch_size, score_name=args.score
    )
    save_refitted(model, args.model_dir, args.model_dir, detector, summary)
    print(describe_reliability(summary))
    print(
        f"Saved into {args.model_dir}: calibrated head (model.safetensors, config.json), {OOD_FILE}, "
        "conformal.json, metrics.json."
    )
    return 0


def recalibrate_site(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """calibrate.py --site_dir: split the site's X-rays by patient, refuse where a class has too few, refit on the
    fitting part, check on the checking part, write the new folder whole."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if args.output_dir is None:
        parser.error("--site_dir writes a new model folder: give it with --output_dir")
    if args.output_dir.resolve() == args.model_dir.resolve():
        parser.error("--output_dir must be a new folder: a site recalibration never rewrites the original")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        parser.error(f"{args.output_dir} already exists and is not empty; choose a new folder")
    if not 0 < args.site_fit_fraction < 1:
        parser.error(f"--site_fit_fraction must be between 0 and 1, got {args.site_fit_fraction}")
    if not (args.model_dir / OOD_FILE).is_file():
        parser.error(
            f"{args.model_dir} has no X-ray check ({OOD_FILE}) to refit: run calibrate.py --data_dir on it first"
        )
    site = load_site(args.site_dir)
    model = AutoModelForImageClassification.from_pretrained(args.model_dir, use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(args.model_dir)
    names = [model.config.id2label[index] for index in range(len(model.config.id2label))]
    labels = np.asarray(site.dataset["label"])
    fit = split_by_patient(site.patients, args.site_fit_fraction, args.site_split_seed)
    if refusal := too_few_images(labels[fit], names, args.site_fit_fraction):
        print(refusal, file=sys.stderr)
        return 1

    sets_file = args.model_dir / CONFORMAL_FILE
    metrics = read_metrics(args.model_dir)
    detector = OodDetector.load(args.model_dir / OOD_FILE)
    summary, comparison = recalibrate_at_site(
        model,
        processor,
        site.dataset,
        site.patients,
        fit,
        metrics,
        detector,
        PredictionSets.load(sets_file) if sets_file.is_file() else None,
        site=str(site.source),
        batch_size=args.batch_size,
    )
    record = recalibration_record(
        source_model=args.model_dir,
        site=site.source,
        command=shlex.join(["python", "calibrate.py", *sys.argv[1:]]),
        labels=labels,
        patients=site.patients,
        fit=fit,
        names=names,
        fit_fraction=args.site_fit_fraction,
        seed=args.site_split_seed,
        skipped=len(site.skipped),
        checked=comparison,
    )
    save_refitted(model, args.model_dir, args.output_dir, detector, summary, record)
    print(describe_reliability(summary))
    print(describe_comparison(comparison))
    print(
        f"Wrote the recalibrated model folder {args.output_dir} (the app, predict.py and pipeline() load it as any "
        f"other); {args.model_dir} is unchanged. The record is in its metrics.json (site_recalibration) and card."
    )
    return 0


def save_refitted(
    model, source: Path, target: Path, detector: OodDetector, summary: dict, site_record: dict | None = None
) -> None:
    """Write `model` with its refitted parts into `target` whole: `source` itself (in place), or a new folder with the
    rest of `source`'s files. Rewritten files go into a staging sibling, swapped in at once: a crash leaves the folder
    as it was, never new weights beside old statistics. ONNX exports of the old weights are not carried over, nor
    (into a new folder) checkpoints. `site_record` is the site recalibration's record; an in-place refit clears
    an earlier one."""
    staging = staging_folder(target)
    model.save_pretrained(staging)
    if target == source:  # swap_in carries over the rest
        carried = [source / name for name in ("metrics.json", "README.md") if (source / name).is_file()]
    else:
        carried = [
            entry
            for entry in sorted(source.iterdir())
            if entry.is_file() and entry.suffix != ".onnx" and entry.name != CHECKSUMS_FILE
        ]
    for entry in carried:
        if not (staging / entry.name).exists():
            shutil.copy2(entry, staging / entry.name)
    save_reliability(staging, detector, summary)
    kept = read_metrics(staging)
    site = {} if site_record is None and "site_recalibration" not in kept else {"site_recalibration": site_record}
    update_metrics(staging, **calibrated_parts(kept, summary), **site)
    update_card(staging, summary | site)
    write_checksums(staging)
    swap_in(staging, target, replaced=("*.onnx",))


def update_card(model_dir: Path, summary: dict) -> None:
    """Replace (or add) the reliability section of the folder's model card."""
    card = model_dir / "README.md"
    if card.is_file():
        write_text_atomic(card, replace_reliability_section(card.read_text(), summary))


if __name__ == "__main__":
    raise SystemExit(main())
