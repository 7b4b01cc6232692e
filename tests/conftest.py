"""Shared fixtures: a tiny trained model folder and the optional real data beside the checkout."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real Kermany X-rays, read-only); tests that need it skip where it is absent."""
    if not (SHARED_DATA / "chest_xray").is_dir():
        pytest.skip("real data not present (../shared/data beside the checkout)")
    return SHARED_DATA


def train_tiny_model(workdir: Path, preset: str) -> Path:
    """Run train_vit.py for real (tiny, seconds long) on the synthetic data set with `preset`; return the model folder."""
    import train_vit

    output_dir = workdir / "model"
    previous = Path.cwd()
    os.chdir(workdir)  # synthetic and prepared data go under ./data of the run
    try:
        train_vit.main(
            [
                "--data_dir", "synthetic",
                "--synthetic_images_per_class", "40",
                "--model", preset,
                "--output_dir", str(output_dir),
                "--num_train_epochs", "2",
                "--learning_rate", "3e-3",
                "--per_device_train_batch_size", "16",
                "--disable_tqdm", "true",
                "--report_to", "none",
            ]
        )
    finally:
        os.chdir(previous)
    return output_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model folder written by a real (tiny, seconds-long) train_vit.py run of the scratch-tiny ViT."""
    return train_tiny_model(tmp_path_factory.mktemp("tiny_run"), "scratch-tiny")


@pytest.fixture(scope="session")
def cnn_model_dir(tmp_path_factory) -> Path:
    """The same for the scratch-tiny-resnet preset (tests/test_cnn.py)."""
    return train_tiny_model(tmp_path_factory.mktemp("tiny_cnn_run"), "scratch-tiny-resnet")
