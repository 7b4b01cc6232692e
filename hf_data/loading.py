"""The data of a run, shared by `train_vit.py`, `pretrain_mae.py` and `calibrate.py`: the options that say where the
X-rays are, the step that turns the user's folder into the prepared imagefolder tree and loads it, the patient
ids of a loaded validation split, and a site's labelled X-rays read as they are (`load_site`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path

from filelock import FileLock
from transformers import TrainingArguments

from cxr.labels import CLASS_NAMES
from hf_data.prepare import (
    MANIFEST_NAME,
    PrepareReport,
    find_labelled_images,
    load_prepared,
    prepare_dataset,
    prepared_settings,
    read_patient_id,
)
from hf_data.synthetic import make_synthetic_dataset

try:
    import fcntl
except ImportError:  # Windows: no shared locks, so no check that another run is reading a tree
    fcntl = None


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
        metadata={
            "help": (
                "Where to write the imagefolder tree (links to your files, never moves them). Default: "
                "data/prepared/<name of data_dir>, with the split settings in the name where they are not the "
                "defaults (e.g. chest_xray-split7), so runs with different splits keep apart."
            )
        },
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the training patients held out for validation (grouped by patient, stratified by class)."
        },
    )
    split_seed: int = field(
        default=42,
        metadata={
            "help": (
                "Random seed of the validation split. Kept apart from --seed, so runs with different seeds are scored "
                "on the same children."
            )
        },
    )
    synthetic_images_per_class: int = field(
        default=200, metadata={"help": "Images per class generated for --data_dir synthetic."}
    )
    keep_kaggle_val: bool = field(
        default=False,
        metadata={"help": "Use Kaggle's 16-image val/ as the validation split instead of folding it into train."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many images (quick experiments)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many images (quick experiments)."}
    )

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
    prepared_dir = Path(
        data_args.prepared_dir
        or default_prepared_dir(
            data_args.source, data_args.validation_fraction, data_args.split_seed, data_args.keep_kaggle_val
        )
    )
    report: PrepareReport | None = None
    with (
        training_args.main_process_first(local=training_args.save_on_each_node, desc="data preparation"),
        FileLock(f"{prepared_dir}.lock"),
    ):
        in_use = None
        if training_args.should_save:
            if data_args.synthetic:
                make_synthetic_dataset(data_args.source, images_per_class=data_args.synthetic_images_per_class)
            in_use = claim_tree(prepared_dir, data_args)
            report = prepare_dataset(
                data_args.source,
                prepared_dir,
                validation_fraction=data_args.validation_fraction,
                seed=data_args.split_seed,
                keep_kaggle_val=data_args.keep_kaggle_val,
            )
            print(report.summary())
        # image paths, decoded by the project's one loader (cxr.images.load_image)
        dataset = load_prepared(prepared_dir)
        if in_use is not None:
            # shared while this run reads the tree: released when the data set is dropped
            fcntl.flock(in_use, fcntl.LOCK_SH)
            weakref.finalize(dataset, in_use.close)
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and limit < len(dataset[split]):
            dataset[split] = dataset[split].shuffle(seed=training_args.seed).select(range(limit))
    return dataset, report


def default_prepared_dir(source: Path, validation_fraction: float, split_seed: int, keep_kaggle_val: bool) -> Path:
    """data/prepared/<name of the source folder>, plus each split setting that is not the default (-split7, -val0.2,
    -kaggleval): runs that split one folder differently each get their own tree instead of rewriting a shared one."""
    defaults = {
        option.name: option.default
        for option in fields(DataArguments)
        if option.name in ("validation_fraction", "split_seed")
    }
    key = f"-split{split_seed}" if split_seed != defaults["split_seed"] else ""
    key += f"-val{validation_fraction:g}" if validation_fraction != defaults["validation_fraction"] else ""
    key += "-kaggleval" if keep_kaggle_val else ""
    return Path("data/prepared") / (Path(source).resolve().name + key)


def claim_tree(prepared_dir: Path, data_args: DataArguments):
    """The open `<prepared_dir>.in-use` lock file, once this run may prepare the tree (call under the preparation lock).

    Every run holds it shared while it reads the tree. A tree made with other split settings (an explicit
    --prepared_dir shared by two runs) is rewritten only when no run holds it: otherwise this run stops, before any
    work, instead of swapping the images under the other run's feet. None where the system has no shared locks."""
    if fcntl is None:
        return None
    in_use = open(f"{prepared_dir}.in-use", "a")
    settings = prepared_settings(prepared_dir)
    wanted = {
        "source": str(data_args.source.expanduser().resolve()),
        "validation_fraction": data_args.validation_fraction,
        "seed": data_args.split_seed,
        "keep_kaggle_val": data_args.keep_kaggle_val,
    }
    if settings is not None and {key: settings.get(key) for key in wanted} != wanted:
        try:
            fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            in_use.close()
            raise SystemExit(
                f"{prepared_dir} is in use by another run that split the data differently "
                f"({', '.join(f'{key} {settings.get(key)}' for key in wanted if settings.get(key) != wanted[key])}); "
                "rewriting it now would pull its images away. Give this run its own --prepared_dir (or leave it unset: "
                "the default folder is named after the split settings), or wait for the other run to finish."
            ) from None
    return in_use


def load_model_data(
    data_dir: str,
    prepared_dir: str | None,
    validation_fraction: float,
    split_seed: int,
    synthetic_images_per_class: int,
):
    """A prepared imagefolder tree as is, or a raw source (Kaggle / class folders / 'synthetic') prepared the way
    train_vit.py does."""
    path = Path(data_dir).expanduser()
    if (path / MANIFEST_NAME).is_file():
        prepared = path
    else:
        source = (
            make_synthetic_dataset(Path("data/synthetic"), images_per_class=synthetic_images_per_class)
            if data_dir == "synthetic"
            else path
        )
        prepared = Path(
            prepared_dir or default_prepared_dir(source, validation_fraction, split_seed, keep_kaggle_val=False)
        )
        print(prepare_dataset(source, prepared, validation_fraction=validation_fraction, seed=split_seed).summary())
    return load_prepared(prepared)


def validation_patient_ids(dataset) -> list[str]:
    """The patient id of every validation image, in order: the groups `cxr.reliability.fit_reliability` keeps
    together when it checks the prediction sets on children held out from the fit."""
    return [read_patient_id(Path(image["path"]).name) for image in dataset["validation"]["image"]]


@dataclass
class SiteImages:
    """A site's labelled X-rays, read as they are (no split, no prepared tree): `dataset` is a `datasets.Dataset` of
    undecoded `image` and `label` columns like a prepared split's, `patients` the patient id of each image."""

    source: Path
    dataset: object
    patients: list[str]
    skipped: list[tuple[str, str]]

    def images_per_class(self) -> dict[str, int]:
        labels = self.dataset["label"]
        return {name: labels.count(index) for index, name in enumerate(CLASS_NAMES)}


def load_site(site_dir: str | Path) -> SiteImages:
    """Every usable X-ray in a folder from another site (Kaggle layout or class folders; any split folders inside are
    read alike), with its class and patient id from the folder and file names, as `prepare_dataset` reads them."""
    import datasets

    images, skipped = find_labelled_images(site_dir)
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    columns = {
        "image": [str(image.path) for image in images],
        "label": [CLASS_NAMES.index(image.class_name) for image in images],
    }
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return SiteImages(Path(site_dir).expanduser().resolve(), dataset, [image.patient_id for image in images], skipped)
