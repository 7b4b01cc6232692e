"""Underfitting or overfitting? Each model's figures on the images it trained on (no augmentation) beside the same
figures on the validation split.

    python -m benchmarks.fit outputs/vit-xray outputs/resnet-xray --data_dir path/to/chest_xray

A model that scores no better on its own training images than on unseen ones is underfitting: it lacks training
(epochs, width, resolution), and more regularisation would not help. One that scores far better there is overfitting.
The images go through the evaluation path (`cxr.features.embed_split`: the project's loader and the model's own
image processor); the data is prepared with the same patient-grouped split as train_vit.py (`--split_seed`).

With `--average`, a last pair of rows scores the folders' probabilities averaged: whether an ensemble of them would
be the stronger teacher for `train_vit.py --teacher`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoModelForImageClassification

from cxr.features import embed_split
from cxr.metrics import classification_metrics, softmax
from cxr.run_record import warn_if_other_split
from hf_data.loading import load_model_data

FIGURES = [
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("f1_viral_pneumonia", "F1 viral"),
    ("pneumonia_accuracy", "pneumonia acc."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="Model folders written by train_vit.py on this data.")
    parser.add_argument(
        "--data_dir",
        required=True,
        help="The data the models were trained on (raw folder, prepared tree or 'synthetic').",
    )
    parser.add_argument(
        "--prepared_dir",
        default=None,
        help="Where to prepare a raw --data_dir. Default: data/prepared/<name of data_dir>.",
    )
    parser.add_argument("--split_seed", type=int, default=42, help="As given to train_vit.py (default 42).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass (default 64).")
    parser.add_argument(
        "--average",
        action="store_true",
        help="Also score the average of the folders' probabilities (an ensemble of them), on both splits.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.average and len(args.folders) < 2:
        parser.error("--average needs two or more model folders.")

    dataset = load_model_data(
        args.data_dir,
        args.prepared_dir,
        validation_fraction=0.1,
        split_seed=args.split_seed,
        synthetic_images_per_class=200,
    )
    class_keys = dataset["train"].features["label"].names
    rows = []
    probabilities = {"train": [], "validation": []}
    labels_of = {}
    for folder in args.folders:
        warn_if_other_split(folder, dataset)
        model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(folder)
        for split in ("train", "validation"):
            features, labels = embed_split(
                model, processor, dataset[split], batch_size=args.batch_size, desc=f"{folder.name}: {split}"
            )
            probabilities[split].append(softmax(features["logits"]))
            labels_of[split] = labels
            rows.append(figure_row(f"`{folder.name}`", split, labels, probabilities[split][-1], class_keys))
    if args.average:
        for split in ("train", "validation"):
            average = np.mean(probabilities[split], axis=0)
            rows.append(figure_row(f"average of the {len(args.folders)}", split, labels_of[split], average, class_keys))
    print("| model folder | split | " + " | ".join(title for _, title in FIGURES) + " |")
    print("|---|---|" + "---:|" * len(FIGURES))
    print("\n".join(rows))


def figure_row(name: str, split: str, labels, probabilities, class_keys) -> str:
    figures = classification_metrics(labels, probabilities, class_keys)
    return (
        f"| {name} | {split} ({len(labels)} images) | " + " | ".join(f"{figures[key]:.3f}" for key, _ in FIGURES) + " |"
    )


if __name__ == "__main__":
    main()
