"""The pieces `train_vit.py` (and `pretrain_mae.py`) hand to `Trainer` besides `cxr.transforms`: the class-weighted
loss, `XrayTrainer` (a `Trainer` composed of the checkpoint-reload fix, weight averaging and distillation), two
checks on the run itself (a writable output folder up front, peak memory at the end), and the allocator setting that
lets each step reuse the last one's memory."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from cxr.averaging import TRAINING_WEIGHTS, WeightAveraging  # noqa: F401 (TRAINING_WEIGHTS: where checkpoints keep the trained weights)
from cxr.distillation import Distillation
from cxr.mixup import Mixup
from cxr.workarounds import CheckpointReloadFix


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1), so the rarer normal and viral classes count as much as bacterial."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def weighted_loss(weights: torch.Tensor, label_smoothing: float = 0.0):
    """A `compute_loss_func` for `Trainer`: cross-entropy with per-class weights, averaged over the images of a step.
    `labels` are class indices, or class probabilities per image (mixed batches, `cxr.mixup`)."""

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        total = F.cross_entropy(
            logits, labels, weight=weights.to(logits.device), label_smoothing=label_smoothing, reduction="sum"
        )
        # Given a compute_loss_func, Trainer leaves the division to it and passes the number of images in the whole
        # (gradient-accumulated) step: summing per micro-batch and dividing by that total makes 2 x 16 images with
        # --gradient_accumulation_steps 2 the same step as 32 at once. Evaluation passes no count: average the batch.
        return total / (num_items_in_batch if num_items_in_batch is not None else len(labels))

    return compute_loss


class XrayTrainer(WeightAveraging, Mixup, Distillation, CheckpointReloadFix, Trainer):
    """`Trainer` with checkpoint reloads that restore every weight (`cxr.workarounds`), optional weight averaging
    (`cxr.averaging`, `weight_average_decay`), optional mixup (`cxr.mixup`, `mixup_alpha`: before distillation, so
    the teacher sees the blend too) and optional distillation from a teacher (`cxr.distillation`, `teacher`,
    `distillation_weight`)."""


def check_writable(output_dir: Path) -> None:
    """Exit with a clear message unless `output_dir` can be created and a file written in it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-") as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise SystemExit(
            f"Cannot write the model folder {output_dir}: {error.strerror or error}. Choose a writable --output_dir."
        ) from None


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Keep the memory freed tensors release in this process's heap instead of returning it to the system.

    glibc maps a large allocation (an activation, a gradient) afresh and unmaps it when freed, or trims the heap
    under it, so every training step faults its activations' pages in again: tens of thousands of page faults a step,
    each an entry into the kernel while the cores wait (`python -m benchmarks.train_speed --release_memory` shows the
    step that way). Kept, a step reuses the pages the last one freed, and the process holds on to its peak memory.
    Returns whether glibc took the setting (False on macOS, Windows and musl, which allocate otherwise)."""
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def find_checkpoints(output_dir: Path) -> tuple[list[Path], list[Path]]:
    """The checkpoint folders in `output_dir`, oldest first: (complete, incomplete). Trainer writes trainer_state.json
    last, so a checkpoint without a readable one was cut short (the run was killed or the disk filled while saving)."""
    complete, incomplete = [], []
    folders = [path for path in output_dir.glob("checkpoint-*") if path.is_dir() and path.name.split("-")[1].isdigit()]
    for folder in sorted(folders, key=lambda path: int(path.name.split("-")[1])):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete.append(folder)
        except (OSError, ValueError):
            incomplete.append(folder)
    return complete, incomplete


def checkpoint_to_resume(output_dir: Path, resume: bool, overwrite: bool, should_save: bool) -> str | None:
    """The checkpoint a run continues from: the newest complete one with `resume` (none is a clear error), else None.

    Nothing the user made is deleted unasked: a run that is neither resuming nor told to overwrite stops before any
    work when `output_dir` holds checkpoints or a trained model. With `resume`, the saving process removes the
    checkpoints an interrupted save left incomplete; with `overwrite`, all old checkpoints (the old model itself is
    replaced only when the new one is complete: train_vit.py swaps the finished folder in)."""
    complete, incomplete = find_checkpoints(output_dir)
    if resume and not complete:
        cut_short = f" (only {len(incomplete)} cut short while saving)" if incomplete else ""
        raise SystemExit(f"--resume was given but {output_dir} holds no checkpoint to resume from{cut_short}.")
    if not resume and not overwrite and (complete or incomplete or (output_dir / "config.json").is_file()):
        found = f"{len(complete) + len(incomplete)} checkpoint(s)" if complete or incomplete else "a trained model"
        raise SystemExit(
            f"{output_dir} already holds {found} from an earlier run. Pass --resume to continue it, "
            "--overwrite_output_dir to start afresh (its checkpoints are deleted and its model replaced), "
            "or choose another --output_dir."
        )
    if should_save:
        for folder in incomplete:  # a run killed while saving leaves a checkpoint without its trainer_state.json
            print(f"Removing {folder}: an interrupted save left it incomplete.")
            shutil.rmtree(folder)
        if complete and not resume:
            print(f"Starting afresh (--overwrite_output_dir): removing the old checkpoints in {output_dir}.")
            for folder in complete:
                shutil.rmtree(folder)
    return str(complete[-1]) if resume else None
