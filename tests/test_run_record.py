"""The model folder's record of its run: run.json (the command and every resolved option) and metrics.json (written
once), read back through `cxr.run_record`, and the card rendered from the two."""

import dataclasses
import json

import pytest

import train_vit
from cxr.card import render_model_card
from cxr.run_record import (
    read_metrics,
    read_run,
    trained_split_sizes,
    training_argv,
    update_metrics,
    warn_if_other_split,
)


def test_run_json_holds_the_command_and_every_resolved_option(tiny_model_dir):
    record = read_run(tiny_model_dir)
    assert record["command"].startswith("python ") and "--output_dir" in record["argv"]
    assert record["argv"] == record["expanded_argv"]  # no --recipe given
    for section, arguments in (
        ("model", train_vit.ModelArguments),
        ("data", train_vit.DataArguments),
        ("search", train_vit.SearchArguments),
        ("training", train_vit.XrayTrainingArguments),
    ):
        missing = {option.name for option in dataclasses.fields(arguments) if option.init} - set(record[section])
        assert not missing, (section, missing)
    assert (record["model"]["model"], record["training"]["learning_rate"], record["training"]["num_train_epochs"]) == (
        "scratch-tiny",
        3e-3,
        2,
    )
    # enums as values, no secret
    assert record["training"]["eval_strategy"] == "epoch" and record["training"]["hub_token"] == "<HUB_TOKEN>"
    assert (record["data"]["split_seed"], record["data"]["validation_fraction"], record["data"]["synthetic"]) == (
        42,
        0.1,
        True,
    )
    prepared = tiny_model_dir.parent / "data" / "prepared" / "synthetic"
    assert record["data"]["prepared_dir"] == str(prepared.resolve()) and (prepared / "manifest.csv").is_file()


def test_the_card_is_rendered_from_the_saved_records_alone(tiny_model_dir):
    assert (
        str(render_model_card(read_run(tiny_model_dir), read_metrics(tiny_model_dir)))
        == (tiny_model_dir / "README.md").read_text()
    )


def test_metrics_json_is_complete_and_its_figures_describe_the_calibrated_model(tiny_model_dir):
    summary = read_metrics(tiny_model_dir)
    assert {
        "model_origin",
        "model",
        "data",
        "train",
        "validation",
        "test",
        "calibration",
        "ood",
        "prediction_sets",
    } <= set(summary)
    for split, figures in summary["calibration"]["by_split"].items():
        assert summary[split]["expected_calibration_error"] == figures["ece_after"], split
    assert trained_split_sizes(tiny_model_dir) == {
        split: sum(counts.values()) for split, counts in summary["data"]["counts"].items()
    }


def test_update_metrics_replaces_the_parts_given_and_keeps_the_rest(tmp_path):
    (tmp_path / "metrics.json").write_text(
        json.dumps({"train": {"epoch": 2.0}, "ood": {"threshold": 1.0, "old": True}})
    )
    update_metrics(tmp_path, ood={"threshold": 2.0})
    assert read_metrics(tmp_path) == {"train": {"epoch": 2.0}, "ood": {"threshold": 2.0}}
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]  # written through a renamed temporary file
    assert read_run(tmp_path) == {} and read_metrics(tmp_path / "nowhere") == {}


@pytest.mark.parametrize(
    "sizes, warned", [({"train": 7, "validation": 3}, False), ({"train": 8, "validation": 2}, True)]
)
def test_a_refit_on_other_splits_is_warned_about(tmp_path, capsys, sizes, warned):
    counts = {"train": {"normal": 4, "viral_pneumonia": 3}, "validation": {"normal": 3}}
    (tmp_path / "metrics.json").write_text(json.dumps({"data": {"counts": counts}}))
    warn_if_other_split(tmp_path, {split: range(size) for split, size in sizes.items()})
    assert ("differ from the ones the model was trained with" in capsys.readouterr().out) == warned


def test_training_argv_reads_run_json_and_falls_back_to_an_older_folders_card(tmp_path, tiny_model_dir):
    expanded = read_run(tiny_model_dir)["expanded_argv"]
    at = expanded.index("--output_dir")
    assert training_argv(tiny_model_dir, leave_out=("--output_dir",)) == expanded[:at] + expanded[at + 2 :]

    older = tmp_path / "older"  # a folder written before run.json existed: the command is in its card only
    older.mkdir()
    (older / "README.md").write_text(
        "# card\n\n"
        "- **Command:** `python train_vit.py --model scratch-pvt --seed 42 --output_dir /x --report_to none`\n"
        "- **Data:** ...\n"
    )
    made_with = training_argv(older, leave_out=("--output_dir", "--seed"))
    assert made_with == ["--model", "scratch-pvt", "--report_to", "none"]
    assert training_argv(tmp_path) is None


def test_a_folder_that_mixes_versions_is_refused_at_load(tiny_model_dir, tmp_path):
    """checksums.json records every file the run wrote; a folder with one file from elsewhere (a partial retrain, a
    hand copy) is refused with a message instead of serving weights beside another run's X-ray check."""
    import shutil

    from cxr.predictor import ModelNotFoundError, load_classifier
    from cxr.run_record import CHECKSUMS_FILE, check_checksums

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    recorded = json.loads((folder / CHECKSUMS_FILE).read_text())
    assert {"model.safetensors", "ood.safetensors", "conformal.json", "metrics.json", "run.json"} <= set(recorded)
    assert check_checksums(folder) == []
    load_classifier(folder)
    conformal = json.loads((folder / "conformal.json").read_text())
    conformal["thresholds"] = {key: 0.5 for key in conformal.get("thresholds", {})} or {"x": 1}
    (folder / "conformal.json").write_text(json.dumps(conformal))
    assert check_checksums(folder) == ["conformal.json"]
    with pytest.raises(ModelNotFoundError, match="mixes versions: conformal.json"):
        load_classifier(folder)
