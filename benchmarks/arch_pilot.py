"""Architecture pilot: how fast each model preset trains and predicts, at candidate resolutions, before committing
an hour.

    python -m benchmarks.arch_pilot                                   # every comparison preset at its own resolution
    python -m benchmarks.arch_pilot --candidates scratch-swin scratch-swin@128:window_size=8 --threads 2
    python -m benchmarks.arch_pilot --candidates scratch-pvt --pilot_steps 40   # plus macro-F1 after 40 steps
    python -m benchmarks.arch_pilot --candidates scratch-pvt scratch-pvt+bf16   # float32 against bfloat16

A candidate is a preset of cxr/models.py (`--model` of train_vit.py), optionally `@SIZE` for another input side in
pixels, `+bf16` to run it under CPU bfloat16 autocast (as train_vit.py --bf16 --use_cpu does) and `:key=value` for
other config arguments (values as Python literals, e.g. `:depths=[2,2,4]`).

For each candidate, in a fresh process (so its peak memory is its own), with `--threads` torch threads:
- parameters;
- training images/s: `--train_steps` timed AdamW steps of batch `--batch_size` after `--warmup_steps` untimed ones,
  forward and backward with train_vit.py's class-weighted loss, each batch read through the project's own data path
  (cxr.images.load_image, the crop/rotation/exposure augmentation, the image processor: cxr.transforms.pixel_transform)
  by a single-process DataLoader, as Trainer reads it by default; the share of that time spent waiting for data;
- inference images/s: the model alone (eval mode, no gradients) on batches already preprocessed;
- peak resident memory of the process (Python, torch and the data included);
- minutes for 15 epochs of this data's training split at that rate (training only; evaluation each epoch is extra);
- with --pilot_steps N: validation macro-F1 after N training steps at vit-offline's learning rate (3e-4) on the
  patient-grouped validation split. A smoke signal only (a few hundred images seen): it shows that a family learns at
  all at that size, not which family wins.
Training rates depend on the machine's load: compare candidates measured in one run (the `vs ref` column divides
each by the reference preset's rate), and note `uptime` beside the figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
COMPARISON = [
    "scratch-small-p8",
    "scratch-resnet",
    "scratch-swin",
    "scratch-pvt",
    "scratch-mobilevit",
    "scratch-cvt",
    "scratch-levit",
    "scratch-swiftformer",
]
EPOCHS = 15  # vit-offline's budget, against which each rate is turned into minutes
PILOT_LEARNING_RATE = 3e-4  # vit-offline's


@dataclass
class Candidate:
    spec: str  # as given: preset[@size][+bf16][:key=value...]
    preset: str
    overrides: dict
    bf16: bool = False

    @classmethod
    def parse(cls, spec: str) -> Candidate:
        head, *pairs = spec.split(":")
        head, _, precision = head.partition("+")
        if precision not in ("", "bf16"):
            raise argparse.ArgumentTypeError(f"'+{precision}' in '{spec}': the only precision suffix is +bf16")
        preset, _, size = head.partition("@")
        overrides = {"image_size": int(size)} if size else {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if not value:
                raise argparse.ArgumentTypeError(f"'{pair}' in '{spec}' is not key=value")
            overrides[key] = ast.literal_eval(value)
        from cxr.models import PRESETS

        if preset not in PRESETS:
            raise argparse.ArgumentTypeError(f"No preset '{preset}'. Presets: {', '.join(PRESETS)}.")
        return cls(spec, preset, overrides, bf16=precision == "bf16")


@dataclass
class Measurement:
    spec: str
    architecture: str
    image_size: int
    parameters_m: float
    train_images_per_s: float
    data_wait_share: float
    infer_images_per_s: float
    peak_memory_mib: float
    minutes_for_15_epochs: float
    macro_f1: float | None = None


def measure(candidate: Candidate, prepared_dir: str, args: argparse.Namespace) -> Measurement:
    """One candidate, in its own process: see the module docstring for what is measured and how."""
    import torch

    torch.set_num_threads(args.threads)
    from sklearn.metrics import f1_score

    from cxr.labels import DISPLAY_NAMES
    from cxr.models import build_preset
    from cxr.training import class_weights, peak_memory_mib, weighted_loss
    from cxr.transforms import collate, pixel_transform
    from hf_data import load_prepared

    dataset = load_prepared(prepared_dir)
    class_keys = dataset["train"].features["label"].names
    id2label = {index: DISPLAY_NAMES[key] for index, key in enumerate(class_keys)}
    torch.manual_seed(0)
    model, processor = build_preset(candidate.preset, id2label, **candidate.overrides)
    loss_fn = weighted_loss(class_weights(dataset["train"]["label"], len(class_keys)), label_smoothing=0.1)
    train = dataset["train"].with_transform(pixel_transform(processor, augment=True))
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=PILOT_LEARNING_RATE, weight_decay=0.05)

    def precision():  # the loss too, as Trainer computes it inside the same autocast as the forward pass
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=candidate.bf16)

    def step(batch) -> None:
        with precision():
            loss = loss_fn(model(pixel_values=batch["pixel_values"]), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    batches = iter(loader)
    data_seconds = 0.0
    for index in range(max(args.warmup_steps + args.train_steps, args.pilot_steps)):
        if index == args.warmup_steps:
            start, data_seconds = time.perf_counter(), 0.0
        fetch = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        data_seconds += time.perf_counter() - fetch
        step(batch)
        # the rate is over these steps; any later ones are pilot training
        if index == args.warmup_steps + args.train_steps - 1:
            train_seconds, train_data_seconds = time.perf_counter() - start, data_seconds
    train_rate = args.train_steps * args.batch_size / train_seconds

    model.eval()
    validation = dataset["validation"].with_transform(pixel_transform(processor, augment=False))
    eval_loader = torch.utils.data.DataLoader(validation, batch_size=args.batch_size, collate_fn=collate)
    predictions, labels, infer_seconds, infer_images = [], [], 0.0, 0
    with torch.inference_mode():
        for index, batch in enumerate(eval_loader):
            if not args.pilot_steps and index >= args.infer_batches + 1:
                break
            began = time.perf_counter()
            with precision():
                logits = model(pixel_values=batch["pixel_values"]).logits
            if index > 0:  # the first batch is a warm-up
                infer_seconds += time.perf_counter() - began
                infer_images += len(logits)
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    macro_f1 = float(f1_score(labels, predictions, average="macro")) if args.pilot_steps else None
    size = candidate.overrides.get("image_size") or processor.size.height
    return Measurement(
        spec=candidate.spec,
        architecture=type(model).__name__.removesuffix("ForImageClassification"),
        image_size=int(size),
        parameters_m=model.num_parameters() / 1e6,
        train_images_per_s=train_rate,
        data_wait_share=train_data_seconds / train_seconds,
        infer_images_per_s=infer_images / infer_seconds if infer_seconds else float("nan"),
        peak_memory_mib=peak_memory_mib(),
        minutes_for_15_epochs=EPOCHS * len(dataset["train"]) / train_rate / 60,
        macro_f1=macro_f1,
    )


def prepare(data_dir: Path) -> str:
    """The prepared imagefolder tree of `data_dir` that train_vit.py uses (same default folder and split), made if
    missing."""
    import tempfile

    from transformers import TrainingArguments

    from hf_data.loading import DataArguments, default_prepared_dir, prepare_and_load

    data_args = DataArguments(data_dir=str(data_dir))
    with tempfile.TemporaryDirectory() as scratch:
        prepare_and_load(data_args, TrainingArguments(output_dir=scratch, report_to="none"))
    return str(
        default_prepared_dir(
            data_args.source, data_args.validation_fraction, data_args.split_seed, data_args.keep_kaggle_val
        )
    )


def table(rows: list[Measurement], reference: Measurement | None, args: argparse.Namespace) -> str:
    f1 = args.pilot_steps > 0
    header = [
        "candidate",
        "network",
        "px",
        "params (M)",
        "train img/s",
        "vs ref",
        "data wait",
        "infer img/s",
        "peak MiB",
        "min / 15 ep",
    ]
    header += [f"macro-F1 @{args.pilot_steps} steps"] if f1 else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        relative = f"{row.train_images_per_s / reference.train_images_per_s:.2f}" if reference else "-"
        cells = [
            f"`{row.spec}`",
            row.architecture,
            str(row.image_size),
            f"{row.parameters_m:.2f}",
            f"{row.train_images_per_s:.1f}",
            relative,
            f"{100 * row.data_wait_share:.0f}%",
            f"{row.infer_images_per_s:.0f}",
            f"{row.peak_memory_mib:.0f}",
            f"{row.minutes_for_15_epochs:.0f}",
        ]
        cells += [f"{row.macro_f1:.3f}"] if f1 else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n", 1)[0].split()),  # the first paragraph, on one line
        epilog="\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        type=Candidate.parse,
        default=None,
        metavar="PRESET[@SIZE][+bf16][:KEY=VALUE]",
        help=f"What to measure (default: {' '.join(COMPARISON)}).",
    )
    parser.add_argument(
        "--reference",
        default="scratch-small-p8",
        help="Candidate (as written) whose training rate the 'vs ref' column divides by; measured first if not listed.",
    )
    parser.add_argument(
        "--data_dir", type=Path, default=REAL_DATA, help="The X-ray folder, as train_vit.py's --data_dir."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, torch_threads_default()),
        help="torch threads per candidate (train_vit.py uses all cores).",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="Images per training step (train_vit.py's default) and per inference batch.",
    )
    parser.add_argument("--warmup_steps", type=int, default=1, help="Untimed training steps first.")
    parser.add_argument("--train_steps", type=int, default=3, help="Timed training steps.")
    parser.add_argument("--infer_batches", type=int, default=2, help="Timed inference batches (after one untimed).")
    parser.add_argument(
        "--pilot_steps",
        type=int,
        default=0,
        help="If > 0: train this many steps in all, then score macro-F1 on the whole validation split.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the measurements here.")
    return parser


def main(argv: list[str] | None = None) -> list[Measurement]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pilot_steps and args.pilot_steps < args.warmup_steps + args.train_steps:
        parser.error("--pilot_steps must be at least --warmup_steps + --train_steps")
    if not args.data_dir.is_dir():
        parser.error(
            f"No data at {args.data_dir}: give --data_dir (the Kaggle chest_xray folder or folders split by class)."
        )

    candidates = args.candidates or [Candidate.parse(spec) for spec in COMPARISON]
    if args.reference and args.reference not in [c.spec for c in candidates]:
        candidates.insert(0, Candidate.parse(args.reference))
    prepared_dir = prepare(args.data_dir)
    print(
        f"{len(candidates)} candidates, {args.threads} torch thread(s), batch {args.batch_size}, data {args.data_dir}; "
        f"load: {load_average()}",
        flush=True,
    )
    rows = []
    for candidate in candidates:
        began = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh process: its own peak memory
            row = pool.submit(measure, candidate, prepared_dir, args).result()
        rows.append(row)
        print(
            f"  {candidate.spec}: {row.train_images_per_s:.1f} train img/s, {row.infer_images_per_s:.0f} infer img/s "
            f"({time.perf_counter() - began:.0f} s; load {load_average()})",
            flush=True,
        )
    reference = next((row for row in rows if row.spec == args.reference), None)
    print()
    print(table(rows, reference, args))
    print(f"\nLoad average at the end (1, 5, 15 min): {load_average()} on {os.cpu_count()} cores.")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return rows


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def torch_threads_default() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


if __name__ == "__main__":
    main()
