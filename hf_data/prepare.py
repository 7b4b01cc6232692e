"""Turn a user's folder of chest X-rays into the imagefolder tree the trainer loads.

    SOURCE (Kaggle download, or folders already split by class)
      -> find the class folders (layout detected automatically)
      -> read each file's class and patient id (Kaggle file names, else the folder and the file stem)
      -> test-decode every file with `cxr.images.load_image`; skip and report what cannot be used
      -> carve a validation split from train, grouped by patient and stratified by class
      -> OUTPUT/{train,validation,test}/{bacterial_pneumonia,normal,viral_pneumonia}/<file>
         (symlinks to the user's files, or copies) + manifest.csv + skipped.csv

`datasets.load_dataset("imagefolder", data_dir=OUTPUT)` reads that tree; `load_prepared` does so with
the label ids fixed to `CLASS_NAMES`. The user's files are only ever read, never moved or changed.

`datasets` and scikit-learn are imported inside the functions that use them: they take seconds to
import, and the CLI's `--help` or an app that only wants `CLASS_NAMES` should not wait for them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cxr.folders import replaced_file, write_text_atomic
from cxr.images import ImageLoadError, load_image
from cxr.labels import CLASS_NAMES

OUTPUT_SPLITS = ("train", "validation", "test")

MANIFEST_NAME = "manifest.csv"  # not "metadata.csv", which imagefolder would read as per-image metadata
SKIPPED_NAME = "skipped.csv"
SETTINGS_NAME = "prepared.json"  # the source and split settings the tree was made with
MANIFEST_COLUMNS = ["file", "source", "class", "patient_id", "split"]
SKIPPED_COLUMNS = ["source", "reason"]

# Source folder names, compared after lower-casing and turning "-" and " " into "_".
SOURCE_SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
PNEUMONIA = "pneumonia"  # Kaggle's PNEUMONIA folder: the subtype is only in the file name
CLASS_FOLDERS = {
    "normal": "normal",
    "bacteria": "bacterial_pneumonia",
    "bacterial": "bacterial_pneumonia",
    "bacterial_pneumonia": "bacterial_pneumonia",
    "virus": "viral_pneumonia",
    "viral": "viral_pneumonia",
    "viral_pneumonia": "viral_pneumonia",
    "pneumonia": PNEUMONIA,
}

# Words in a file name that name its class: Kaggle's "person1000_bacteria_2931", "NORMAL2-IM-0383-0001".
CLASS_WORD = re.compile(r"(?<![a-z])(bacteria|bacterial|virus|viral|normal)(?![a-z])", re.IGNORECASE)
CLASS_OF_WORD = {
    "bacteria": "bacterial_pneumonia",
    "bacterial": "bacterial_pneumonia",
    "virus": "viral_pneumonia",
    "viral": "viral_pneumonia",
    "normal": "normal",
}
# Patient ids: "IM-0115-0001" -> "0115", "NORMAL2-IM-0383-0001" -> "NORMAL2-0383",
# "person1000_virus_1681" and "synthetic_person0007_2" -> "1000" and "0007".
KAGGLE_NORMAL_NAME = re.compile(r"^(?:(NORMAL2)-)?IM-(\d+)-", re.IGNORECASE)
PERSON_NAME = re.compile(r"person(\d+)", re.IGNORECASE)

# The user may point at the folder holding chest_xray/, or at a folder holding just one folder.
MAX_FOLDERS_TO_DESCEND = 3

EXPECTED_LAYOUTS = (
    "Expected either the Kaggle download (chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/) "
    "or class folders ({train,test}/{bacteria,normal,viral}/, or bacteria/, normal/, viral/ directly inside it)."
)


@dataclass
class PrepareReport:
    """What `prepare_dataset` wrote: image counts per split and class, and every file it left out."""

    output_dir: Path
    counts: dict[str, dict[str, int]]  # split -> class -> number of images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source file path, reason)

    def summary(self, max_skipped_listed: int = 20) -> str:
        """A table of the counts, then the skipped files, for printing."""
        header = ["split", *CLASS_NAMES, "total"]
        rows = [
            [split, *(self.counts[split][name] for name in CLASS_NAMES), sum(self.counts[split].values())]
            for split in self.counts
        ]
        rows.append(
            [
                "total",
                *(sum(self.counts[split][name] for split in self.counts) for name in CLASS_NAMES),
                sum(sum(per_class.values()) for per_class in self.counts.values()),
            ]
        )
        widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
        lines = [f"Prepared data set in {self.output_dir}", ""]
        for row in [header, *rows]:
            cells = [str(row[0]).ljust(widths[0])] + [
                str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells))
        lines.append("")
        if not self.skipped:
            lines.append("No files skipped.")
            return "\n".join(lines)
        lines.append(
            f"Skipped {len(self.skipped)} file(s) or folder(s) (all listed in {self.output_dir / SKIPPED_NAME}):"
        )
        for path, reason in self.skipped[:max_skipped_listed]:
            lines.append(f"  {path}: {reason}")
        if len(self.skipped) > max_skipped_listed:
            lines.append(f"  ... and {len(self.skipped) - max_skipped_listed} more")
        return "\n".join(lines)


@dataclass
class SourceImage:
    path: Path  # absolute path of the user's file
    source_split: str  # "train", "val" or "test", as the source folders say
    class_name: str
    patient_id: str


def prepare_dataset(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    validation_fraction: float = 0.1,
    seed: int = 42,
    keep_kaggle_val: bool = False,
    copy: bool = False,
) -> PrepareReport:
    """Write the imagefolder tree for the X-rays under `source_dir` into `output_dir`.

    The validation split is about `validation_fraction` of the training images, chosen by patient
    (deterministic for `seed`). A source `val/` folder (Kaggle's has 16 images) is folded into train,
    unless `keep_kaggle_val` keeps it as the validation split. Images are symlinked (absolute targets),
    or copied when `copy` is true. Re-running updates a tree an earlier run wrote, touching only entries that
    changed (each replaced atomically), so a run training from the tree is not disturbed; any other non-empty
    `output_dir` is refused.
    """
    source = Path(source_dir).expanduser().resolve()
    output = Path(output_dir).expanduser().resolve()
    if not source.is_dir():
        raise ValueError(f"Source folder {source} does not exist or is not a folder.")
    if output == source or output.is_relative_to(source) or source.is_relative_to(output):
        raise ValueError(f"The output folder {output} must be outside the source folder {source} (and not contain it).")
    if not 0 < validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5], got {validation_fraction}.")
    # refuses a folder we did not write, before any work
    previous_output_files = files_written_by_previous_prepare(output)
    images, skipped = find_labelled_images(source)
    splits = assign_splits(images, validation_fraction, seed, keep_kaggle_val)
    rows = plan_output_files(images, splits)
    # replaced, not deleted first
    planned = {output / row["file"] for row in rows} | {
        output / MANIFEST_NAME,
        output / SKIPPED_NAME,
        output / SETTINGS_NAME,
    }
    for path in previous_output_files:
        if path not in planned:
            path.unlink(missing_ok=True)
    remove_empty_split_folders(output)
    write_csv(output / MANIFEST_NAME, MANIFEST_COLUMNS, rows)  # first, so even an interrupted run is recognised as ours
    write_csv(output / SKIPPED_NAME, SKIPPED_COLUMNS, [{"source": path, "reason": reason} for path, reason in skipped])
    settings = {
        "source": str(source),
        "validation_fraction": validation_fraction,
        "seed": seed,
        "keep_kaggle_val": keep_kaggle_val,
        "copy": copy,
        "images": len(rows),
    }
    write_text_atomic(output / SETTINGS_NAME, json.dumps(settings, indent=2))
    for row in rows:
        destination = output / row["file"]
        if not copy and destination.is_symlink() and os.readlink(destination) == row["source"]:
            continue  # already there: a re-run leaves the tree as it was, so a training run reading it is not disturbed
        destination.parent.mkdir(parents=True, exist_ok=True)
        staged = destination.with_name(f".{destination.name}.partial")
        staged.unlink(missing_ok=True)
        if copy:
            shutil.copyfile(row["source"], staged)
        else:
            os.symlink(row["source"], staged)
        os.replace(staged, destination)  # atomic: a reader sees the old entry or the new one, never none

    counts = {split: dict.fromkeys(CLASS_NAMES, 0) for split in OUTPUT_SPLITS if split in splits}
    for image, split in zip(images, splits, strict=True):
        counts[split][image.class_name] += 1
    return PrepareReport(output_dir=output, counts=counts, skipped=skipped)


def find_labelled_images(source_dir: str | os.PathLike) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """Every usable X-ray under `source_dir` (either layout), with its class and patient id, and the files left out
    with the reason: `prepare_dataset` splits these, and a site's check and recalibration (`calibrate.py --site_dir`,
    `site_check.py`) read them as they are. Raises ValueError where there is no usable image."""
    source = Path(source_dir).expanduser().resolve()
    if not source.is_dir():
        raise ValueError(f"Source folder {source} does not exist or is not a folder.")
    class_folders, skipped = find_class_folders(source)
    candidates = []
    for folder, source_split, folder_class in class_folders:
        files, skipped_here = list_files(folder)
        candidates += [(path, source_split, folder_class) for path in files]
        skipped += skipped_here

    images = []
    for path, source_split, folder_class in tqdm(candidates, desc="Checking images", unit="image"):
        class_name, reason = read_class(path.name, folder_class)
        if class_name is None:
            skipped.append((str(path), reason))
            continue
        if path.suffix.lower() not in imagefolder_extensions():
            skipped.append((str(path), f"'{path.suffix or path.name}' is not an image file type imagefolder reads"))
            continue
        try:
            load_image(path, draft_size=64)
        except ImageLoadError as error:
            skipped.append((str(path), str(error)))
            continue
        except OSError as error:  # e.g. no permission to read it
            skipped.append((str(path), f"cannot be read ({error.strerror or error})"))
            continue
        images.append(SourceImage(path, source_split, class_name, read_patient_id(path.name)))
    if not images:
        raise ValueError(
            f"No usable images found in {source}. {EXPECTED_LAYOUTS}"
            + (f" {len(skipped)} file(s) were skipped, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else "")
        )
    return images, skipped


def load_prepared(output_dir: str | os.PathLike):
    """Load a tree written by `prepare_dataset` as a `datasets.DatasetDict` of `image` and `label` columns.

    Splits: train, validation, and test where the source had one. The label is a `ClassLabel` whose
    names are `CLASS_NAMES`, so the ids are 0, 1, 2 in that order even when a class has no images.
    The image column is not decoded by `datasets` (`Image(decode=False)`: each row holds the file's path):
    every consumer decodes with `cxr.images.load_image`, the project's one image path.
    """
    import datasets

    output = Path(output_dir).expanduser().resolve()
    if read_manifest(output / MANIFEST_NAME) is None:
        raise ValueError(
            f"{output} is not a prepared data set (no {MANIFEST_NAME}); run `python -m hf_data prepare` first."
        )
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    return datasets.load_dataset("imagefolder", data_dir=str(output), features=features, drop_labels=False)


def find_class_folders(source: Path) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """Find (class folder, source split, folder class) in either layout, and report what is ignored."""
    root = source
    for _ in range(MAX_FOLDERS_TO_DESCEND):
        subfolders = visible_subfolders(root)
        if any(
            folder_key(folder) in SOURCE_SPLIT_FOLDERS or folder_key(folder) in CLASS_FOLDERS for folder in subfolders
        ):
            break
        chest_xray = [folder for folder in subfolders if folder_key(folder) == "chest_xray"]
        only_child = chest_xray or (subfolders if len(subfolders) == 1 else [])
        if len(only_child) != 1:
            break
        root = only_child[0]

    subfolders = visible_subfolders(root)
    split_folders = [folder for folder in subfolders if folder_key(folder) in SOURCE_SPLIT_FOLDERS]
    top_class_folders = [folder for folder in subfolders if folder_key(folder) in CLASS_FOLDERS]
    if split_folders and top_class_folders:
        raise ValueError(
            f"{root} holds both split folders ({', '.join(f.name for f in split_folders)}) and class folders "
            f"({', '.join(f.name for f in top_class_folders)}); put the class folders inside the split folders."
        )
    if not split_folders and not top_class_folders:
        raise ValueError(f"No usable images found in {source}: no split or class folders. {EXPECTED_LAYOUTS}")

    skipped = skipped_entries_beside(root, expected=split_folders or top_class_folders)
    if top_class_folders:
        return [(folder, "train", CLASS_FOLDERS[folder_key(folder)]) for folder in top_class_folders], skipped
    class_folders = []
    for split_folder in split_folders:
        in_split = [folder for folder in visible_subfolders(split_folder) if folder_key(folder) in CLASS_FOLDERS]
        skipped += skipped_entries_beside(split_folder, expected=in_split)
        source_split = SOURCE_SPLIT_FOLDERS[folder_key(split_folder)]
        class_folders += [(folder, source_split, CLASS_FOLDERS[folder_key(folder)]) for folder in in_split]
    return class_folders, skipped


def folder_key(folder: Path) -> str:
    return folder.name.lower().replace("-", "_").replace(" ", "_")


def visible_subfolders(folder: Path) -> list[Path]:
    """Subfolders that are neither hidden nor symlinks (a symlinked folder could loop back on itself)."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if not entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink()
    )


def skipped_entries_beside(folder: Path, expected: list[Path]) -> list[tuple[str, str]]:
    """Report the folders beside the `expected` subfolders, and any image lying loose among them."""
    skipped = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry in expected:
            continue
        if entry.is_symlink() and entry.is_dir():
            skipped.append((str(entry), "symlinked folder, not followed"))
        elif entry.is_dir():
            skipped.append((str(entry), "folder name is not a split or class this tool knows; ignored"))
        elif entry.suffix.lower() in imagefolder_extensions():  # a README or a zip beside the folders is no loss
            skipped.append((str(entry), "image not inside a class folder"))
    return skipped


def imagefolder_extensions() -> list[str]:
    """The file name extensions (lower case, with the dot) that imagefolder loads as images."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return ImageFolder.EXTENSIONS


def list_files(class_folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """All visible files under `class_folder`, without following symlinked folders."""
    files, skipped = [], []
    for folder, subfolders, file_names in os.walk(class_folder, followlinks=False):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in list(subfolders):
            if Path(folder, name).is_symlink():
                skipped.append((str(Path(folder, name)), "symlinked folder, not followed"))
                subfolders.remove(name)
        files += [Path(folder, name) for name in sorted(file_names) if not name.startswith(".")]
    return files, skipped


def read_class(file_name: str, folder_class: str) -> tuple[str | None, str]:
    """The class of a file from its folder and name, or (None, why not). Folder and name must agree."""
    named = {CLASS_OF_WORD[word.lower()] for word in CLASS_WORD.findall(Path(file_name).stem)}
    if len(named) > 1:
        return None, f"file name names more than one class ({', '.join(sorted(named))})"
    if folder_class == PNEUMONIA:
        if named <= {"normal"}:
            return None, "in a PNEUMONIA folder but the file name does not say bacteria or virus"
        return named.pop(), ""
    if named and named != {folder_class}:
        return None, f"folder says {folder_class} but the file name says {named.pop()}"
    return folder_class, ""


def read_patient_id(file_name: str) -> str:
    """The patient id in Kaggle's and the synthetic set's file names; otherwise each file is its own patient."""
    if match := KAGGLE_NORMAL_NAME.match(file_name):
        return f"{match[1]}-{match[2]}" if match[1] else match[2]
    if match := PERSON_NAME.search(file_name):
        return match[1]
    return Path(file_name).stem


def assign_splits(images: list[SourceImage], validation_fraction: float, seed: int, keep_kaggle_val: bool) -> list[str]:
    """The output split of each image: test stays test; validation is the source's val/ or carved from train."""
    if keep_kaggle_val:
        if not any(image.source_split == "val" for image in images):
            raise ValueError("keep_kaggle_val was asked for, but the source has no usable images in a val/ folder.")
        return [{"train": "train", "val": "validation", "test": "test"}[image.source_split] for image in images]

    splits = ["test" if image.source_split == "test" else "train" for image in images]
    train_indices = [index for index, split in enumerate(splits) if split == "train"]
    for index in carve_validation([images[i] for i in train_indices], validation_fraction, seed):
        splits[train_indices[index]] = "validation"
    return splits


def carve_validation(images: list[SourceImage], validation_fraction: float, seed: int) -> list[int]:
    """Indices of about `validation_fraction` of `images`: whole patients, each class in proportion."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = round(1 / validation_fraction)
    patients = [image.patient_id for image in images]
    if len(set(patients)) < n_splits:
        raise ValueError(
            f"Only {len(set(patients))} patient(s) in the training images; a validation fraction of "
            f"{validation_fraction} needs at least {n_splits}."
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    classes = [image.class_name for image in images]
    _, validation_indices = next(folds.split(images, classes, groups=patients))
    return sorted(validation_indices.tolist())


def plan_output_files(images: list[SourceImage], splits: list[str]) -> list[dict[str, str]]:
    """One manifest row per image, with a file name unique within its class folder."""
    rows, taken = [], set()
    for image, split in sorted(
        zip(images, splits, strict=True), key=lambda pair: (pair[1], pair[0].class_name, str(pair[0].path))
    ):
        relative = f"{split}/{image.class_name}/{image.path.name}"
        number = 2
        while relative in taken:  # e.g. the same name in the source's train/ and val/
            relative = f"{split}/{image.class_name}/{image.path.stem}_{number}{image.path.suffix}"
            number += 1
        taken.add(relative)
        rows.append(
            {
                "file": relative,
                "source": str(image.path),
                "class": image.class_name,
                "patient_id": image.patient_id,
                "split": split,
            }
        )
    return rows


def write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    """Written under a temporary name and renamed: a crash or a full disk never leaves a manifest cut short."""
    with replaced_file(path, newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: Path) -> list[dict[str, str]] | None:
    """The rows of a manifest `prepare_dataset` wrote, or None if `path` is not one."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if reader.fieldnames != MANIFEST_COLUMNS:
                return None
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def read_damaged_manifest(path: Path) -> list[dict[str, str]] | None:
    """The whole rows of a manifest that was cut short (an older version wrote it in place; a crash, a full disk or a
    copy stopped midway): empty, or its header or last row incomplete. None if it is whole, or not a manifest at all."""
    try:
        text = path.read_bytes().decode("utf-8", errors="ignore")
    except OSError:
        return None
    header = ",".join(MANIFEST_COLUMNS)
    if not text.startswith(header):
        return [] if header.startswith(text.rstrip("\r\n")) else None  # empty, or cut inside the header
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    whole = [row for row in (rows if text.endswith("\n") else rows[:-1]) if None not in row.values()]
    # a cut at a row's end shows only in the count
    listed = (prepared_settings(path.parent) or {}).get("images", len(rows))
    return whole if len(whole) != len(rows) or listed != len(rows) else None


def prepared_settings(output: str | os.PathLike) -> dict | None:
    """The settings a prepared tree was made with (source, validation_fraction, seed, keep_kaggle_val, copy; and its
    number of images), or None."""
    try:
        return json.loads((Path(output) / SETTINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def files_written_by_previous_prepare(output: Path) -> list[Path]:
    """The files an earlier run wrote into `output` (its manifest last), so they can be replaced.

    Raises ValueError unless `output` is missing, empty, or holds nothing but what its manifest
    lists: a folder this tool did not write is never deleted from.
    """
    if not output.exists():
        return []
    if not output.is_dir():
        raise ValueError(f"The output {output} exists and is not a folder.")
    if not any(output.iterdir()):
        return []
    rows = read_manifest(output / MANIFEST_NAME)
    damaged = read_damaged_manifest(output / MANIFEST_NAME)
    if damaged is not None:
        rows = damaged
    elif rows is None:
        raise ValueError(
            f"The output folder {output} is not empty and was not written by `prepare` (no {MANIFEST_NAME}); "
            "refusing to overwrite it. Choose a new or empty folder."
        )
    ours = {output / MANIFEST_NAME, output / SKIPPED_NAME, output / SETTINGS_NAME}
    for row in rows:
        path = output / row["file"]
        parts = Path(row["file"]).parts
        if len(parts) != 3 or parts[0] not in OUTPUT_SPLITS or parts[1] not in CLASS_NAMES:
            raise ValueError(
                f"{output / MANIFEST_NAME} lists '{row['file']}', which prepare never writes; refusing to delete it."
            )
        ours.add(path)
    foreign = []
    for folder, subfolders, file_names in os.walk(output, followlinks=False):
        for name in subfolders:
            if Path(folder, name).is_symlink():
                foreign.append(Path(folder, name))
        for name in file_names:
            path = Path(folder, name)
            if name.startswith(".") and name.endswith(".partial"):
                ours.add(path)  # staged by a run interrupted mid-write; removed below
            elif damaged is not None and path.is_symlink() and is_tree_entry(output, path):
                ours.add(path)  # a link where prepare puts its links, beside a manifest cut short: rebuilt
            elif path not in ours:
                foreign.append(path)
    if foreign and damaged is not None:
        raise ValueError(
            f"{output / MANIFEST_NAME} was cut short (a crash or a full disk while it was written), and {output} holds "
            f"{len(foreign)} file(s) it does not list ({', '.join(str(path) for path in foreign[:5])}), so `prepare` "
            f"cannot tell which are its own. If {output} is only a prepared tree (links or copies of your images), "
            "delete it and run again; otherwise choose another folder."
        )
    if foreign:
        listed = ", ".join(str(path) for path in foreign[:5])
        raise ValueError(
            f"The output folder {output} holds {len(foreign)} file(s) that `prepare` did not write ({listed}); "
            "refusing to replace it. Move them away or choose another folder."
        )
    # manifest last: an interrupted clean-up stays ours
    return sorted(ours - {output / MANIFEST_NAME}) + [output / MANIFEST_NAME]


def is_tree_entry(output: Path, path: Path) -> bool:
    """Whether `path` lies where prepare writes an image: OUTPUT/<split>/<class>/<file>."""
    parts = path.relative_to(output).parts
    return len(parts) == 3 and parts[0] in OUTPUT_SPLITS and parts[1] in CLASS_NAMES


def remove_empty_split_folders(output: Path) -> None:
    """Remove the split and class folders an earlier run left empty (only those: never anything else)."""
    for split in OUTPUT_SPLITS:
        for class_name in CLASS_NAMES:
            if (output / split / class_name).is_dir() and not any((output / split / class_name).iterdir()):
                (output / split / class_name).rmdir()
        if (output / split).is_dir() and not any((output / split).iterdir()):
            (output / split).rmdir()
