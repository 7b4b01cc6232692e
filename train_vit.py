"""Fine-tune a Vision Transformer on pediatric chest X-rays (normal / bacterial / viral pneumonia) with `Trainer`.

    # offline quick start: generated stand-in images, a small ViT from scratch, a few minutes on a laptop
    python train_vit.py --data_dir synthetic --model scratch-small --learning_rate 1e-3 --num_train_epochs 8

    # the Kaggle download with the pretrained default (needs network for the weights) and settings that suit it
    python train_vit.py --data_dir ~/Downloads/chest_xray --recipe vit-pretrained

One `main()`, top to bottom: typed arguments -> prepare the imagefolder tree (hf_data) -> load it -> model
and image processor -> Trainer (augmentation, class-weighted loss, early stopping) -> train -> calibration
temperature and out-of-distribution statistics (cxr.reliability) -> evaluate -> one model folder: weights
(safetensors, temperature folded in), image processor, ood.safetensors, run.json (every resolved option), metrics.json,
plots and the model card.
Run with --help for every option (ours first, then the standard `TrainingArguments`).

Several processes (`torchrun --nproc_per_node N train_vit.py ...` or `accelerate launch --multi_gpu --num_processes N
train_vit.py ...`, GPUs or not) train one model together (DistributedDataParallel; gloo on CPUs): the data set is
prepared once, by the process that saves, while the others wait; only that process writes the model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, HfArgumentParser, TrainingArguments, set_seed

from cxr.card import hardware, render_model_card
from cxr.distillation import DISTILLATION_KINDS
from cxr.folders import staging_folder, staging_path, swap_in
from cxr.hub import publish_model_folder
from cxr.labels import DISPLAY_NAMES
from cxr.metrics import plot_confusion_matrix, plot_training_curves, softmax, trainer_metrics
from cxr.models import DEFAULT_CHECKPOINT, PRESETS, build_model, default_output_dir, input_size, load_teacher
from cxr.pixel_cache import PixelCache
from cxr.precision import PRECISIONS, describe, resolve_precision
from cxr.reliability import describe_reliability, fit_reliability, save_reliability
from cxr.run_record import (
    calibrated_parts,
    options_of,
    read_metrics,
    read_run,
    run_record,
    split_sizes,
    write_checksums,
    write_metrics,
    write_run,
)
from cxr.training import (
    XrayTrainer,
    check_writable,
    checkpoint_to_resume,
    class_weights,
    keep_freed_memory,
    peak_memory_mib,
    weighted_loss,
)
from cxr.transforms import collate, pixel_transform
from hf_data.loading import DataArguments, default_prepared_dir, prepare_and_load, validation_patient_ids

RECIPES = Path(__file__).resolve().parent / "recipes"  # named option sets: --recipe NAME reads recipes/NAME.args
# The old model's files a new model folder replaces (never carried over beside the new ones); checkpoints and
# anything else stay.
MODEL_FILES = ("*.safetensors", "*.json", "*.png", "*.onnx", "*.bin", "README.md")


@dataclass
class ModelArguments:
    model: str = field(
        default=DEFAULT_CHECKPOINT,
        metadata={
            "help": "A Hub model id or a local checkpoint folder to fine-tune (a new 3-class head is added), "
            f"or a preset trained from scratch with random weights, no download: {', '.join(PRESETS)}."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A named set of options from recipes/NAME.args "
            "(e.g. swiftformer-distil: the README's offline recipe, the one behind the shipped model); "
            "options given on the command line override the recipe's."
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last checkpoint in --output_dir instead of starting afresh."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an --output_dir that holds checkpoints or a model: delete its checkpoints now, "
            "replace its model at the end."
        },
    )
    early_stopping_patience: int = field(
        default=3,
        metadata={"help": "Stop after this many evaluations without a better validation macro-F1 (0 disables)."},
    )
    weight_average_decay: float = field(
        default=0.0,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay per optimizer step "
            "(e.g. 0.995) and evaluate, select and save the average instead of the last step's weights: "
            "steadier validation scores. 0 disables."
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "A model folder trained by this script on the same data and split (e.g. --model scratch-resnet) "
            "to distil from: the loss also counts what the teacher says of each augmented training image "
            "(--distillation). Only the student is evaluated and saved."
        },
    )
    distillation_weight: float = field(
        default=0.5,
        metadata={"help": "With --teacher: the share of the loss given to the teacher (the rest to the true labels)."},
    )
    distillation: str = field(
        default="hard",
        metadata={
            "help": "With --teacher: 'hard' learns the teacher's top label (DeiT); 'soft' its probabilities, by KL "
            "divergence at --distillation_temperature (Hinton et al.), so its doubt between classes is learnt too.",
            "choices": list(DISTILLATION_KINDS),
        },
    )
    distillation_temperature: float = field(
        default=1.0,
        metadata={"help": "With --distillation soft: divides both networks' logits first; above 1 softens them."},
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Blend each training image with another of its batch, and their labels alike (mixup, Zhang et "
            "al.), by a share drawn from Beta(alpha, alpha); a --teacher sees the same blend (function matching, "
            "Beyer et al.). 0 disables; 0.2 to 1 are usual."
        },
    )


@dataclass
class SearchArguments:
    search_trials: int = field(
        default=0,
        metadata={
            "help": "Before training, try up to this many settings of learning rate, weight decay and warm-up "
            "with Optuna (Trainer.hyperparameter_search: TPE sampler, unpromising trials pruned), "
            "each scored by its validation macro-F1, then train with the best. 0: no search."
        },
    )
    search_minutes: float = field(
        default=30.0, metadata={"help": "Start no new trial after this many minutes (the running trial finishes)."}
    )
    search_epochs: float = field(default=3.0, metadata={"help": "Training epochs per trial."})
    search_train_samples: int | None = field(
        default=None, metadata={"help": "Train each trial on at most this many images (a random subset)."}
    )


@dataclass
class XrayTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults suited to this task; every standard option still works."""

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "The model folder to write (and its checkpoints). Default: outputs/<architecture family>-xray, "
            "after --model (outputs/swiftformer-xray, outputs/resnet-xray, outputs/vit-xray)."
        },
    )
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the validation split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept on disk (the best one is always kept)."}
    )
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Keep the checkpoint with the best --metric_for_best_model."}
    )
    metric_for_best_model: str | None = field(
        default="macro_f1", metadata={"help": "Validation metric that picks the best checkpoint."}
    )
    num_train_epochs: float = field(default=10.0, metadata={"help": "Training epochs (early stopping may end sooner)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size per device for evaluation."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warm-up: steps, or a fraction of all steps if below 1."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every this many steps."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto: bfloat16 autocast where the GPU or CPU computes it natively (AVX-512 BF16 or AMX on x86), "
            "float32 elsewhere; the choice and its reason are printed and saved in run.json. bf16 or fp32 insist "
            "(a plain --bf16 stops on hardware without native bfloat16, where it would be many times slower).",
            "choices": list(PRECISIONS),
        },
    )
    pixel_cache: bool = field(
        default=True,
        metadata={
            "help": "Decode each training and validation X-ray once into a uint8 file beside the prepared tree "
            "(<prepared_dir>.pixels/, rebuilt when the tree or the resize changes) and augment batches as tensors. "
            "false: decode every image every epoch (the same pixels, slower)."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the image column is decoded on the fly."}
    )
    average_tokens_across_devices: bool = field(
        default=False,
        metadata={
            "help": "Must stay False: the class-weighted loss is already a mean over each process's batch "
            "(True would multiply it by the number of processes)."
        },
    )


ARGUMENT_CLASSES = (DataArguments, ModelArguments, SearchArguments, XrayTrainingArguments)  # main() parses into these


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(ARGUMENT_CLASSES, description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Launched as several processes (torchrun, accelerate launch) on a machine without a GPU: join them as CPU
        # workers over gloo. Without this, accelerate treats each process as a separate run, all writing one folder.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = build_parser()
    started = time.monotonic()
    from_command_line, given_argv = argv is None, sys.argv[1:] if argv is None else argv
    expanded_argv = with_recipe(given_argv)  # what run.json and the card show; the hardware's choices come apart
    argv, precision = resolve_precision(with_default_output_dir(expanded_argv))
    print(f"Precision: {describe(precision)}.", flush=True)
    data_args, model_args, search_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Trainer never pushes: the finished folder is published at the end
    publish, training_args.push_to_hub = (
        training_args.push_to_hub,
        False,
    )
    set_seed(training_args.seed)
    keep_freed_memory()  # each step reuses the pages the last one freed instead of faulting them in again
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        check_writable(output_dir)  # before any work: a run that cannot save its model should not start
    last_checkpoint = checkpoint_to_resume(
        output_dir, model_args.resume, model_args.overwrite_output_dir, training_args.should_save
    )

    # Data: the user's folders -> an imagefolder tree of links -> a DatasetDict (train and validation split by patient).
    prepared_dir = Path(
        data_args.prepared_dir
        or default_prepared_dir(
            data_args.source, data_args.validation_fraction, data_args.split_seed, data_args.keep_kaggle_val
        )
    )
    dataset, report = prepare_and_load(data_args, training_args)
    class_keys = dataset["train"].features["label"].names
    id2label = {index: DISPLAY_NAMES[key] for index, key in enumerate(class_keys)}

    # Model: pretrained checkpoint, or a preset with random weights (offline).
    model, processor, origin = build_model(model_args.model, id2label)
    teacher, teacher_processor = None, None
    if model_args.teacher:
        # the prepared splits, as the teacher's metrics.json records them: --max_*_samples subsets of one split match;
        # with several processes only the one that prepared the data has its report, and it checks for all
        prepared_sizes = split_sizes(report.counts) if report is not None else None
        teacher, teacher_processor = load_teacher(model_args.teacher, id2label, prepared_sizes)
        origin.teacher = model_args.teacher
        origin.teacher_command, origin.teacher_figures = teacher_record(model_args.teacher)
    print(f"Model: {type(model).__name__}, {model.num_parameters() / 1e6:.1f} M parameters, {origin.describe()}.")
    model, teacher = channels_last(model), channels_last(teacher)

    # Decode once: the training and validation X-rays as each network's image processor resizes them, in a uint8 file
    # beside the prepared tree (cxr.pixel_cache); batches are read from it, then augmented and normalised as tensors.
    pixels = PixelCache(prepared_dir, [processor, teacher_processor]) if training_args.pixel_cache else None
    train_dataset = dataset["train"].with_transform(
        pixel_transform(processor, augment=True, teacher_processor=teacher_processor, cache=pixels)
    )
    eval_splits = {
        split: dataset[split].with_transform(pixel_transform(processor, augment=False, cache=pixels))
        for split in dataset
        if split != "train"
    }

    if training_args.should_save:
        check_free_space(output_dir, model, training_args)

    trainer_parts = dict(
        data_collator=collate,
        eval_dataset=eval_splits["validation"],
        processing_class=processor,
        compute_loss_func=weighted_loss(
            class_weights(dataset["train"]["label"], len(class_keys)), training_args.label_smoothing_factor
        ),
        compute_metrics=trainer_metrics(class_keys),
        weight_average_decay=model_args.weight_average_decay,
        teacher=teacher,
        distillation_weight=model_args.distillation_weight,
        distillation=model_args.distillation,
        distillation_temperature=model_args.distillation_temperature,
        mixup_alpha=model_args.mixup_alpha,
    )
    search = None
    if search_args.search_trials and not model_args.resume:
        subset = dataset["train"].shuffle(seed=training_args.seed)
        subset = subset.select(range(min(len(subset), search_args.search_train_samples or len(subset))))
        search = search_hyperparameters(
            search_args,
            training_args,
            lambda: channels_last(build_model(model_args.model, id2label)[0]),
            dict(
                trainer_parts,
                train_dataset=subset.with_transform(
                    pixel_transform(processor, augment=True, teacher_processor=teacher_processor, cache=pixels)
                ),
            ),
        )
        for name, value in search["best"]["hyperparameters"].items():
            setattr(training_args, name, value)
        set_seed(training_args.seed)

    early_stopping = model_args.early_stopping_patience > 0 and training_args.eval_strategy != "no"
    trainer = XrayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        callbacks=[EarlyStoppingCallback(model_args.early_stopping_patience)] if early_stopping else [],
        **trainer_parts,
    )
    if training_args.world_size > 1:
        step_images = (
            training_args.train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
        )
        print(
            f"Process {training_args.process_index + 1} of {training_args.world_size} ({training_args.device}): "
            f"{training_args.per_device_train_batch_size} of each step's {step_images} images.",
            flush=True,
        )
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)

    # The best checkpoint is loaded: fold the calibration temperature into its head and fit the out-of-distribution
    # check.
    ood_detector, reliability = fit_reliability(
        trainer.model,
        processor,
        dataset,
        validation_patient_ids(dataset),
        batch_size=training_args.per_device_eval_batch_size,
    )
    print(describe_reliability(reliability))

    # The model folder appears whole or not at all: every file goes into a hidden sibling, swapped in at the end.
    staging = staging_folder(output_dir) if training_args.should_save else staging_path(output_dir)

    # Evaluate the calibrated model on every held-out split; the last one (test if present) headlines the card.
    results = {}
    for split, split_dataset in eval_splits.items():
        prediction = trainer.predict(split_dataset, metric_key_prefix=split)
        results[split] = {key.removeprefix(f"{split}_"): value for key, value in prediction.metrics.items()}
        trainer.log_metrics(split, prediction.metrics)
        if trainer.is_world_process_zero():
            plot_confusion_matrix(
                prediction.label_ids,
                softmax(prediction.predictions).argmax(-1),
                list(id2label.values()),
                staging / f"confusion_matrix_{split}.png",
                title=f"{split} split ({len(split_dataset)} images)",
            )

    # model (safetensors, calibrated head) + image processor: what pipeline() and app.py load
    trainer.save_model(str(staging))
    if training_args.should_save:
        # a pickle; the model folder holds none (settings are in run.json)
        (staging / "training_args.bin").unlink(missing_ok=True)
    if not trainer.is_world_process_zero():
        if training_args.should_save:  # --save_on_each_node: this node's copy of the weights
            swap_in(staging, output_dir, replaced=MODEL_FILES)
        return results
    plot_training_curves(trainer.state.log_history, staging / "training_curves.png")
    summary = {
        "model_origin": asdict(origin) | {"description": origin.describe()},
        "model": {
            "architecture": type(trainer.model).__name__,
            "model_type": trainer.model.config.model_type,
            "parameters": trainer.model.num_parameters(),
            "image_size": input_size(processor),
            "class_keys": class_keys,
            "labels": list(id2label.values()),
        },
        "data": {
            "source": str(data_args.source),
            "synthetic": data_args.synthetic,
            "counts": report.counts,
            "skipped": len(report.skipped),
        },
        "train": train_result.metrics
        | {"peak_memory_mib": peak_memory_mib(), "hardware": hardware(), "wall_seconds": time.monotonic() - started},
        "best_checkpoint": trainer.state.best_model_checkpoint,
        **({"search": search} if search else {}),
        **results,
    }
    summary |= calibrated_parts(summary, reliability)  # the calibration, X-ray check and sets, in the one metrics.json
    # run.json: the options as typed, with any --recipe expanded (the card shows every option), and as resolved.
    record = run_record(
        given=given_argv,
        expanded=expanded_argv,
        program=Path(sys.argv[0]).name if from_command_line else "train_vit.py",
        model=model_args,
        data=options_of(data_args)
        | {
            "prepared_dir": str(prepared_dir.resolve()),
            "source": str(data_args.source),
            "synthetic": data_args.synthetic,
        },
        search=search_args,
        training=options_of(training_args) | {"push_to_hub": publish},
        precision=precision,
    )
    write_run(staging, record)
    write_metrics(staging, summary)
    save_reliability(staging, ood_detector, reliability)  # ood.safetensors and conformal.json
    card = render_model_card(record, summary)
    card.save(staging / "README.md")
    write_checksums(staging)  # last: every file above, as this run wrote it
    # the old model (if any) is replaced in one step, its checkpoints carried over
    swap_in(staging, output_dir, replaced=MODEL_FILES)
    print(f"\nModel folder: {output_dir}  ({origin.describe()})")
    print(
        'Try it: python -c "from transformers import pipeline; '
        f"print(pipeline('image-classification', model='{output_dir}')('your_xray.jpeg', top_k=3))\""
    )
    if publish:  # exactly the finished folder, in one commit (cxr/hub.py says why not Trainer's push)
        url, files = publish_model_folder(
            output_dir,
            training_args.hub_model_id or output_dir.absolute().name,
            token=training_args.hub_token,
            private=training_args.hub_private_repo,
            revision=training_args.hub_revision,
        )
        print(f"Published to {url}: {', '.join(files)}")
    return results


def channels_last(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """A network with convolutions in channels-last memory, which convolutions run faster in (oneDNN on CPUs, cuDNN
    on GPUs; `python -m benchmarks.train_speed` measures it, docs/training.md). The saved weights are stored as usual,
    and predictions agree to float rounding."""
    if model is not None and any(isinstance(module, torch.nn.Conv2d) for module in model.modules()):
        return model.to(memory_format=torch.channels_last)
    return model


def teacher_record(folder: str) -> tuple[str | None, str | None]:
    """The command that trained a teacher and its validation figures, from its run.json and metrics.json."""
    validation = read_metrics(folder).get("validation", {})
    figures = ", ".join(
        f"{name} {validation[key]:.3f}"
        for key, name in (("macro_f1", "validation macro-F1"), ("pneumonia_specificity", "specificity"))
        if key in validation
    )
    wall = read_metrics(folder).get("train", {}).get("wall_seconds")
    figures += f", {wall / 60:.1f} minutes" if wall else ""
    return read_run(folder).get("command"), figures or None


def with_recipe(argv: list[str], expanding: tuple[str, ...] = ()) -> list[str]:
    """`--recipe NAME` -> the options in recipes/NAME.args, put first so that options given on the command line win.
    A recipe may name another (`--recipe vit-offline` in recipes/vit-distil.args): its options come first, then the
    recipe's own."""
    names = [argv[index + 1] for index, arg in enumerate(argv[:-1]) if arg == "--recipe"]
    recipe_args = []
    for name in names:
        path = RECIPES / f"{name}.args"
        if not path.is_file():
            raise SystemExit(
                f"No recipe '{name}' ({path} does not exist). "
                f"Recipes: {', '.join(sorted(p.stem for p in RECIPES.glob('*.args')))}."
            )
        if name in expanding:
            raise SystemExit(f"Recipe '{name}' names itself, through {' -> '.join(expanding)}.")
        recipe_args += with_recipe(shlex.split(path.read_text(), comments=True), (*expanding, name))
    return recipe_args + argv


def with_default_output_dir(argv: list[str]) -> list[str]:
    """`argv` with `--output_dir outputs/<family>-xray` added where none is given (cxr.models.default_output_dir)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    probe.add_argument("--output_dir", "--output-dir", default=None)
    probe.add_argument("--model", default=DEFAULT_CHECKPOINT)
    given, _ = probe.parse_known_args(argv)
    return argv if given.output_dir else [*argv, "--output_dir", default_output_dir(given.model)]


def search_hyperparameters(
    search_args: SearchArguments, training_args: TrainingArguments, model_init, trainer_parts: dict
) -> dict:
    """Optuna search through `Trainer.hyperparameter_search`, bounded by trials and minutes, on the validation split.
    Returns every trial (settings, validation macro-F1, state) and the best one's settings."""
    import optuna

    def hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 2e-3, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 0.01, 0.3, log=True),
            "warmup_steps": trial.suggest_float("warmup_steps", 0.0, 0.2),
        }

    args = dataclasses.replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / "search"),
        num_train_epochs=search_args.search_epochs,
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        report_to="none",
    )
    storage = optuna.storages.InMemoryStorage()  # kept here, so every trial can be listed afterwards
    trainer = XrayTrainer(model_init=model_init, args=args, **trainer_parts)
    started = time.monotonic()
    best = trainer.hyperparameter_search(
        direction="maximize",
        backend="optuna",
        hp_space=hp_space,
        n_trials=search_args.search_trials,
        compute_objective=lambda metrics: metrics["eval_macro_f1"],
        timeout=search_args.search_minutes * 60,
        sampler=optuna.samplers.TPESampler(seed=training_args.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        storage=storage,
        study_name="search",
    )
    trials = [
        {"number": trial.number, "state": trial.state.name, "validation_macro_f1": trial.value, **trial.params}
        for trial in optuna.load_study(study_name="search", storage=storage).trials
    ]
    print(
        f"\nHyperparameter search: {len(trials)} trials in {(time.monotonic() - started) / 60:.1f} min, "
        f"validation macro-F1 after {search_args.search_epochs:g} epochs:"
    )
    for trial in trials:
        settings = ", ".join(
            f"{name} {trial[name]:.3g}" for name in ("learning_rate", "weight_decay", "warmup_steps") if name in trial
        )
        print(
            f"  trial {trial['number']}: {trial['state'].lower():<8} "
            f"macro-F1 {trial['validation_macro_f1'] or float('nan'):.3f}  {settings}"
        )
    print(f"Training with the best: {best.hyperparameters}\n")
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {
        "trials": trials,
        "best": {
            "trial": int(best.run_id),
            "validation_macro_f1": best.objective,
            "hyperparameters": best.hyperparameters,
        },
        "epochs_per_trial": search_args.search_epochs,
        "train_samples_per_trial": len(trainer_parts["train_dataset"]),
        "minutes": (time.monotonic() - started) / 60,
    }


def check_free_space(output_dir: Path, model, training_args: TrainingArguments) -> None:
    """Exit with a clear message when the disk cannot hold this run's checkpoints and model folder (an estimate)."""
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    checkpoint = 3 * weights  # the weights and AdamW's two moment estimates
    # +1: the newest, before old ones are rotated out
    kept = 0 if training_args.save_strategy == "no" else (training_args.save_total_limit or 2) + 1
    needed = kept * checkpoint + weights + 100 * 2**20  # + the final model folder, plots and slack
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise SystemExit(
            f"Not enough free disk space for {output_dir}: {free / 2**20:,.0f} MiB free, "
            f"this run needs about {needed / 2**20:,.0f} MiB "
            f"({kept} checkpoints of {checkpoint / 2**20:,.0f} MiB, the model folder and some slack). "
            "Free some space, choose another --output_dir, or lower --save_total_limit."
        )


if __name__ == "__main__":
    main()
