"""The README's results table: one row per trained model folder, from the metrics.json that train_vit.py wrote.

    python -m benchmarks.results outputs/vit-xray outputs/resnet-xray
    python -m benchmarks.results outputs/vit-offline-seed*     # runs that differ only in --seed: also mean +- spread

Validation figures are on the patient-grouped validation split (never trained on; it also picked the checkpoint and
fitted the calibration temperature, so they flatter a little); a test split's figures are shown when the data had one.
Wall time is Trainer's train_runtime (training and the per-epoch evaluations); peak memory is the training process's
peak resident memory, recorded by train_vit.py (folders from before that recording show "-"). A model fine-tuned from
a pretrain_mae.py encoder shows both times, pretraining + fine-tuning. Folders whose runs differ only in --seed are
summarised together below the table: mean, standard deviation and range of each figure.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
from collections import defaultdict
from pathlib import Path

from cxr.run_record import read_metrics, training_argv

COLUMNS = [
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("f1_bacterial_pneumonia", "F1 bacterial"),
    ("f1_normal", "F1 normal"),
    ("f1_viral_pneumonia", "F1 viral"),
    ("pneumonia_accuracy", "pneumonia acc."),
    ("pneumonia_sensitivity", "sensitivity"),
    ("pneumonia_specificity", "specificity"),
    ("roc_auc_ovr", "ROC-AUC"),
    ("expected_calibration_error", "ECE"),
]


def recipe_of(folder: Path) -> str:
    """The options the run was started with, recipes expanded (less the data and output folders)."""
    argv = training_argv(folder, leave_out=("--data_dir", "--output_dir", "--prepared_dir", "--save_total_limit"))
    return "?" if argv is None else shlex.join(argv)


def wall_minutes(summary: dict) -> str:
    """Training time; for a model fine-tuned from a pretrain_mae.py encoder, pretraining + fine-tuning."""
    minutes = f"{summary['train']['train_runtime'] / 60:.0f} min"
    pretraining = Path(summary["model_origin"]["name"]) / "pretraining.json"
    if summary["model_origin"].get("pretrained") and pretraining.is_file():
        minutes = f"{json.loads(pretraining.read_text())['train']['train_runtime'] / 60:.0f} + {minutes}"
    return minutes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="Model folders written by train_vit.py.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print("| model folder | split | " + " | ".join(title for _, title in COLUMNS) + " | wall time | peak memory |")
    print("|---|---|" + "---:|" * (len(COLUMNS) + 2))
    summaries = {folder: read_metrics(folder) for folder in args.folders}
    for folder, summary in summaries.items():
        train = summary["train"]
        memory = f"{train['peak_memory_mib'] / 1024:.1f} GiB" if "peak_memory_mib" in train else "-"
        for split in ("validation", "test"):
            if split in summary:
                figures = " | ".join(f"{summary[split][key]:.3f}" for key, _ in COLUMNS)
                print(f"| `{folder.name}` | {split} | {figures} | {wall_minutes(summary)} | {memory} |")
    print()
    for folder, summary in summaries.items():
        print(
            f"- `{folder.name}`: {summary['model_origin']['description']}; epochs run {summary['train']['epoch']:g}; "
            f"options: `{recipe_of(folder)}`"
        )

    seeds = defaultdict(list)  # the same options but --seed (and --resume, which changes nothing) -> those folders
    for folder in args.folders:
        seeds[re.sub(r"--seed \S+ ?|--resume( [Tt]rue)? ?", "", recipe_of(folder)).strip()].append(folder)
    for options, folders in seeds.items():
        if len(folders) < 2 or options == "?":  # a folder whose options are unknown shares them with no other
            continue
        print(f"\nAcross {len(folders)} seeds of `{options}` (validation split; mean ± standard deviation, range):\n")
        validation = [summaries[folder]["validation"] for folder in folders]
        for key, title in COLUMNS:
            values = [figures[key] for figures in validation]
            print(
                f"- {title}: {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
                f"({min(values):.3f}-{max(values):.3f})"
            )


if __name__ == "__main__":
    main()
