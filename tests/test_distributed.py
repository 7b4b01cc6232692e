"""train_vit.py as two processes (torchrun, gloo on CPU): both train one model, the data is prepared once, one
writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from PIL import Image

from benchmarks.common import free_port
from cxr.run_record import read_metrics
from helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with the gloo backend is not available",
    ),
]


def train_as_two_processes(workdir: Path, options: list[str]) -> str:
    """train_vit.py with `options` as 2 torchrun processes of one thread each in `workdir`; its log, once it passed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "train_vit.py"),
        *options,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def test_two_processes_train_one_model_that_one_process_writes(tiny_model_dir, tmp_path):
    """The recipe of the `tiny_model_dir` fixture (batch 16, one process), run as 2 processes x 8 images per step."""
    log = train_as_two_processes(tmp_path, [*tiny_run(per_device_train_batch_size="8"), "--output_dir", "model"])

    # Both processes trained, each on 8 of every step's 16 images; the data was prepared and the folder written once.
    assert "Process 1 of 2 (cpu" in log and "Process 2 of 2 (cpu" in log, log[-4000:]
    assert "8 of each step's 16 images" in log
    assert log.count("Prepared data set in") == 1
    assert log.count("Model folder:") == 1
    output = tmp_path / "model"
    state = json.loads(
        (max(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) / "trainer_state.json").read_text()
    )
    reference_state = json.loads(
        (
            max(tiny_model_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) / "trainer_state.json"
        ).read_text()
    )
    assert state["train_batch_size"] == 8
    # 2 x 8 per step: as many steps as one process with 16
    assert state["global_step"] == reference_state["global_step"]
    assert not list(output.glob("*.bin"))

    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(output))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90), dtype=np.uint8)).convert("RGB")
    assert len(classifier(image, top_k=3)) == 3

    # The same figures as one process, within noise (the two differ in data order and in how the loss is averaged).
    summary, reference = (read_metrics(folder) for folder in (output, tiny_model_dir))
    assert summary["data"]["counts"] == reference["data"]["counts"]
    for split in ("validation", "test"):
        assert summary[split]["loss"] == pytest.approx(reference[split]["loss"], abs=0.1), split
        assert summary[split]["accuracy"] == pytest.approx(reference[split]["accuracy"], abs=0.25), split


def test_two_processes_learn_from_a_teacher(tiny_model_dir, tmp_path):
    """--teacher with several processes: only the process that prepared the data knows its split sizes, so it checks
    the teacher for all, and every process distils from it."""
    options = tiny_run(per_device_train_batch_size="8", num_train_epochs="1")
    log = train_as_two_processes(
        tmp_path, [*options, "--teacher", str(tiny_model_dir), "--distillation", "soft", "--output_dir", "student"]
    )
    assert log.count("Model folder:") == 1
    assert read_metrics(tmp_path / "student")["model_origin"]["teacher"] == str(tiny_model_dir)
