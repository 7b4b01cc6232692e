"""Batch prediction: the top three labels for every X-ray in folders or file lists, written to CSV or JSON.

    python predict.py path/to/xrays/ more.jpeg --model outputs/vit-xray --output predictions.csv

Files that cannot be read are kept in the output with their error; the run goes on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxr.models import DEFAULT_MODEL_DIR
from cxr.predict import ModelNotFoundError, find_images, load_classifier, predict_files, write_predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively for JPEG, PNG, DICOM, ...).")
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR, help="Model folder written by train_vit.py, or a Hub id.")
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"), help="Where to write the results: .csv or .json.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward pass.")
    parser.add_argument("--int8", action="store_true", help="Quantize the model's Linear layers to int8: faster on CPU, slightly different scores.")
    args = parser.parse_args(argv)

    paths = find_images(args.inputs)
    if not paths:
        parser.error(f"no image files found in {' '.join(args.inputs)}")
    try:
        classifier = load_classifier(args.model, int8=args.int8)
    except ModelNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    count, failed = write_predictions(predict_files(classifier, paths, batch_size=args.batch_size), args.output)
    print(f"Wrote {count} predictions to {args.output} ({failed} files could not be read; see the error column).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
