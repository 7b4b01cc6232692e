"""What several test files share: the options of the tiny training run, folder checksums, and where a tiny run's
prepared data lies. Test files import from here (and from inputs.py), never from one another."""

import hashlib
import os
import stat
from pathlib import Path

from cxr.run_record import read_run

# The `tiny_model_dir` fixture's train_vit.py options (less --output_dir): the tiny synthetic run, seconds long, that
# most tests read and that tests/test_faults.py and tests/test_distributed.py repeat as their reference run.
TINY_RUN = [
    "--data_dir",
    "synthetic",
    "--synthetic_images_per_class",
    "40",
    "--model",
    "scratch-tiny",
    "--num_train_epochs",
    "2",
    "--learning_rate",
    "3e-3",
    "--per_device_train_batch_size",
    "16",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--precision",  # the same figures on every CPU: the hardware's choice is tested on its own (test_precision.py)
    "fp32",
]


def tiny_run(drop: tuple[str, ...] = (), **values: str) -> list[str]:
    """TINY_RUN without the options named in `drop` (train_vit.py's defaults then apply) and with `values` set:
    replaced in place where TINY_RUN has the option, appended where it has not. Names are written without `--`."""
    options, pairs = [], list(zip(TINY_RUN[::2], TINY_RUN[1::2], strict=True))
    for option, value in pairs:
        name = option.removeprefix("--")
        if name not in drop:
            options += [option, str(values.pop(name, value))]
    for name, value in values.items():
        options += [f"--{name}", str(value)]
    return options


def folder_checksums(folder: Path, follow_links: bool = False) -> dict[str, str]:
    """Every entry under `folder` by its path relative to it.

    follow_links=False: nothing is opened but regular files, so a named pipe or a link to /dev/zero cannot hang it:
    a file gives its sha256, a symlink where it points ("-> target"), anything else (a folder, a pipe) its mode.
    follow_links=True: every file reached, through links too, by the sha256 of its bytes (and nothing else).
    """
    folder = Path(folder)
    if follow_links:
        return {
            str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
    found = {}
    for parent, subfolders, files in os.walk(folder):
        for name in subfolders + files:
            path = Path(parent, name)
            mode = path.lstat().st_mode
            key = str(path.relative_to(folder))
            if stat.S_ISLNK(mode):
                found[key] = "-> " + os.readlink(path)
            elif stat.S_ISREG(mode):
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = stat.filemode(mode)
    return found


def prepared_data(model_dir: Path) -> Path:
    """The prepared (imagefolder) tree the run that wrote `model_dir` used: train_vit.py records it in run.json; an MAE
    encoder folder has none, and its tiny run prepares the synthetic set under its working folder."""
    recorded = read_run(model_dir).get("data", {}).get("prepared_dir")
    return Path(recorded) if recorded else Path(model_dir).parent / "data" / "prepared" / "synthetic"


def validation_images(model_dir: Path) -> list[Path]:
    """The validation split `model_dir` was calibrated on, as image files, sorted."""
    return sorted((prepared_data(model_dir) / "validation").rglob("*.png"))
