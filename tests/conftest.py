"""Shared fixtures: a tiny trained model folder and the optional real data beside the checkout."""

import os
from pathlib import Path

import pytest

from helpers import tiny_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real Kermany X-rays, read-only); tests that need it skip where it is absent."""
    if not (SHARED_DATA / "chest_xray").is_dir():
        pytest.skip("real data not present (../shared/data beside the checkout)")
    return SHARED_DATA


def run_tiny_training(workdir: Path, model: str) -> Path:
    """Run train_vit.py for real with TINY_RUN's options and `model` (a preset or a folder) in `workdir`; return the
    model folder, `workdir/model`."""
    import train_vit

    output_dir = workdir / "model"
    previous = Path.cwd()
    os.chdir(workdir)  # synthetic and prepared data go under ./data of the run
    try:
        train_vit.main([*tiny_run(model=model), "--output_dir", str(output_dir)])
    finally:
        os.chdir(previous)
    return output_dir


@pytest.fixture(scope="session")
def train_tiny_model():
    """The tiny run as a function, `train_tiny_model(workdir, model) -> model folder`, for fixtures of other models."""
    return run_tiny_training


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model folder written by a real (tiny, seconds-long) train_vit.py run of the scratch-tiny ViT."""
    return run_tiny_training(tmp_path_factory.mktemp("tiny_run"), "scratch-tiny")


@pytest.fixture(scope="session")
def cnn_model_dir(tmp_path_factory) -> Path:
    """The same for the scratch-tiny-resnet preset (tests/test_cnn.py)."""
    return run_tiny_training(tmp_path_factory.mktemp("tiny_cnn_run"), "scratch-tiny-resnet")


@pytest.fixture(autouse=True)
def shared_model_folders_stay_as_trained(request):
    """predict.py's default runtime caches an ONNX graph in the model folder it reads: a test that runs it on a
    session's shared folder must not change the files the next test finds there."""
    shared = [
        request.getfixturevalue(name) for name in ("tiny_model_dir", "cnn_model_dir") if name in request.fixturenames
    ]
    yield
    for folder in shared:
        for graph in folder.glob("*.onnx"):
            graph.unlink()
