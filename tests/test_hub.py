"""The Hub: `--push_to_hub` publishes exactly the finished model folder (no network: huggingface_hub's calls are
recorded), and a checkpoint given by Hub id is fine-tuned offline from a Hugging Face cache."""

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects
from transformers import Trainer

import train_vit
from cxr.hub import model_folder_files, publish_model_folder
from cxr.labels import ID2LABEL
from cxr.run_record import read_metrics
from helpers import tiny_run

TINY = tiny_run(drop=("data_dir", "model", "num_train_epochs"))  # each test names its data and model
MODEL_FOLDER = [
    "README.md",
    "checksums.json",
    "config.json",
    "conformal.json",
    "confusion_matrix_test.png",
    "confusion_matrix_validation.png",
    "metrics.json",
    "model.safetensors",
    "ood.safetensors",
    "preprocessor_config.json",
    "run.json",
    "training_curves.png",
]


@pytest.fixture
def hub_calls(monkeypatch):
    """Records what huggingface_hub would create and upload; any Trainer push fails the test."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(
        self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, delete_patterns=None, **kwargs
    ):
        # The files upload_folder would send: the same filter over the same walk as huggingface_hub's own.
        folder = Path(folder_path)
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        every_file = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
        sent = list(
            filter_repo_objects(
                every_file, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
            )
        )
        calls.append(
            (
                "upload_folder",
                repo_id,
                {
                    "files": sent,
                    "card": (folder / "README.md").read_text(),
                    "delete_patterns": delete_patterns,
                    **kwargs,
                },
            )
        )

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


@pytest.mark.slow
def test_push_to_hub_publishes_exactly_the_finished_model_folder(tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "model"
    train_vit.main(
        [
            "--data_dir",
            "synthetic",
            "--model",
            "scratch-tiny",
            "--output_dir",
            str(output),
            "--num_train_epochs",
            "2",
            "--push_to_hub",
            "--hub_model_id",
            "test-org/x",
            "--hub_private_repo",
            "true",
            *TINY,
        ]
    )

    # once, at the end; nothing during training
    assert [call[0] for call in hub_calls] == [
        "create_repo",
        "upload_folder",
    ]
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


HUB_ID = "test-org/vit-tiny-pretrained"
MEAN, STD, SIZE = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3], 40


@pytest.fixture
def hub_checkpoint(tmp_path, monkeypatch):
    """A small ViT with an unrelated 10-class head and its own image processor, in a Hugging Face cache under
    HUB_ID, as a download leaves it; the Hub is offline and that cache is the one huggingface_hub reads."""
    import huggingface_hub.constants
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from benchmarks.common import fill_hub_cache

    labels = {index: f"imagenet_class_{index}" for index in range(10)}
    config = ViTConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=labels,
        label2id={label: index for index, label in labels.items()},
    )
    folder = tmp_path / "pretrained"
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    cache = tmp_path / "hub-cache"
    fill_hub_cache(cache, HUB_ID, folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these variables once, at import; transformers asks its constants module at each call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return folder


@pytest.mark.slow
def test_a_hub_checkpoint_is_fine_tuned_offline_with_a_new_head_and_its_own_processor(
    hub_checkpoint, tmp_path, monkeypatch
):
    from huggingface_hub import ModelCard
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    output = tmp_path / "model"
    train_vit.main(
        ["--data_dir", "synthetic", "--model", HUB_ID, "--output_dir", str(output), "--num_train_epochs", "1", *TINY]
    )

    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "Bacterial pneumonia", "1": "Normal", "2": "Viral pneumonia"}
    with safe_open(output / "model.safetensors", "pt") as weights:
        assert weights.get_slice("classifier.weight").get_shape() == [3, 32]  # the 10-class head replaced
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"], processor["size"]) == (
        MEAN,
        STD,
        {"height": SIZE, "width": SIZE},
    )

    origin = read_metrics(output)["model_origin"]
    assert origin["pretrained"] is True and origin["base_model"] == HUB_ID
    assert origin["description"] == f"fine-tuned from pretrained weights `{HUB_ID}`"
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == HUB_ID
    assert f"fine-tuned from pretrained weights `{HUB_ID}`" in card.text


def test_the_card_follows_the_hubs_conventions_and_its_model_index_reads_back(tiny_model_dir):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(tiny_model_dir / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == (
        "apache-2.0",
        "transformers",
        "image-classification",
    )
    assert data.base_model is None  # trained from a preset: no base model
    assert set(data.metrics) == {"accuracy", "f1", "roc_auc", "precision", "recall"}
    assert {"medical-imaging", "chest-x-ray"} <= set(data.tags)
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert [r.metric_value for r in results] == [r.metric_value for r in data.eval_results]
    by_name = {r.metric_name: r for r in results}
    summary = read_metrics(tiny_model_dir)["test"]
    macro_f1 = by_name["Macro-F1 (3 classes)"]
    assert (macro_f1.metric_type, macro_f1.metric_args, macro_f1.metric_value) == (
        "f1",
        {"average": "macro"},
        round(summary["macro_f1"], 4),
    )
    assert by_name["ROC-AUC (one-vs-rest, macro)"].metric_type == "roc_auc"
    assert (by_name["Pneumonia sensitivity"].metric_type, by_name["Pneumonia sensitivity"].metric_config) == (
        "sensitivity",
        "pneumonia_vs_normal",
    )
    recall = by_name["Recall (Viral pneumonia)"]
    assert (recall.metric_type, recall.metric_args, recall.metric_value) == (
        "recall",
        {"average": "binary", "pos_label": "viral_pneumonia"},
        round(summary["recall_viral_pneumonia"], 4),
    )
    hub_ids = {"accuracy", "f1", "roc_auc", "precision", "recall"}
    # the named custom ones
    assert {r.metric_type for r in results} - hub_ids == {
        "sensitivity",
        "specificity",
        "expected_calibration_error",
    }
    assert all(r.dataset_split == "test" and r.task_type == "image-classification" for r in results)


def test_base_model_names_only_hub_ids(tiny_model_dir, tmp_path):
    from huggingface_hub import ModelCard

    from cxr.card import render_model_card
    from cxr.models import ModelOrigin, build_model
    from cxr.run_record import read_run

    id2label = ID2LABEL
    model, processor, origin = build_model(str(tiny_model_dir), id2label)
    assert origin.pretrained and origin.base_model is None  # a local folder
    record, summary = read_run(tiny_model_dir), read_metrics(tiny_model_dir)

    def card(origin: ModelOrigin, synthetic_data: bool) -> ModelCard:
        run = record | {"data": record["data"] | {"synthetic": synthetic_data}}
        return ModelCard(
            str(
                render_model_card(
                    run, summary | {"model_origin": dataclasses.asdict(origin) | {"description": origin.describe()}}
                )
            )
        )

    local = card(origin, synthetic_data=True)
    assert local.data.base_model is None and local.data.datasets is None
    hub = card(
        ModelOrigin("google/vit-base-patch16-224-in21k", True, base_model="google/vit-base-patch16-224-in21k"),
        synthetic_data=False,
    )
    assert hub.data.base_model == "google/vit-base-patch16-224-in21k"
    assert (
        hub.data.datasets == ["hf-vision/chest-xray-pneumonia"]
        and hub.data.eval_results[0].dataset_type == "hf-vision/chest-xray-pneumonia"
    )


def parsed_options(*argv: str) -> dict:
    """Every argument `train_vit.py` would train with, given `argv` (recipes expanded), by name."""
    parsed = train_vit.build_parser().parse_args_into_dataclasses(
        args=train_vit.with_recipe(["--data_dir", "synthetic", "--report_to", "none", *argv])
    )
    return {field.name: getattr(group, field.name) for group in parsed for field in dataclasses.fields(group)}


def test_the_pretrained_recipe_fine_tunes_the_hub_checkpoint_gently_and_the_command_line_still_wins():
    recipe = train_vit.RECIPES / "vit-pretrained.args"
    given = parsed_options("--recipe", "vit-pretrained")
    defaults = parsed_options()
    # the recipe is exactly its lines, typed on the command line: nothing dropped, nothing added
    assert {**given, "recipe": None} == parsed_options(*shlex.split(recipe.read_text(), comments=True))
    # what it does to a run: a Hub checkpoint, not a preset from scratch, fine-tuned more gently than the defaults
    # (which suit training from scratch) and without weight decay pulling the pretrained weights toward zero
    assert given["model"] == train_vit.DEFAULT_CHECKPOINT and given["model"] not in train_vit.PRESETS
    assert given["learning_rate"] < defaults["learning_rate"]
    assert given["num_train_epochs"] < defaults["num_train_epochs"]
    assert given["weight_decay"] == 0 < defaults["weight_decay"]
    overridden = parsed_options("--recipe", "vit-pretrained", "--learning_rate", "1e-4", "--num_train_epochs", "2")
    assert (overridden["learning_rate"], overridden["num_train_epochs"]) == (1e-4, 2)
    assert {**overridden, "learning_rate": None, "num_train_epochs": None} == {
        **given,
        "learning_rate": None,
        "num_train_epochs": None,
    }
