"""Batch prediction: the top three labels for every X-ray in folders or file lists, written to CSV or JSON.

    python predict.py path/to/xrays/ more.jpeg --output predictions.csv   # the shipped model; --model for yours
    python predict.py @files.txt --ray auto --output scores/   # on a Ray cluster, resumable (docs/scaling.md)

Each row also holds the conformal prediction sets (`set_90`, `set_95`: the labels that together contain the true one
for 90 % / 95 % of X-rays of each class; see cxr/conformal.py) and says whether the image looks like a pediatric
chest X-ray at all (`looks_like_chest_xray`, from the model folder's out-of-distribution check, and its
`ood_score`); the labels and sets of a row marked false mean nothing.
Files that cannot be read are kept in the output with their error; the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning: see app.py

from cxr.features import OnnxExportError
from cxr.models import SHIPPED_MODEL_DIR
from cxr.predictor import (
    RUNTIMES,
    ModelNotFoundError,
    find_image_files,
    load_classifier,
    predict_files,
    write_predictions,
)

# The runtime predict.py uses unless told otherwise: the fastest that clears benchmarks.speed.DEFAULT_BAR on the shipped
# model (docs/onnx.md). A model that ONNX cannot export runs with FALLBACK_RUNTIME instead.
DEFAULT_RUNTIME = "onnx"
FALLBACK_RUNTIME = "torch"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        fromfile_prefix_chars="@",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        help="Image files and/or folders (searched recursively for JPEG, PNG, DICOM, ...); @LIST reads more from the "
        "text file LIST, one a line.",
    )
    parser.add_argument(
        "--model",
        default=str(SHIPPED_MODEL_DIR),
        help="Model folder written by train_vit.py (e.g. outputs/swiftformer-xray), or a Hub id. "
        "Default: the model that ships with the code (models/swiftformer-xray).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Where to write the results: .csv or .json (default predictions.csv); with --ray, a folder of Parquet "
        "files (default predictions/) that a rerun resumes.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward pass.")
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help=f"What runs the model: PyTorch or ONNX Runtime (CPU), in float32 or with int8 weights "
        f"(python -m benchmarks.speed measures each one's speed and agreement with float32; docs/onnx.md). "
        f"Default: {DEFAULT_RUNTIME}, or {FALLBACK_RUNTIME} for a model ONNX cannot export (e.g. MobileViT); "
        f"with --int8 or --onnx alone, they add to {FALLBACK_RUNTIME}.",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="Quantize the model's Linear layers to int8 (--runtime torch-int8, or onnx-int8 with --onnx): faster on "
        "CPU, slightly different scores (and the X-ray check, fitted in float32, flags a few more real X-rays: "
        "docs/reliability.md).",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="Run the model with ONNX Runtime (CPU) instead of PyTorch (--runtime onnx). With --int8, ONNX Runtime's "
        "own int8 quantization. The model is exported on first use into the model folder (model.onnx / "
        "model.int8.onnx; a temporary copy for a Hub id or a read-only folder) and exported again whenever its "
        "weights change.",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="Score on a Ray cluster (pip install -r requirements-cluster.txt; docs/scaling.md): ADDRESS of a running "
        "one (auto: the one on this machine), or none to start Ray here. Files already in --output are skipped.",
    )
    parser.add_argument(
        "--actors",
        type=int,
        default=None,
        help="With --ray: model copies scoring at once (default: from one up to what the cluster's CPUs allow).",
    )
    parser.add_argument(
        "--cpus_per_actor", type=float, default=1, help="With --ray: CPUs (torch threads) each model copy takes."
    )
    return parser


def runtime_by_default(args: argparse.Namespace) -> bool:
    return args.runtime is None and not (args.int8 or args.onnx)


def chosen_runtime(args: argparse.Namespace) -> dict[str, bool]:
    """`load_classifier`'s keyword arguments for the runtime asked for: --runtime, with --int8 and --onnx adding to
    it (to FALLBACK_RUNTIME, as before the default changed, where they come without --runtime)."""
    name = args.runtime or (FALLBACK_RUNTIME if args.int8 or args.onnx else DEFAULT_RUNTIME)
    return {option: value or getattr(args, option) for option, value in RUNTIMES[name].items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime = chosen_runtime(args)

    output = args.output or Path("predictions.csv" if args.ray is None else "predictions")
    if args.ray is not None and output.suffix.lower() in (".csv", ".json"):
        parser.error(f"with --ray, --output is a folder (of Parquet files), not {output}")
    paths = find_image_files(args.inputs)
    if not paths:
        parser.error(f"no image files found in {' '.join(args.inputs)}")
    try:
        try:
            classifier = load_classifier(args.model, **runtime)
        except OnnxExportError as error:
            if not runtime_by_default(args):
                raise
            runtime = RUNTIMES[FALLBACK_RUNTIME]
            print(f"Note: {error.args[0].split(':')[0]}; running it with {FALLBACK_RUNTIME}.", file=sys.stderr)
            classifier = load_classifier(args.model, **runtime)
    except (ModelNotFoundError, OnnxExportError) as error:
        print(error, file=sys.stderr)
        return 1
    if classifier.ood_detector is None:
        print(
            f"Note: {args.model} has no out-of-distribution statistics, so looks_like_chest_xray stays empty "
            f"(add them with: python calibrate.py {args.model} --data_dir YOUR_DATA).",
            file=sys.stderr,
        )
    if classifier.prediction_sets is None:
        print(
            f"Note: {args.model} has no prediction-set thresholds (conformal.json), so set_90 and set_95 stay empty "
            f"(add them with: python calibrate.py {args.model} --data_dir YOUR_DATA).",
            file=sys.stderr,
        )
    if args.ray is None:
        count, failed, flagged = write_predictions(predict_files(classifier, paths, batch_size=args.batch_size), output)
    else:
        try:
            from cxr.cluster import score_on_ray  # Ray only for those who ask for it
        except ImportError as error:
            print(f"--ray needs Ray ({error}): pip install -r requirements-cluster.txt", file=sys.stderr)
            return 1
        count, failed, flagged = score_on_ray(
            paths, args.model, runtime, output, args.ray or None, args.batch_size, args.actors, args.cpus_per_actor
        )
    print(
        f"Wrote {count} predictions to {output} ({failed} files could not be read; see the error column; "
        f"{flagged} do not look like a pediatric chest X-ray: looks_like_chest_xray is false)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
