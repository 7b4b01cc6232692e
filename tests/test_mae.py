"""pretrain_mae.py: masked-autoencoder pretraining on the training split, then train_vit.py fine-tunes the encoder."""

import csv
import json

import pytest
import torch
from transformers import TrainingArguments, ViTModel

import pretrain_mae
import train_vit
from cxr.models import build_model
from cxr.run_record import read_metrics
from helpers import prepared_data, tiny_run
from hf_data.loading import DataArguments, prepare_and_load

TINY_DATA = tiny_run(
    drop=("model", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "report_to", "precision")
)  # the data and quiet progress


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mae")
    previous = pytest.MonkeyPatch()
    previous.chdir(workdir)
    try:
        pretrain_mae.main(
            [
                *TINY_DATA,
                "--model",
                "scratch-tiny",
                "--output_dir",
                "encoder",
                "--num_train_epochs",
                "8",
                "--per_device_train_batch_size",
                "16",
                "--learning_rate",
                "3e-3",
                "--logging_steps",
                "1",
            ]
        )
    finally:
        previous.undo()
    return workdir / "encoder"


@pytest.mark.slow
def test_pretraining_writes_its_record_and_a_picture_of_what_it_learned(encoder_dir):
    record = json.loads((encoder_dir / "pretraining.json").read_text())
    assert len(record["loss_history"]) >= 20 and record["epochs"] == 8
    assert (encoder_dir / "reconstructions.png").stat().st_size > 0


@pytest.mark.slow
def test_pretraining_on_real_xrays_learns_to_paint_back_hidden_patches(shared_data, tmp_path, monkeypatch):
    """On 120 real X-rays (the stand-in images hold nothing a tiny model can predict), a few epochs of the default
    preset already predict hidden patches clearly better than at the start."""
    for folder in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "xrays" / "train" / folder).mkdir(parents=True)
        for path in sorted((shared_data / "chest_xray" / "train" / folder).glob("*.jpeg"))[:60]:
            (tmp_path / "xrays" / "train" / folder / path.name).symlink_to(path)
    monkeypatch.chdir(tmp_path)
    pretrain_mae.main(
        [
            "--data_dir",
            str(tmp_path / "xrays"),
            "--output_dir",
            "encoder",
            "--num_train_epochs",
            "4",
            "--per_device_train_batch_size",
            "16",
            "--logging_steps",
            "4",
            "--disable_tqdm",
            "true",
            "--save_strategy",
            "no",
        ]
    )
    losses = [
        entry["loss"] for entry in json.loads((tmp_path / "encoder" / "pretraining.json").read_text())["loss_history"]
    ]
    # Painting every hidden patch the image's mean grey scores about 0.75 of the first loss here; a model that does
    # that (as one without position tables must) has learned nothing an X-ray classifier could use.
    assert losses[-1] < 0.6 * losses[0]


def test_every_patch_knows_where_it_is():
    """The fixed sin-cos position tables of encoder and decoder are filled (transformers 5.23 leaves them at zero)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from cxr.models import PRESETS
    from cxr.workarounds import add_mae_position_tables

    model = ViTMAEForPreTraining(ViTMAEConfig(**PRESETS["scratch-tiny"][1]))
    add_mae_position_tables(model)
    for table in (model.vit.embeddings.position_embeddings[0, 1:], model.decoder.decoder_pos_embed[0, 1:]):
        assert len(torch.unique(table, dim=0)) == len(table)  # a different vector for every patch position


@pytest.mark.slow
def test_pretraining_sees_only_the_training_split(encoder_dir):
    record = json.loads((encoder_dir / "pretraining.json").read_text())
    with open(prepared_data(encoder_dir) / "manifest.csv") as manifest:
        splits = [row["split"] for row in csv.DictReader(manifest)]
    assert record["train_images"] == splits.count("train") < len(splits)
    assert record["split_seed"] == 42 and "without labels or downloaded weights" in record["description"]


@pytest.mark.slow
def test_the_encoder_is_a_plain_vit_that_fine_tuning_starts_from(encoder_dir):
    model, _, origin = build_model(str(encoder_dir), {0: "a", 1: "b", 2: "c"})
    encoder = ViTModel.from_pretrained(encoder_dir, add_pooling_layer=False).state_dict()
    started = model.vit.state_dict()
    assert set(started) == set(encoder)
    # every encoder weight, only the head is new
    assert all(torch.equal(started[name], encoder[name]) for name in encoder)
    assert origin.pretraining and "masked autoencoding" in origin.describe()


@pytest.mark.slow
def test_the_fine_tuned_model_says_how_its_encoder_was_pretrained(encoder_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_vit.main(
        [
            *TINY_DATA,
            "--recipe",
            "vit-mae",
            "--model",
            str(encoder_dir),
            "--output_dir",
            "fine-tuned",
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "16",
        ]
    )
    summary = read_metrics(tmp_path / "fine-tuned")
    assert "pretrained by masked autoencoding" in summary["model_origin"]["description"]
    card = (tmp_path / "fine-tuned" / "README.md").read_text()
    assert (
        "pretrained by masked autoencoding" in card and "pretrained without labels on the same training X-rays" in card
    )
    assert "base_model:" not in card  # a local folder made here, not a model on the Hub


def test_the_recipe_without_its_encoder_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no folder 'outputs/mae-encoder'.*pretrain_mae.py"):
        train_vit.main([*TINY_DATA, "--recipe", "vit-mae", "--output_dir", "model"])  # no outputs/ folder here at all


def test_only_vit_presets_can_be_pretrained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="must be a ViT preset"):
        pretrain_mae.main([*TINY_DATA, "--model", "scratch-resnet"])


def test_the_validation_split_does_not_depend_on_the_training_seed(tmp_path, monkeypatch):
    """Runs with different --seed are scored on the same children (and never rewrite each other's data tree)."""
    monkeypatch.chdir(tmp_path)
    validation = []
    for seed in (1, 2):
        dataset, _ = prepare_and_load(
            DataArguments(data_dir="synthetic", synthetic_images_per_class=40),
            TrainingArguments(output_dir="out", seed=seed),
        )
        validation.append(sorted(item["path"] for item in dataset["validation"]["image"]))
    assert validation[0] == validation[1]
    dataset, _ = prepare_and_load(
        DataArguments(data_dir="synthetic", synthetic_images_per_class=40, split_seed=7),
        TrainingArguments(output_dir="out"),
    )
    assert sorted(item["path"] for item in dataset["validation"]["image"]) != validation[0]
