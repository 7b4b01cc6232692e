"""The Hub: `--push_to_hub` publishes exactly the finished model folder (no network: huggingface_hub's calls are
recorded), and a checkpoint given by Hub id is fine-tuned offline from a Hugging Face cache."""

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects
from transformers import Trainer

import train_vit
from cxr.hub import model_folder_files, publish_model_folder

TINY = ["--synthetic_images_per_class", "40", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--disable_tqdm", "true", "--report_to", "none"]
MODEL_FOLDER = [
    "README.md", "config.json", "confusion_matrix_test.png", "confusion_matrix_validation.png", "metrics.json",
    "model.safetensors", "ood.safetensors", "preprocessor_config.json", "training_curves.png",
]


@pytest.fixture
def hub_calls(monkeypatch):
    """Records what huggingface_hub would create and upload; any Trainer push fails the test."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, delete_patterns=None, **kwargs):
        # The files upload_folder would send: the same filter over the same walk as huggingface_hub's own.
        folder = Path(folder_path)
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        every_file = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
        sent = list(filter_repo_objects(every_file, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS))
        calls.append(("upload_folder", repo_id, {"files": sent, "card": (folder / "README.md").read_text(), "delete_patterns": delete_patterns, **kwargs}))

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} was called: nothing but the finished folder may be published")
        return call

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    for name in ("upload_file", "create_commit"):
        monkeypatch.setattr(HfApi, name, refuse(f"HfApi.{name}"))
    for name in ("push_to_hub", "init_hf_repo", "_push_from_checkpoint"):
        monkeypatch.setattr(Trainer, name, refuse(f"Trainer.{name}"))
    return calls


def test_push_to_hub_publishes_exactly_the_finished_model_folder(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "model"
    train_vit.main(["--data_dir", "synthetic", "--model", "scratch-tiny", "--output_dir", str(output), "--num_train_epochs", "2",
                    "--push_to_hub", "--hub_model_id", "test-org/x", "--hub_private_repo", "true", *TINY])

    assert [call[0] for call in hub_calls] == ["create_repo", "upload_folder"]  # once, at the end; nothing during training
    assert hub_calls[0][1] == "test-org/x" and hub_calls[0][2]["private"] is True
    upload = hub_calls[1][2]
    assert hub_calls[1][1] == "test-org/x"
    assert upload["files"] == MODEL_FOLDER  # no training_args.bin or other pickle, no checkpoint-*
    assert list(output.glob("checkpoint-*")), "the run left checkpoints in the folder, which must not be uploaded"
    assert upload["delete_patterns"] == "*"  # files of an earlier upload that the folder no longer has go
    card = (output / "README.md").read_text()
    assert upload["card"] == card  # our card, and the local folder still has it
    assert "model-index" in card and "Not for clinical use" in card and "test-org/x" in card
    assert not (output / "training_args.bin").exists()


def test_only_the_model_files_of_a_folder_are_published(tiny_model_dir, tmp_path, hub_calls):
    folder = tmp_path / "vit-xray"
    shutil.copytree(tiny_model_dir, folder)
    for junk in ("training_args.bin", "optimizer.pt", "rng_state.pth", "model.onnx", "model.int8.onnx", ".DS_Store"):
        (folder / junk).write_bytes(b"x")
    for junk in ("checkpoint-12/model.safetensors", "runs/events.out", "search/trial.json"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_bytes(b"x")
    expected = sorted(path.name for path in tiny_model_dir.iterdir() if path.is_file())
    url, files = publish_model_folder(folder, "test-org/y")
    assert files == expected == hub_calls[-1][2]["files"]
    assert url == "https://huggingface.co/test-org/y"

    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        model_folder_files(folder)
