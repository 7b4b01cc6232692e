"""Command line for the data layer.

    python -m hf_data prepare SOURCE OUTPUT [--validation_fraction 0.1 --split_seed 42 --keep_kaggle_val --copy]
    python -m hf_data synthetic OUTPUT [--images_per_class 40 --size 64 --seed 0]

Options are spelled with underscores, as train_vit.py spells them; the older dashed spellings (and prepare's
--seed) are still accepted, unlisted, so earlier commands keep working.
"""

from __future__ import annotations

import argparse
import sys

from hf_data.prepare import MANIFEST_NAME, SKIPPED_NAME, prepare_dataset
from hf_data.synthetic import SYNTHETIC_FOLDERS, make_synthetic_dataset


def add_old_spelling(parser: argparse.ArgumentParser, option: str, dest: str, **kwargs) -> None:
    """Accept an earlier spelling of an option without listing it, so commands written before the rename still run."""
    parser.add_argument(option, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_data",
        description="Prepare chest X-ray images for training, or generate a synthetic data set for pipeline tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare",
        help="turn a folder of X-rays into the imagefolder tree train_vit.py loads",
        description=(
            "Find the X-rays in SOURCE, read each one's class and patient id, check that it decodes, split off a "
            "patient-grouped validation set, and write OUTPUT/{train,validation,test}/{bacterial_pneumonia,normal,"
            f"viral_pneumonia}}/ with {MANIFEST_NAME} (every image) and {SKIPPED_NAME} (every file left out, and why). "
            "SOURCE is the Kaggle download (chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/, the subtype read from "
            "file names such as person1000_bacteria_2931.jpeg) or class folders "
            "({train,test}/{bacteria,normal,viral}/, or those class folders directly in SOURCE). The files in SOURCE "
            "are never changed."
        ),
    )
    prepare.add_argument("source", metavar="SOURCE", help="folder holding the X-rays (read only)")
    prepare.add_argument(
        "output",
        metavar="OUTPUT",
        help="folder to write; must be new, empty, or written by an earlier prepare (which is then replaced)",
    )
    prepare.add_argument(
        "--validation_fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of the training images to hold out for validation, taken as whole patients (default: 0.1)",
    )
    prepare.add_argument("--split_seed", type=int, default=42, help="random seed of the validation split (default: 42)")
    prepare.add_argument(
        "--keep_kaggle_val",
        action="store_true",
        help="use SOURCE's val/ folder as the validation split instead of folding it into train "
        "(Kaggle's holds only 16 images, too few to judge a model)",
    )
    add_old_spelling(prepare, "--validation-fraction", "validation_fraction", type=float)
    add_old_spelling(prepare, "--seed", "split_seed", type=int)
    add_old_spelling(prepare, "--keep-kaggle-val", "keep_kaggle_val", action="store_true")
    prepare.add_argument(
        "--copy",
        action="store_true",
        help="copy the images instead of symlinking them (needs the disk space; survives moving SOURCE)",
    )

    synthetic = commands.add_parser(
        "synthetic",
        help="draw a small synthetic data set (not X-rays) to test the pipeline without a download",
        description=(
            "Write generated grayscale pictures of cartoon chests - NOT X-rays - to "
            "OUTPUT/{train,test}/{bacteria,normal,viral}/, about 80/20, 1-3 images per synthetic patient. Prepare "
            "them like real data: python -m hf_data prepare OUTPUT PREPARED"
        ),
    )
    synthetic.add_argument("output", metavar="OUTPUT", help="folder to write (new, empty, or an earlier synthetic set)")
    synthetic.add_argument(
        "--images_per_class", type=int, default=40, metavar="N", help="images per class (default: 40)"
    )
    add_old_spelling(synthetic, "--images-per-class", "images_per_class", type=int)
    synthetic.add_argument(
        "--size", type=int, default=64, metavar="PX", help="width and height in pixels (default: 64)"
    )
    synthetic.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same images (default: 0)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            report = prepare_dataset(
                args.source,
                args.output,
                validation_fraction=args.validation_fraction,
                seed=args.split_seed,
                keep_kaggle_val=args.keep_kaggle_val,
                copy=args.copy,
            )
            print(report.summary())
        else:
            output = make_synthetic_dataset(
                args.output, images_per_class=args.images_per_class, size=args.size, seed=args.seed
            )
            print(f"Wrote synthetic images (generated pictures, not X-rays) to {output}")
            for split in ("train", "test"):
                counts = [
                    f"{folder} {len(list((output / split / folder).glob('synthetic_*.png')))}"
                    for folder in SYNTHETIC_FOLDERS.values()
                ]
                print(f"  {split}: {', '.join(counts)}")
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
