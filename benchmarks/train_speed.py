"""Training throughput: train_vit.py's Trainer path against a minimal plain PyTorch loop, same model, batch and data.

    python -m benchmarks.train_speed                     # scratch-small on the real data set
                                                         # (REAL_DATA; synthetic if absent)
    python -m benchmarks.train_speed --model scratch-base --steps 10

Both loops use the same dataset object (the project's image loader + augmentation + image processor), the same
batch size, AdamW and class-weighted loss; both run `--steps` optimizer steps after a few warm-up steps.
Prints samples/s of each and the Trainer's overhead, plus how much of a step is data loading.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from cxr.labels import DISPLAY_NAMES
from cxr.models import PRESETS, build_model
from cxr.training import XrayTrainer, class_weights, weighted_loss
from cxr.transforms import collate, pixel_transform
from hf_data import load_prepared, make_synthetic_dataset, prepare_dataset

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


def training_data(workdir: Path):
    source = REAL_DATA if REAL_DATA.is_dir() else make_synthetic_dataset(workdir / "synthetic", images_per_class=100)
    prepared = workdir / "prepared"
    prepare_dataset(source, prepared)
    return source, load_prepared(prepared)["train"]


def plain_loop(model, dataset, loss_fn, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Samples/s of a bare DataLoader + AdamW loop, and the share of time spent waiting for data."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    batches = iter(loader)
    data_seconds = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start, data_seconds = time.perf_counter(), 0.0
        fetch = time.perf_counter()
        batch = next(batches)
        data_seconds += time.perf_counter() - fetch
        outputs = model(pixel_values=batch["pixel_values"])
        loss = loss_fn(outputs, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return steps * batch_size / seconds, data_seconds / seconds


def trainer_loop(
    model, processor, dataset, loss_fn, batch_size: int, steps: int, warmup: int, output_dir: str
) -> float:
    """Samples/s of the Trainer as train_vit.py configures it, timed between the warm-up and the last step."""
    times = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                times[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=warmup + steps,
        learning_rate=1e-3,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=10_000,
        dataloader_drop_last=True,
    )
    trainer = XrayTrainer(
        model=model,
        args=args,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=processor,
        compute_loss_func=loss_fn,
        callbacks=[StepClock()],
    )
    trainer.train()
    return steps * batch_size / (times[warmup + steps] - times[warmup])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="scratch-small", choices=list(PRESETS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="Timed optimizer steps per loop.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        source, train = training_data(Path(workdir))
        class_keys = train.features["label"].names
        id2label = {index: DISPLAY_NAMES[key] for index, key in enumerate(class_keys)}
        loss_fn = weighted_loss(class_weights(train["label"], len(class_keys)))
        print(
            f"{args.model}, batch {args.batch_size}, {args.steps} timed steps, {torch.get_num_threads()} threads, data "
            f"{source}\n"
        )

        torch.manual_seed(0)
        model, processor, _ = build_model(args.model, id2label)
        dataset = train.with_transform(pixel_transform(processor, augment=True))
        plain_rate, data_share = plain_loop(model, dataset, loss_fn, args.batch_size, args.steps, args.warmup)

        torch.manual_seed(0)
        model, processor, _ = build_model(args.model, id2label)
        trainer_rate = trainer_loop(
            model, processor, dataset, loss_fn, args.batch_size, args.steps, args.warmup, workdir + "/trainer"
        )

    print(f"{'loop':<22} {'samples/s':>10}")
    print(f"{'plain PyTorch':<22} {plain_rate:>10.1f}   ({100 * data_share:.0f}% of its time waiting for data)")
    print(
        f"{'Trainer (train_vit)':<22} {trainer_rate:>10.1f}   ({100 * (trainer_rate / plain_rate - 1):+.1f}% vs plain)"
    )


if __name__ == "__main__":
    main()
