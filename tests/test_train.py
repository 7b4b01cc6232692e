"""End to end: train_vit.py resumes, searches, follows recipes, learns from a teacher; fine-tuning a local checkpoint.
(What every model folder it writes must hold and do, for a ViT and a ResNet alike: tests/test_cnn.py.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser, pipeline

import train_vit
from cxr.labels import ID2LABEL
from cxr.models import ModelOrigin, build_model
from cxr.run_record import read_metrics, read_run
from helpers import tiny_run

TINY = tiny_run(
    drop=("data_dir", "num_train_epochs", "report_to")
)  # each test names its data, and epochs where it needs other than the default


def test_outputs_say_honestly_that_the_model_was_trained_from_scratch(tiny_model_dir):
    summary = read_metrics(tiny_model_dir)
    assert summary["model_origin"]["pretrained"] is False
    assert summary["data"]["synthetic"] is True
    for split in ("validation", "test"):
        for key in (
            "accuracy",
            "macro_f1",
            "roc_auc_ovr",
            "pneumonia_sensitivity",
            "pneumonia_specificity",
            "f1_viral_pneumonia",
        ):
            assert 0.0 <= summary[split][key] <= 1.0, (split, key)
    card = (tiny_model_dir / "README.md").read_text()
    assert "trained from scratch" in card and "SYNTHETIC" in card
    assert "Not for clinical use" in card and "CC BY 4.0" in card
    assert "model-index" in card and f"{summary['test']['macro_f1']:.3f}" in card


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kept = []
    monkeypatch.setattr(train_vit, "keep_freed_memory", lambda: kept.append(True))
    output = tmp_path / "model"
    args = ["--data_dir", "synthetic", "--output_dir", str(output), *TINY]
    train_vit.main([*args, "--num_train_epochs", "1"])
    first = sorted(output.glob("checkpoint-*"))
    assert first, "an epoch must leave a checkpoint"
    steps_per_epoch = int(first[-1].name.split("-")[1])

    train_vit.main([*args, "--num_train_epochs", "2", "--resume"])
    state = json.loads(
        (
            sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1] / "trainer_state.json"
        ).read_text()
    )
    assert state["global_step"] == 2 * steps_per_epoch
    # The first run's evaluation is still in the history: the run was continued, not restarted.
    assert [entry["epoch"] for entry in state["log_history"] if "eval_loss" in entry] == [1.0, 2.0]
    assert kept == [True, True], "each run keeps freed memory for its next step (cxr.training.keep_freed_memory)"


# A tensor of 64 MiB (16,384 pages), made and freed again and again as a training step's activations are; the minor
# page faults of the later rounds show whether its pages were kept or given back and faulted in again.
FAULTS = """
import resource, sys, torch
from cxr.training import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, max(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_step_reuses_the_memory_the_last_one_freed():
    def later_faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(train_vit.__file__).parent,
        ).stdout.split()
        return out[0], int(out[1])

    took, kept = later_faults("keep")
    _, released = later_faults("release")
    assert released > 10_000, "glibc's default gives a 64 MiB tensor's pages back: this check would show nothing"
    assert took == "True" and kept < 1_000, (took, kept)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_vit.main(["--data_dir", "synthetic", "--output_dir", str(tmp_path / "empty"), "--resume", *TINY])


def test_a_local_checkpoint_is_fine_tuned_as_pretrained(tiny_model_dir):
    id2label = ID2LABEL
    model, processor, origin = build_model(str(tiny_model_dir), id2label)
    assert origin == ModelOrigin(str(tiny_model_dir), pretrained=True)
    assert model.config.id2label == id2label
    assert "pretrained weights" in origin.describe()


def test_unreachable_checkpoint_says_how_to_train_offline():
    with pytest.raises(SystemExit, match="scratch-small"):
        build_model(os.path.join("no", "such", "checkpoint"), {0: "a", 1: "b", 2: "c"})


@pytest.mark.slow
def test_weight_averaging_is_what_is_evaluated_saved_and_resumed(tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file

    from cxr.training import TRAINING_WEIGHTS

    monkeypatch.chdir(tmp_path)
    args = [
        "--data_dir",
        "synthetic",
        *TINY,
        "--weight_average_decay",
        "0.9",
        "--num_train_epochs",
        "2",
        "--early_stopping_patience",
        "0",
    ]
    train_vit.main([*args, "--output_dir", "straight"])
    checkpoints = sorted((tmp_path / "straight").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2
    for (
        checkpoint
    ) in checkpoints:  # the checkpoint's model is the average; the weights being trained are kept beside it
        averaged, trained = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / TRAINING_WEIGHTS)
        assert not torch.equal(averaged["classifier.weight"], trained["classifier.weight"])

    # Resuming after the first epoch ends where the uninterrupted run ended: the average and the trained weights both
    # come back.
    shutil.copytree(checkpoints[0], tmp_path / "resumed" / checkpoints[0].name)
    train_vit.main([*args, "--output_dir", "resumed", "--resume"])
    final, expected = (
        load_file(tmp_path / run / checkpoints[1].name / TRAINING_WEIGHTS) for run in ("resumed", "straight")
    )
    assert all(torch.allclose(final[key], expected[key], atol=1e-6) for key in expected)
    final, expected = (load_file(tmp_path / run / "model.safetensors") for run in ("resumed", "straight"))
    assert all(torch.allclose(final[key], expected[key], atol=1e-6) for key in expected)


@pytest.mark.slow
def test_hyperparameter_search_tries_settings_and_trains_with_the_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_vit.main(
        [
            "--data_dir",
            "synthetic",
            *TINY,
            "--output_dir",
            "searched",
            "--num_train_epochs",
            "1",
            "--search_trials",
            "2",
            "--search_epochs",
            "1",
        ]
    )
    summary = read_metrics(tmp_path / "searched")
    trials = summary["search"]["trials"]
    assert len(trials) == 2 and len({trial["learning_rate"] for trial in trials}) == 2
    assert all(0.0 <= trial["validation_macro_f1"] <= 1.0 for trial in trials if trial["state"] == "COMPLETE")
    best = summary["search"]["best"]
    assert best["validation_macro_f1"] == max(trial["validation_macro_f1"] or 0 for trial in trials)
    assert (
        f"learning rate {best['hyperparameters']['learning_rate']:g}"
        in (tmp_path / "searched" / "README.md").read_text()
    )
    assert not (tmp_path / "searched" / "search").exists()


@pytest.mark.slow
def test_a_recipe_supplies_options_and_the_command_line_overrides_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_vit.main(
        [
            "--data_dir",
            "synthetic",
            "--recipe",
            "vit-offline",
            *TINY,
            "--output_dir",
            "recipe",
            "--num_train_epochs",
            "1",
        ]
    )
    card = (tmp_path / "recipe" / "README.md").read_text()
    assert "--recipe vit-offline" in re.search(r"\*\*Command:\*\* `(.*)`", card)[1]  # as typed
    command = re.search(r"\*\*The same, recipe expanded:\*\* `(.*)`", card)[1]
    assert "--lr_scheduler_type cosine" in command and "--label_smoothing_factor 0.1" in command  # from the recipe
    summary = read_metrics(tmp_path / "recipe")
    assert summary["model_origin"]["name"] == "scratch-tiny"  # the command line's --model wins over the recipe's
    assert summary["train"]["epoch"] == 1.0
    record = read_run(tmp_path / "recipe")  # as typed, expanded, and resolved (enums as their values)
    assert (
        record["argv"][:4] == ["--data_dir", "synthetic", "--recipe", "vit-offline"]
        and "--lr_scheduler_type" in record["expanded_argv"]
    )
    assert (
        record["training"]["lr_scheduler_type"],
        record["training"]["label_smoothing_factor"],
        record["model"]["model"],
    ) == ("cosine", 0.1, "scratch-tiny")
    with pytest.raises(SystemExit, match="No recipe 'no-such'.*vit-offline"):
        train_vit.main(["--data_dir", "synthetic", "--recipe", "no-such"])


@pytest.mark.parametrize("recipe", sorted(path.stem for path in train_vit.RECIPES.glob("*.args")))
def test_every_shipped_recipe_parses(recipe):
    # a misspelt option or value in a recipe would otherwise surface only when a user runs it
    parser = HfArgumentParser(train_vit.ARGUMENT_CLASSES)
    data_args, *_ = parser.parse_args_into_dataclasses(
        args=train_vit.with_recipe(["--data_dir", "synthetic", "--recipe", recipe])
    )
    assert data_args.data_dir == "synthetic"


def test_a_recipe_can_build_on_another_and_never_on_itself(tmp_path, monkeypatch):
    options = train_vit.with_recipe(["--recipe", "vit-distil", "--seed", "7"])
    # vit-offline's, then its own, then the command line's
    assert options.index("--weight_average_decay") < options.index("--teacher") < options.index("--seed")
    monkeypatch.setattr(train_vit, "RECIPES", tmp_path)
    (tmp_path / "a.args").write_text("--recipe b\n")
    (tmp_path / "b.args").write_text("--seed 1\n--recipe a\n")
    with pytest.raises(SystemExit, match="Recipe 'a' names itself, through a -> b"):
        train_vit.with_recipe(["--recipe", "a"])


@pytest.mark.slow
def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(tmp_path, monkeypatch):
    """--gradient_accumulation_steps 2 with batches of 8 must update the weights as one batch of 16 does."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    # SGD: the update is the gradient itself
    common = [
        "--data_dir",
        "synthetic",
        *TINY,
        "--max_steps",
        "1",
        "--max_train_samples",
        "16",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--early_stopping_patience",
        "0",
        "--warmup_steps",
        "0",
        "--max_grad_norm",
        "0",
        "--optim",
        "sgd",
    ]
    train_vit.main([*common, "--output_dir", "big", "--per_device_train_batch_size", "16"])
    train_vit.main(
        [
            *common,
            "--output_dir",
            "accumulated",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "2",
        ]
    )
    # calibration rescales the head differently per run; compare the body
    head = {
        "classifier.weight",
        "classifier.bias",
    }
    big, accumulated = (
        load_file(tmp_path / "big" / "model.safetensors"),
        load_file(tmp_path / "accumulated" / "model.safetensors"),
    )
    assert all(torch.allclose(big[key], accumulated[key], atol=1e-6) for key in big.keys() - head)


def test_with_a_teacher_the_loss_also_counts_the_teachers_label_for_the_same_view():
    """Distillation (--teacher): the student is pulled towards the teacher's top label on the very batch it sees."""
    import torch
    import torch.nn.functional as F
    from transformers import TrainingArguments

    from cxr.training import XrayTrainer, weighted_loss

    labels = ID2LABEL
    torch.manual_seed(0)
    student = build_model("scratch-tiny", labels)[0]
    teacher = build_model("scratch-tiny-resnet", labels)[0]
    with torch.no_grad():
        teacher.classifier[-1].bias.copy_(torch.tensor([0.0, 0.0, 1e4]))  # whatever it sees, the teacher says viral
    weights = torch.tensor([1.0, 2.0, 3.0])
    inputs = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "teacher_pixel_values": torch.randn(4, 3, 32, 32),
        "labels": torch.zeros(4, dtype=torch.long),
    }
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)

    def loss_with(distillation_weight):
        trainer = XrayTrainer(
            model=student,
            args=args,
            compute_loss_func=weighted_loss(weights),
            teacher=teacher,
            distillation_weight=distillation_weight,
        )
        return trainer.compute_loss(student, dict(inputs)).item()

    student.eval()  # no dropout: the same logits each call
    logits = student(pixel_values=inputs["pixel_values"]).logits
    true_loss = F.cross_entropy(logits, inputs["labels"], weight=weights, reduction="sum").item() / 4
    teacher_loss = F.cross_entropy(logits, torch.full((4,), 2), weight=weights, reduction="sum").item() / 4
    assert loss_with(0.0) == pytest.approx(true_loss, rel=1e-5)
    assert loss_with(1.0) == pytest.approx(teacher_loss, rel=1e-5)
    assert loss_with(0.3) == pytest.approx(0.7 * true_loss + 0.3 * teacher_loss, rel=1e-5)
    # no teacher view: the true labels alone
    evaluation_batch = {
        "pixel_values": inputs["pixel_values"],
        "labels": inputs["labels"],
    }
    assert XrayTrainer(
        model=student, args=args, compute_loss_func=weighted_loss(weights), teacher=teacher
    ).compute_loss(student, evaluation_batch).item() == pytest.approx(true_loss, rel=1e-5)


def test_soft_distillation_pulls_the_student_towards_the_teachers_probabilities_at_its_temperature():
    """--distillation soft: the teacher's part of the loss is T² x KL(teacher || student) of the logits divided by T,
    averaged over the images; zero when the student already says what the teacher says."""
    import torch
    import torch.nn.functional as F
    from transformers import TrainingArguments

    from cxr.distillation import soft_distillation_loss
    from cxr.training import XrayTrainer, weighted_loss

    torch.manual_seed(0)
    student = build_model("scratch-tiny", ID2LABEL)[0].eval()
    teacher = build_model("scratch-tiny-resnet", ID2LABEL)[0]
    with torch.no_grad():
        teacher.classifier[-1].bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
    inputs = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "teacher_pixel_values": torch.randn(4, 3, 32, 32),
        "labels": torch.zeros(4, dtype=torch.long),
    }
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    student_logits = student(pixel_values=inputs["pixel_values"]).logits.detach()
    teacher_logits = teacher.eval()(pixel_values=inputs["teacher_pixel_values"]).logits.detach()

    def by_hand(temperature):
        teacher_probabilities = F.softmax(teacher_logits / temperature, dim=-1)
        student_log_probabilities = F.log_softmax(student_logits / temperature, dim=-1)
        kl = (teacher_probabilities * (teacher_probabilities.log() - student_log_probabilities)).sum(dim=-1)
        return temperature**2 * kl.mean().item()

    def loss_with(temperature):
        trainer = XrayTrainer(
            model=student,
            args=args,
            compute_loss_func=weighted_loss(torch.ones(3)),
            teacher=teacher,
            distillation_weight=1.0,
            distillation="soft",
            distillation_temperature=temperature,
        )
        return trainer.compute_loss(student, dict(inputs)).item()

    assert by_hand(1.0) > 0.01 and by_hand(1.0) != pytest.approx(by_hand(4.0), rel=1e-2)
    assert loss_with(1.0) == pytest.approx(by_hand(1.0), rel=1e-4)
    assert loss_with(4.0) == pytest.approx(by_hand(4.0), rel=1e-4)
    assert soft_distillation_loss(teacher_logits, teacher_logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # divided by the images of the whole accumulated step, like the true-label loss
    assert soft_distillation_loss(student_logits, teacher_logits, 1.0, num_items_in_batch=8).item() == pytest.approx(
        by_hand(1.0) / 2, rel=1e-4
    )
    with pytest.raises(ValueError, match="distillation must be one of"):
        XrayTrainer(model=student, args=args, teacher=teacher, distillation="medium")
    with pytest.raises(ValueError, match="temperature must be positive"):
        XrayTrainer(model=student, args=args, teacher=teacher, distillation="soft", distillation_temperature=0)


@pytest.mark.slow
def test_a_student_learns_from_a_teacher_trained_on_the_same_split_and_no_other(tmp_path, monkeypatch, cnn_model_dir):
    import shutil

    import cxr.distillation
    import cxr.mixup

    soft_losses, mixed_batches = [], []
    soft_distillation_loss, mix_batch = cxr.distillation.soft_distillation_loss, cxr.mixup.mix_batch
    monkeypatch.setattr(
        cxr.distillation,
        "soft_distillation_loss",
        lambda *args, **kwargs: soft_losses.append(soft_distillation_loss(*args, **kwargs)) or soft_losses[-1],
    )
    monkeypatch.setattr(
        cxr.mixup, "mix_batch", lambda inputs, *args: mixed_batches.append(set(inputs)) or mix_batch(inputs, *args)
    )
    monkeypatch.chdir(tmp_path)
    train_vit.main(
        [
            "--data_dir",
            "synthetic",
            *TINY,
            "--num_train_epochs",
            "1",
            "--teacher",
            str(cnn_model_dir),
            "--distillation",
            "soft",
            "--mixup_alpha",
            "0.4",
            "--output_dir",
            "student",
        ]
    )
    assert soft_losses, "--distillation soft did not reach the trainer"
    assert mixed_batches and "teacher_pixel_values" in mixed_batches[0], "--mixup_alpha did not reach the trainer"
    summary = read_metrics(tmp_path / "student")
    assert summary["model_origin"]["teacher"] == str(cnn_model_dir)
    assert (
        f"predictions of the trained model `{cnn_model_dir}` (distillation)"
        in (tmp_path / "student" / "README.md").read_text()
    )
    # the student alone is saved
    assert pipeline("image-classification", model=str(tmp_path / "student")).model.config.model_type == "vit"

    # a smoke run on part of the same split (--max_*_samples) is the same split
    train_vit.main(
        [
            "--data_dir",
            "synthetic",
            *TINY,
            "--max_train_samples",
            "32",
            "--max_eval_samples",
            "16",
            "--max_steps",
            "1",
            "--teacher",
            str(cnn_model_dir),
            "--output_dir",
            "smoke",
        ]
    )
    assert read_metrics(tmp_path / "smoke")["model_origin"]["teacher"] == str(cnn_model_dir)

    # it may have trained on this run's validation images
    with pytest.raises(SystemExit, match="trained on other splits"):
        train_vit.main(
            [
                "--data_dir",
                "synthetic",
                *TINY,
                "--synthetic_images_per_class",
                "30",
                "--teacher",
                str(cnn_model_dir),
                "--output_dir",
                "other",
            ]
        )
    renamed = shutil.copytree(cnn_model_dir, tmp_path / "renamed")
    config = json.loads((renamed / "config.json").read_text())
    config["id2label"] = {"0": "Normal", "1": "Bacterial pneumonia", "2": "Viral pneumonia"}
    (renamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="not this data set's classes"):
        train_vit.main(["--data_dir", "synthetic", *TINY, "--teacher", str(renamed), "--output_dir", "other"])
    with pytest.raises(SystemExit, match="No trained model at 'nowhere'"):
        train_vit.main(["--data_dir", "synthetic", *TINY, "--teacher", "nowhere", "--output_dir", "other"])
