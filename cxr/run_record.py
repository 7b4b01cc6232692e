"""The record a model folder keeps of its run, as data: `run.json` (the command and every resolved option, as timm's
`args.yaml`) and `metrics.json` (every figure, written once by `train_vit.py`). Everything that reads either file
goes through `read_run` / `read_metrics` here."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import shlex
from pathlib import Path

from cxr.folders import write_text_atomic

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CHECKSUMS_FILE = "checksums.json"  # sha256 of every file a writer put in the folder, written last


def json_safe(value):
    """`value` with enums, paths and other objects as strings, so `json.dumps` takes it as it is."""
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def options_of(arguments) -> dict:
    """Every field of an arguments dataclass (`TrainingArguments` through its own `to_dict`, which hides tokens)."""
    if hasattr(arguments, "to_dict"):
        return json_safe(arguments.to_dict())
    return json_safe(
        {option.name: getattr(arguments, option.name) for option in dataclasses.fields(arguments) if option.init}
    )


def run_record(*, given: list[str], expanded: list[str], program: str = "train_vit.py", **sections) -> dict:
    """The content of run.json: the command as typed, the command with every --recipe expanded (what the card
    shows), and one section of resolved options per arguments dataclass (or plain dict) in `sections`."""
    return {
        "command": "python " + shlex.join([program, *given]),
        "expanded_command": "python " + shlex.join([program, *expanded]),
        "argv": list(given),
        "expanded_argv": list(expanded),
        **{name: part if isinstance(part, dict) else options_of(part) for name, part in sections.items()},
    }


def _write(path: Path, content: dict) -> Path:
    write_text_atomic(path, json.dumps(json_safe(content), indent=2))
    return path


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_run(folder: str | Path, record: dict) -> Path:
    return _write(Path(folder) / RUN_FILE, record)


def write_metrics(folder: str | Path, summary: dict) -> Path:
    return _write(Path(folder) / METRICS_FILE, summary)


def read_run(folder: str | Path) -> dict:
    """The folder's run.json; empty for a folder without one (a bare checkpoint, or a model from before the record)."""
    return _read(Path(folder).expanduser() / RUN_FILE)


def training_argv(folder: str | Path, leave_out: tuple[str, ...] = ()) -> list[str] | None:
    """The train_vit.py arguments a folder was made with, recipes expanded, less the options in `leave_out` (and their
    values); None when unknown. A folder trained before run.json existed has them only in its card's command line."""
    argv = read_run(folder).get("expanded_argv")
    card = Path(folder).expanduser() / "README.md"
    if argv is None and card.is_file():
        found = re.search(r"^- \*\*Command:\*\* `python train_vit\.py (.*)`$", card.read_text(), re.MULTILINE)
        argv = shlex.split(found.group(1)) if found else None
    if argv is None:
        return None
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in leave_out:
            skip = True
        else:
            kept.append(token)
    return kept


def read_metrics(folder: str | Path) -> dict:
    """The folder's metrics.json; empty for a folder without one."""
    return _read(Path(folder).expanduser() / METRICS_FILE)


def calibrated_parts(summary: dict, reliability: dict) -> dict:
    """The parts of metrics.json a reliability fit sets: its own summary, and each held-out split's figures with the
    calibration error of the calibrated model (the weights saved have the temperature folded in)."""
    splits = {
        split: {**summary[split], "expected_calibration_error": figures["ece_after"]}
        for split, figures in reliability["calibration"]["by_split"].items()
        if isinstance(summary.get(split), dict)
    }
    return {**reliability, **splits}


def update_metrics(folder: str | Path, **parts) -> dict:
    """Replace top-level parts of an existing folder's metrics.json (a refit on a finished folder), atomically."""
    summary = read_metrics(folder) | parts
    write_metrics(folder, summary)
    return summary


def split_sizes(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """{split: number of images} from {split: {class: number}}, the prepared tree's counts that metrics.json keeps."""
    return {split: sum(per_class.values()) for split, per_class in counts.items()}


def trained_split_sizes(model_dir: str | Path) -> dict[str, int]:
    """{split: number of images} of the prepared data a model folder was trained and evaluated on, from the counts in
    its metrics.json (before --max_train_samples / --max_eval_samples); empty when the folder has none."""
    return split_sizes(read_metrics(model_dir).get("data", {}).get("counts", {}))


def warn_if_other_split(model_dir: Path, dataset) -> None:
    """The temperature must be fitted on images the model did not train on: compare split sizes with metrics.json."""
    now = {split: len(dataset[split]) for split in dataset}
    before = trained_split_sizes(model_dir)
    if before and before != now:
        print(
            f"Warning: these splits ({now}) differ from the ones the model was trained with ({before}). "
            "If validation images were training images, the temperature and threshold are fitted on seen data: "
            "use the same data, --validation_fraction and --split_seed."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: str | Path) -> Path:
    """Record the sha256 of every file at the top of a finished model folder (before it is swapped in), so a reader
    can tell one version's files from a mix (a partial retrain, a hand copy): `check_checksums`."""
    folder = Path(folder)
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.name != CHECKSUMS_FILE)
    return _write(folder / CHECKSUMS_FILE, {path.name: _sha256(path) for path in files})


def check_checksums(folder: str | Path, names: tuple[str, ...] | None = None) -> list[str]:
    """The recorded files (of `names`, if given) that are missing or changed since `write_checksums`; empty when all
    agree or there is no record. Files added later (checkpoints, ONNX exports) are not the record's business."""
    folder = Path(folder).expanduser()
    recorded = _read(folder / CHECKSUMS_FILE)
    return [
        name
        for name, digest in recorded.items()
        if (names is None or name in names) and (not (folder / name).is_file() or _sha256(folder / name) != digest)
    ]
