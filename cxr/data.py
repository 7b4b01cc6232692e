"""The data of a training run, shared by `train_vit.py` and `pretrain_mae.py`: the options that say where the X-rays
are, and the step that turns the user's folder into the prepared imagefolder tree (`hf_data`) and loads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from transformers import TrainingArguments

from hf_data import PrepareReport, load_prepared, make_synthetic_dataset, prepare_dataset


@dataclass
class DataArguments:
    data_dir: str = field(
        metadata={
            "help": "Your chest X-ray folder: the Kaggle download (chest_xray/ with train/, val/, test/ and NORMAL/, "
            "PNEUMONIA/ inside) or folders split by class ({train,test}/{bacteria,normal,viral}/). "
            "'synthetic' generates a small stand-in data set (not X-rays) so everything runs offline."
        }
    )
    prepared_dir: str | None = field(
        default=None,
        metadata={"help": "Where to write the imagefolder tree (links to your files, never moves them). Default: data/prepared/<name of data_dir>."},
    )
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of the training patients held out for validation (grouped by patient, stratified by class)."})
    split_seed: int = field(
        default=42,
        metadata={"help": "Random seed of the validation split. Kept apart from --seed, so runs with different seeds are scored on the same children."},
    )
    synthetic_images_per_class: int = field(default=200, metadata={"help": "Images per class generated for --data_dir synthetic."})
    keep_kaggle_val: bool = field(default=False, metadata={"help": "Use Kaggle's 16-image val/ as the validation split instead of folding it into train."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many images (quick experiments)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many images (quick experiments)."})

    @property
    def synthetic(self) -> bool:
        return self.data_dir == "synthetic"

    @property
    def source(self) -> Path:
        return Path("data/synthetic").resolve() if self.synthetic else Path(self.data_dir).expanduser()


def prepare_and_load(data_args: DataArguments, training_args: TrainingArguments):
    """Prepare the imagefolder tree of links for `data_args.source` and load it: (DatasetDict, PrepareReport or None).

    Train and validation are split by patient, with `split_seed` (not the training seed, so every run on a folder
    is scored on the same children). With several processes, the one that saves (per node with --save_on_each_node,
    for disks that are not shared) prepares while the others wait; only it gets the report. A file lock makes two
    runs started at once on one data folder (a sweep, a comparison) take turns, instead of one reading the tree
    while the other rewrites it.
    """
    prepared_dir = Path(data_args.prepared_dir or Path("data/prepared") / data_args.source.resolve().name)
    report: PrepareReport | None = None
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="data preparation"), FileLock(f"{prepared_dir}.lock"):
        if training_args.should_save:
            if data_args.synthetic:
                make_synthetic_dataset(data_args.source, images_per_class=data_args.synthetic_images_per_class)
            report = prepare_dataset(
                data_args.source, prepared_dir,
                validation_fraction=data_args.validation_fraction, seed=data_args.split_seed, keep_kaggle_val=data_args.keep_kaggle_val,
            )
            print(report.summary())
        dataset = load_prepared(prepared_dir)  # image paths, decoded by the project's one loader (cxr.images.load_image)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=training_args.seed).select(range(limit))
    return dataset, report
