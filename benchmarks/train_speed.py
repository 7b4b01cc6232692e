"""Training throughput per model family, against this machine's ceiling: the data path alone, the training step
alone, and steps through train_vit.py's Trainer path with its data; each family's training operations per image and
the share of the matmul rate an epoch reaches.

    python -m benchmarks.train_speed                                # the default recipe's two networks, real data
    python -m benchmarks.train_speed --families scratch-small-p8 --steps 10 --precision fp32
    python -m benchmarks.train_speed --workers 0 2 --compile        # also DataLoader workers and torch.compile
    python -m benchmarks.train_speed --release_memory               # glibc's default allocation, for comparison

For each family (a preset of cxr.models; by default the two of the README's offline default, `--recipe vit-offline
--model scratch-resnet` then `--recipe swiftformer-distil`, whose student also runs the teacher's forward pass):
  data path, images/s:   the training data path alone, batches of --batch_size through a DataLoader:
                         PIL: the path before issue 36 (decode every file every epoch, augment in PIL, then the
                         image processor), kept here as the reference; files: decode every file, augment the batch
                         as tensors (train_vit.py --pixel_cache false); cache: read cxr.pixel_cache's uint8 rows,
                         augment the batch as tensors (train_vit.py's default)
  step, images/s:        forward + backward + AdamW on one fixed batch, no data: NCHW, channels-last (what
                         train_vit.py does to networks with convolutions), torch.compile of that (--compile; its
                         compile time apart, WRONG where its first loss is not the eager step's); and its
                         convolutions and matmuls alone, by torch.profiler: their share of the step's time, the rate
                         the step would reach were the rest (normalisation, activations, optimizer) to take no time,
                         and the three other operations that take most
  Trainer, images/s:     --steps optimizer steps through XrayTrainer as train_vit.py builds it (cached data,
                         augmentation, class-weighted loss, channels-last, the teacher where there is one), per
                         --workers: what a training epoch runs at; and before issue 36 (PIL data path, NCHW)
Every rate is the median batch or step (other processes sharing the CPU make outliers); the matmul rate is the best
of a few products, measured at the start and again after each family, whose shares use the best so far.
  GFLOP per image:       a training step's operations for one image (forward + backward by torch's FlopCounterMode,
                         as benchmarks.speed counts the forward pass; + the teacher's forward), a multiply-add = 2
  share of the rate:     Trainer images/s x GFLOP per image / this machine's matmul rate (float32, or bfloat16 where
                         --precision chooses it: cxr.precision)
Real data is the Kaggle training split (REAL_DATA), prepared once under a temporary folder; a synthetic set where
it is absent.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageEnhance
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from benchmarks.speed import _cpu_attention_flops, count_operations, matmul_gflops
from cxr.images import load_image
from cxr.labels import DISPLAY_NAMES
from cxr.models import PRESETS, build_model, input_size
from cxr.pixel_cache import PixelCache
from cxr.precision import PRECISIONS, describe, resolve_precision
from cxr.training import XrayTrainer, class_weights, keep_freed_memory, weighted_loss
from cxr.transforms import collate, pixel_transform
from hf_data import load_prepared, make_synthetic_dataset, prepare_dataset
from train_vit import channels_last

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
DEFAULT_FAMILIES = ["scratch-resnet", "scratch-swiftformer"]  # the README's offline default: teacher, then student
DEFAULT_TEACHER = "scratch-resnet"  # --recipe swiftformer-distil distils from the ResNet the first step trains


def training_data(workdir: Path, data: str):
    """(source, prepared tree, DatasetDict): the real training split where present, else a synthetic set."""
    if data == "synthetic" or not Path(data).is_dir():
        source = make_synthetic_dataset(workdir / "synthetic", images_per_class=100)
    else:
        source = Path(data)
    prepared = workdir / "prepared"
    prepare_dataset(source, prepared)
    return source, prepared, load_prepared(prepared)


# ---- the data path ---------------------------------------------------------------------------------------------


def pil_reference_transform(processor, teacher_processor=None):
    """The training data path before issue 36, as the reference the new one is timed against: every file decoded by
    the one loader, augmented one image at a time in PIL (crop, rotation, brightness, contrast, gamma), then the
    image processor (and the teacher's). Training no longer uses it."""

    def augment(image: Image.Image, size: int) -> Image.Image:
        width, height = image.size
        area, aspect = random.uniform(0.75, 1.0), math.exp(random.uniform(math.log(0.9), math.log(1.1)))
        crop_width = min(width, round(math.sqrt(area * width * height * aspect)))
        crop_height = min(height, round(math.sqrt(area * width * height / aspect)))
        left, top = random.randint(0, width - crop_width), random.randint(0, height - crop_height)
        image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + crop_width, top + crop_height))
        image = image.rotate(random.uniform(-10, 10), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        image = ImageEnhance.Brightness(image).enhance(random.uniform(0.8, 1.2))
        image = ImageEnhance.Contrast(image).enhance(random.uniform(0.8, 1.2))
        gamma = random.uniform(0.8, 1.25)
        return image.point([round(255 * (value / 255) ** gamma) for value in range(256)] * len(image.getbands()))

    size = max(input_size(processor), input_size(teacher_processor) if teacher_processor else 0)

    def transform(batch):
        images = [load_image(item["path"] or item["bytes"], draft_size=size) for item in batch["image"]]
        images = [augment(image, size) for image in images]
        result = {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch["label"]}
        if teacher_processor is not None:
            result["teacher_pixel_values"] = teacher_processor(images, return_tensors="pt")["pixel_values"]
        return result

    return transform


def data_rate(dataset, batch_size: int, batches: int, workers: int = 0) -> float:
    """Images/s of the data path alone: shuffled batches through a DataLoader, collated, nothing else (the median
    batch: another process's burst on a shared machine does not count)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True, num_workers=workers
    )
    iterator = iter(loader)
    next(iterator)  # workers started, first batch made
    seconds = []
    for _ in range(batches):
        start = time.perf_counter()
        next(iterator)
        seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


# ---- the training step -------------------------------------------------------------------------------------------


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def training_operations(model: torch.nn.Module, image_size: int) -> int:
    """The operations of one training image: forward and backward, counted by torch's FlopCounterMode (with the
    CPU's fused attention kernel counted as benchmarks.speed counts it)."""
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    model.train()
    with counter:
        logits = model(pixel_values=torch.zeros(2, 3, image_size, image_size)).logits  # 2: batch norm needs > 1
        logits.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // 2


def step_rate(model, batch: dict, bf16: bool, steps: int, compiled: bool = False) -> tuple[float, float, float]:
    """Images/s of forward + backward + AdamW on one fixed batch (the median step), the seconds the first two steps
    took (torch.compile's compilation, where asked), and the first step's loss (to check a compiled step computes
    what the eager one does)."""
    step = training_step(torch.compile(model) if compiled else model, model, batch, bf16)
    seconds, losses = [], []
    for _ in range(2 + steps):
        start = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
    return len(batch["labels"]) / statistics.median(seconds[2:]), sum(seconds[:2]), losses[0]


def training_step(forward, model, batch: dict, bf16: bool) -> Callable[[], float]:
    """One optimizer step on `batch`: `forward` (the model, or its compiled form), the class-weighted loss, backward,
    AdamW; the step returns its loss."""
    loss_fn = weighted_loss(torch.ones(len(DISPLAY_NAMES)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = forward(pixel_values=batch["pixel_values"])
        loss = loss_fn({"logits": outputs.logits.float()}, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


# the kernels that do a step's counted operations (FlopCounterMode counts convolutions, matrix products, attention)
KERNELS = ("convolution", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product")


def kernel_share(model, batch: dict, bf16: bool, steps: int) -> tuple[float, float, list[tuple[str, float]]]:
    """(images/s the step's convolution and matrix-product kernels alone reach, their share of the step's time, the
    three other operations that take the most of it with their shares), by torch.profiler over `steps` steps after
    two untimed ones: the bound on the step were everything else (normalisation, activations, the optimizer, the
    framework between kernels) to take no time, and what that everything else is."""
    step = training_step(model, model, batch, bf16)
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            step()
    events = profile.key_averages()
    is_kernel = {event.key: any(name in event.key for name in KERNELS) for event in events}
    kernels = sum(event.self_cpu_time_total for event in events if is_kernel[event.key])
    total = sum(event.self_cpu_time_total for event in events)
    others = sorted(
        (event for event in events if not is_kernel[event.key]),
        key=lambda event: event.self_cpu_time_total,
        reverse=True,
    )
    largest = [(event.key.removeprefix("aten::"), event.self_cpu_time_total / total) for event in others[:3]]
    return len(batch["labels"]) * steps / (kernels / 1e6), kernels / total, largest


def trainer_rate(
    model, processor, dataset, loss_fn, args: argparse.Namespace, bf16: bool, workers: int, output_dir: str, teacher
) -> float:
    """Images/s of XrayTrainer as train_vit.py configures it, with its data: the median time from one step's end to
    the next's (data, forward, backward, optimizer, the Trainer's own work), after the warm-up steps."""
    times = []

    class StepClock(TrainerCallback):
        def on_step_end(self, arguments, state, control, **kwargs):
            if state.global_step >= args.warmup:
                times.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=10_000,
        dataloader_drop_last=True,
        dataloader_num_workers=workers,
        dataloader_pin_memory=False,
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),
    )
    trainer = XrayTrainer(
        model=model,
        args=training_args,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=processor,
        compute_loss_func=loss_fn,
        callbacks=[StepClock()],
        teacher=teacher,
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would split the table
    trainer.train()
    return args.batch_size / statistics.median(later - earlier for earlier, later in itertools.pairwise(times))


def has_convolutions(model: torch.nn.Module) -> bool:
    """Whether train_vit.channels_last converts the network."""
    return any(isinstance(module, torch.nn.Conv2d) for module in model.modules())


# ---- the report --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=DEFAULT_FAMILIES,
        choices=list(PRESETS),
        metavar="PRESET",
        help=f"Presets to time, one per family (default: {' '.join(DEFAULT_FAMILIES)}; any of {', '.join(PRESETS)}).",
    )
    parser.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        metavar="PRESET",
        help="A preset whose forward pass every other family's Trainer steps also run, as --recipe "
        "swiftformer-distil's student runs its ResNet teacher's (random weights: the cost is the same); "
        f"'none' for no teacher (default: {DEFAULT_TEACHER}).",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Images per step (train_vit.py's default: 32).")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps (and data batches) per row.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed Trainer steps first.")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=list(PRECISIONS),
        help="As train_vit.py's --precision: auto is bfloat16 autocast where the CPU computes it natively "
        "(cxr.precision), float32 elsewhere.",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        type=int,
        default=[0],
        help="DataLoader worker processes to time the Trainer with (train_vit.py's default: 0), e.g. 0 2.",
    )
    parser.add_argument(
        "--compile", action="store_true", help="Also time the step under torch.compile (compiling takes minutes)."
    )
    parser.add_argument(
        "--release_memory",
        action="store_true",
        help="Leave glibc to give freed memory back to the system, its default, to see what that costs; train_vit.py "
        "keeps it for the next step (cxr.training.keep_freed_memory), and so does this benchmark without the flag.",
    )
    parser.add_argument(
        "--data",
        default=str(REAL_DATA),
        help="The X-ray folder to prepare and read, or 'synthetic' for generated stand-ins (also where the folder is "
        "absent). Default: the Kaggle training split beside the checkout.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    precision = resolve_precision(["--precision", args.precision])[1]
    bf16 = precision["precision"] == "bf16"
    teacher_name = None if args.teacher == "none" else args.teacher
    if teacher_name is not None and teacher_name not in PRESETS:
        raise SystemExit(f"--teacher {teacher_name}: not a preset ({', '.join(PRESETS)}) or 'none'.")
    kept = not args.release_memory and keep_freed_memory()
    float32_rate = matmul_gflops()
    bf16_rate = matmul_gflops(dtype=torch.bfloat16) if bf16 else None
    rate = bf16_rate or float32_rate

    with tempfile.TemporaryDirectory() as workdir:
        source, prepared, dataset = training_data(Path(workdir), args.data)
        train = dataset["train"]
        class_keys = train.features["label"].names
        id2label = {index: DISPLAY_NAMES[key] for index, key in enumerate(class_keys)}
        loss_fn = weighted_loss(class_weights(train["label"], len(class_keys)))
        print(
            f"\nCPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, load average "
            f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}; {describe(precision)}; freed memory "
            + ("kept for the next step, as train_vit.py does\n" if kept else "given back to the system\n")
            + f"matmul: float32 {float32_rate:.0f} GFLOP/s"
            + (f", bfloat16 {bf16_rate:.0f} GFLOP/s" if bf16_rate else "")
            + f"\ndata: {source} ({len(train)} training images), batch {args.batch_size}, {args.steps} timed steps\n"
        )
        for name in args.families:
            rate = report_family(name, args, prepared, train, id2label, loss_fn, bf16, rate, teacher_name, workdir)


def report_family(name, args, prepared, train, id2label, loss_fn, bf16, rate, teacher_name, workdir) -> float:
    """Time one family and print its rows; returns the ceiling, the best matmul rate measured so far (measured again
    after the family's rows: other processes sharing the CPU lower a single measurement)."""
    torch.manual_seed(0)
    model, processor, _ = build_model(name, id2label)
    size = input_size(processor)
    teacher, teacher_processor, teacher_operations = None, None, 0
    if teacher_name and teacher_name != name:
        teacher, teacher_processor, _ = build_model(teacher_name, id2label)
        teacher_operations = count_operations(teacher, input_size(teacher_processor)).total
    operations = training_operations(model, size)
    forward = count_operations(model, size).total
    per_image = (operations + teacher_operations) / 1e9
    with_teacher = f" + {teacher_name}'s forward pass {teacher_operations / 1e9:.2f}" if teacher else ""
    rows = []  # (label, images/s, the note given the ceiling): printed once the ceiling is measured again

    def row(label: str, images_per_second: float, note=lambda rate: "") -> None:
        rows.append((label, images_per_second, note))

    def share(images_per_second: float, gflop: float) -> Callable[[float], str]:
        return lambda rate: f"{100 * images_per_second * gflop / rate:.0f}% of the matmul rate"

    cache = PixelCache(prepared, [processor, teacher_processor])
    paths = {
        "data path: PIL, every file (before)": pil_reference_transform(processor, teacher_processor),
        "data path: every file, tensor augment": pixel_transform(processor, True, teacher_processor),
        "data path: cache, tensor augment": pixel_transform(processor, True, teacher_processor, cache=cache),
    }
    for label, transform in paths.items():
        row(label, data_rate(train.with_transform(transform), args.batch_size, args.steps))

    batch = collate(train.select(range(args.batch_size)).with_transform(pixel_transform(processor, False, cache=cache)))
    precision = "bf16" if bf16 else "fp32"

    def fresh_model(memory_format=channels_last):  # train_vit.py's: channels-last where it has convolutions
        torch.manual_seed(0)
        return memory_format(build_model(name, id2label)[0])

    step, _, eager_loss = step_rate(fresh_model(lambda model: model), batch, bf16, args.steps)
    row(f"step alone, NCHW ({precision})", step, share(step, operations / 1e9))
    if has_convolutions(model):
        fast, _, _ = step_rate(fresh_model(), batch, bf16, args.steps)
        row(
            f"step alone, channels-last ({precision})",
            fast,
            lambda rate: f"{fast / step:.2f}x NCHW, {share(fast, operations / 1e9)(rate)}",
        )
    kernels, kernel_time, largest_others = kernel_share(fresh_model(), batch, bf16, args.steps)
    others = ", ".join(f"{name} {100 * fraction:.0f}%" for name, fraction in largest_others)
    row(
        f"step alone, convs and matmuls only ({precision})",
        kernels,
        lambda rate: (
            f"{100 * kernel_time:.0f}% of the step's time; {share(kernels, operations / 1e9)(rate)}; "
            f"the rest led by {others}"
        ),
    )
    if args.compile:
        compiled, seconds, compiled_loss = step_rate(fresh_model(), batch, bf16, args.steps, compiled=True)
        # same weights and batch: another first loss means the compiled step computes something else
        wrong = not math.isclose(compiled_loss, eager_loss, rel_tol=1e-2)
        row(
            f"step alone, torch.compile ({precision})",
            compiled,
            lambda rate: (
                f"{compiled / step:.2f}x NCHW, compiled in {seconds:.0f} s (of channels-last where converted)"
                + (f"; WRONG: its first loss {compiled_loss:.4g} against {eager_loss:.4g} eager" if wrong else "")
            ),
        )

    before = train.with_transform(pil_reference_transform(processor, teacher_processor))
    dataset = train.with_transform(pixel_transform(processor, True, teacher_processor, cache=cache))
    runs = [("before: PIL data, NCHW, 0 workers", before, lambda model: model, 0)]
    runs += [(f"{workers} workers", dataset, channels_last, workers) for workers in args.workers]
    for label, data, memory_format, workers in runs:
        teacher = memory_format(copy.deepcopy(teacher)) if teacher is not None else None
        images = trainer_rate(
            fresh_model(memory_format), processor, data, loss_fn, args, bf16, workers, f"{workdir}/t-{name}", teacher
        )
        row(
            f"Trainer with data, {label} ({precision})",
            images,
            lambda rate, images=images: (
                f"{images * per_image:.0f} GFLOP/s = {share(images, per_image)(rate)}; "
                f"an epoch of {len(train)} images in {len(train) / images / 60:.1f} min"
            ),
        )

    rate = max(rate, matmul_gflops(dtype=torch.bfloat16 if bf16 else torch.float32))
    print(
        f"{name}: {type(model).__name__}, {size} px, {model.num_parameters() / 1e6:.2f} M parameters; "
        f"{per_image:.2f} GFLOP per training image (forward {forward / 1e9:.2f} + backward "
        f"{(operations - forward) / 1e9:.2f}{with_teacher}); matmul rate {rate:.0f} GFLOP/s (best so far)"
    )
    for label, images_per_second, note in rows:
        print(f"  {label:<44} {images_per_second:>8.1f} images/s  {note(rate)}")
    print(flush=True)
    return rate


if __name__ == "__main__":
    main()
