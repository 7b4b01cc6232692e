"""Refit calibration, the chest X-ray check and the prediction sets on a finished model folder, in place.

    python calibrate.py outputs/vit-xray --data_dir data/prepared/chest_xray

train_vit.py fits all three at the end of every run; this command fits them again without retraining (after the
data changed, or for a folder trained before they existed), with `cxr.reliability.fit_reliability`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from cxr.card import replace_reliability_section
from cxr.folders import staging_folder, swap_in, write_text_atomic
from cxr.ood import DEFAULT_SCORE, OOD_FILE, SCORES
from cxr.reliability import describe_reliability, fit_reliability, save_reliability
from cxr.run_record import calibrated_parts, read_metrics, update_metrics, warn_if_other_split, write_checksums
from hf_data.loading import load_model_data, validation_patient_ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python calibrate.py",
        description="Fit temperature scaling, the out-of-distribution check and the prediction sets on a trained "
        "model folder, without retraining, and save them into it in place: the temperature folded into the classifier "
        f"head (model.safetensors, config.json), the feature statistics and threshold in {OOD_FILE}, the set "
        "thresholds in conformal.json, the figures in metrics.json.",
    )
    parser.add_argument("model_dir", type=Path, help="Model folder written by train_vit.py (rewritten in place).")
    parser.add_argument(
        "--data_dir",
        required=True,
        help="The data the model was trained on: a prepared tree (data/prepared/<name>, with manifest.csv), "
        "the raw folder given to train_vit.py (prepared again with the same patient-grouped split), or 'synthetic'.",
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
    write_checksums(staging)
    swap_in(staging, args.model_dir, replaced=("*.onnx",))
    print(describe_reliability(summary))
    print(
        f"Saved into {args.model_dir}: calibrated head (model.safetensors, config.json), {OOD_FILE}, "
        "conformal.json, metrics.json."
    )
    return 0


def update_card(model_dir: Path, summary: dict) -> None:
    """Replace (or add) the reliability section of the folder's model card."""
    card = model_dir / "README.md"
    if card.is_file():
        write_text_atomic(card, replace_reliability_section(card.read_text(), summary))


if __name__ == "__main__":
    raise SystemExit(main())
