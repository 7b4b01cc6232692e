"""Inference speed of model folders along every path the project offers, against the plain pipeline and the ceiling.

Also the app's latency for one request.

    python -m benchmarks.speed                                    # the shipped model (models/swiftformer-xray)
    python -m benchmarks.speed --model outputs/resnet-xray-30ep   # other trained folders instead (several allowed)
    python -m benchmarks.speed --presets scratch-base --model     # only architectures with random weights

Same model, same images (full-resolution JPEGs: decoding and resizing included), one path after another:
  plain pipeline    pipeline("image-classification")(path), one image at a time: where every user starts
  batched fp32      the project's predictor, every pixel decoded, batched: the reference the rows agree with
  + draft decode    JPEGs decoded at reduced scale (Image.draft) before resizing: predict.py's decode, from here on
  torch int8        Linear layers dynamically quantized to int8 by PyTorch    (predict.py --runtime torch-int8)
  ORT fp32          the forward pass run by ONNX Runtime                      (predict.py --runtime onnx)
  ORT int8          ONNX Runtime's int8 quantization of the same Linear layers (predict.py --runtime onnx-int8)
A path an architecture cannot take (no ONNX export) prints why instead of figures. The ONNX graphs
(cxr.onnx_runtime) are exported into the model folder before any path is timed, as a second run of the predictor
finds them, so no row includes the export. Each path runs in its own fresh worker process, so its peak memory (peak
RSS, torch and the model included) is its own.

Columns: images/s; speed-up over plain; share of the physical ceiling: the operations of one image's forward pass,
counted by torch's FlopCounterMode for whatever architecture the folder holds, against this machine's float32 matmul
rate (float32 rows) or, for the int8 rows, the Linear layers' operations at its int8 matmul rate under ONNX Runtime
and the rest at float32; peak memory; agreement with the batched fp32 row on the top-1 label and on the X-ray check's
verdict (cxr.ood; the folder must have the check). Agreement is counted, untimed, over the distinct timed images plus
--agreement_images training X-rays (224 px copies: 24 originals alone cannot show 99 %, one image is 4 %).
Last, "batch dp": the largest change of any probability when a batch of those images is scored one image at a time
(int8 activations are quantized per batch, so there a file's scores depend on the other files in its batch).

Under each model's rows: the runtimes that clear DEFAULT_BAR against plain there, the bar a runtime must clear on
the shipped model before it becomes predict.py's default (predict.DEFAULT_RUNTIME; docs/onnx.md).
Then single-request latency through the running app (gradio_client, without its per-request TLS set-up:
benchmarks.load.loopback_client) against the model's own forward time for one image, the app's own work, and the
same app answering at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning: see app.py

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.utils.logging import disable_progress_bar

from benchmarks.common import sample_benchmark_images
from cxr.features import OnnxExportError, forward_features
from cxr.labels import ID2LABEL
from cxr.models import PRESETS, SHIPPED_MODEL_DIR, build_model, input_size
from cxr.predictor import RUNTIMES

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray_originals"
KAGGLE_TRAIN = DEFAULT_IMAGES.parent / "chest_xray" / "train"
PLAIN = "plain pipeline, 1 at a time"
REFERENCE = "batched fp32"
# path name -> (predict.py's --runtime, draft decode); None: the plain pipeline
PATHS = {
    PLAIN: None,
    REFERENCE: ("torch", False),
    "batched fp32 + draft decode": ("torch", True),
    "torch int8 + draft decode": ("torch-int8", True),
    "ORT fp32 + draft decode": ("onnx", True),
    "ORT int8 + draft decode": ("onnx-int8", True),
}
# What a runtime must reach on the shipped model to become predict.py's default: its speed over the plain pipeline,
# its agreement with float32 on the top-1 label and on the X-ray check's verdict, and a file's probabilities that do
# not depend on the other files in its batch (predict.py and its Ray run promise each other the same rows to 1e-5;
# int8 activations quantized per batch do not keep that).
DEFAULT_BAR = dict(speedup=1.5, labels=0.995, verdicts=0.99, batch_effect=1e-5)


@dataclass
class Operations:
    """The operations of one image's forward pass, a multiply-add counted as 2 (the unit of the matmul rates)."""

    total: int
    linear: int  # those inside nn.Linear layers: what both int8 paths quantize (convolutions and attention stay float)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_operations(model: torch.nn.Module, image_size: int) -> Operations:
    """Count what `forward_features` (the predictor's forward pass) computes for one image, with torch's
    FlopCounterMode: matrix products, convolutions and attention, whatever the architecture."""
    # FlopCounterMode knows scaled_dot_product_attention by its GPU kernels only; on a CPU it runs this one, uncounted
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter, torch.inference_mode():
        forward_features(model.eval(), torch.zeros(1, 3, image_size, image_size))
    counts = counter.get_flop_counts()  # per module, named "<model class>.<module path>", plus "Global"
    root = type(model).__name__
    linear = sum(
        sum(counts.get(f"{root}.{name}", {}).values())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    return Operations(total=counter.get_total_flops(), linear=linear)


def ceiling(operations: Operations, float32_rate: float, int8_rate: float | None = None) -> float:
    """Images/s if every counted operation ran at this machine's matmul rate (GFLOP/s): all at the float32 rate, or,
    given `int8_rate`, the Linear layers' at that rate."""
    int8_share = operations.linear if int8_rate else 0
    seconds = (operations.total - int8_share) / (float32_rate * 1e9)
    if int8_rate:
        seconds += int8_share / (int8_rate * 1e9)
    return 1 / seconds


def runtimes_clearing_bar(rows: dict[str, dict], reference: dict) -> list[tuple[str, float, float, float]]:
    """(runtime, speed-up, label agreement, verdict agreement) of each draft-decode path that clears DEFAULT_BAR,
    fastest first; none without the X-ray check's verdicts."""
    plain = rows[PLAIN]
    cleared = []
    for path_name, row in rows.items():
        if PATHS[path_name] is None or not PATHS[path_name][1] or "error" in row:
            continue
        labels, verdicts = agreement(row, reference)
        speedup = row["rate"] / plain["rate"]
        if (
            verdicts is not None
            and speedup >= DEFAULT_BAR["speedup"]
            and labels >= DEFAULT_BAR["labels"]
            and verdicts >= DEFAULT_BAR["verdicts"]
            and row["batch_effect"] <= DEFAULT_BAR["batch_effect"]
        ):
            cleared.append((PATHS[path_name][0], speedup, labels, verdicts))
    return sorted(cleared, key=lambda entry: -entry[1])


def agreement(row: dict, reference: dict) -> tuple[float, float | None]:
    """Shares of the check images on which `row` gives the reference's top-1 label and its X-ray check verdict (None
    where either has no verdicts)."""
    labels = [a == b for a, b in zip(row["check_labels"], reference["check_labels"], strict=True)]
    pairs = list(zip(row["check_verdicts"], reference["check_verdicts"], strict=True))
    verdicts = None if any(None in pair for pair in pairs) else [a == b for a, b in pairs]
    return sum(labels) / len(labels), (sum(verdicts) / len(verdicts) if verdicts else None)


def matmul_gflops(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-multiply rate in `dtype` (2 n^3 FLOPs per product), best of a few runs."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def int8_matmul_gops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's int8 matrix-multiply rate as ONNX Runtime runs it (u8 x s8 -> int32, MatMulInteger: the kernel
    under its int8 path), in the unit of `matmul_gflops` (2 n^3 operations per product), best of a few runs."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).integers(-127, 128, (size, size), dtype=np.int8), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "W"], ["Y"])],
        "int8_matmul",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])],
        [weights],
    )
    graph = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
    session.run(None, {"A": a})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def worker(model_dir: str, path_name: str, images: list[Path], batch_size: int, check_images: list[Path]) -> dict:
    """Run one path over the images in this (fresh) process: top-1 labels, images/s, peak RSS; then, untimed,
    the top-1 labels and X-ray check verdicts of `check_images` (more real X-rays, for a finer agreement figure).
    A path this architecture cannot take returns its reason as "error"."""
    from transformers import pipeline

    from cxr.predictor import classify, load_classifier

    if PATHS[path_name] is None:
        plain = pipeline("image-classification", model=model_dir)

        def run(files: list[Path]) -> tuple[list[str], list[bool | None]]:
            return [plain(str(f), top_k=1)[0]["label"] for f in files], [None] * len(files)

        def batch_effect(files: list[Path]) -> None:
            return None

    else:
        runtime, draft = PATHS[path_name]
        try:
            classifier = load_classifier(model_dir, **RUNTIMES[runtime])
        except OnnxExportError as error:
            return dict(error=str(error).splitlines()[0])

        def run(files: list[Path]) -> tuple[list[str], list[bool | None]]:
            predictions = classify(classifier, files, batch_size=batch_size, draft=draft)
            return [p.top_label for p in predictions], [p.looks_like_chest_xray for p in predictions]

        def batch_effect(files: list[Path]) -> float:
            """The largest change of a probability between the files scored in one batch and each alone."""
            together = classify(classifier, files, batch_size=batch_size, draft=draft)
            alone = classify(classifier, files, batch_size=1, draft=draft)
            return max(
                (
                    abs(a.scores[label] - b.scores[label])
                    for a, b in zip(together, alone, strict=True)
                    if a.scores
                    for label in a.scores
                ),
                default=0.0,
            )

    run(images[:2])  # warm-up: first calls allocate and pick kernels
    start = time.perf_counter()
    run(images)
    rate = len(images) / (time.perf_counter() - start)
    peak_mib = peak_rss_mib()
    check_labels, check_verdicts = run(check_images)
    return dict(
        rate=rate,
        peak_mib=peak_mib,
        check_labels=check_labels,
        check_verdicts=check_verdicts,
        batch_effect=batch_effect(check_images[:batch_size]),
    )


def export_onnx(model_dir: str) -> None:
    """Write the folder's cached ONNX graphs (float32 and int8), so the ORT rows time and measure the memory of a
    load that finds them, as every load after the first does. In a process of its own, like the paths (its
    progress bars stay out of the table). An architecture that does not export leaves its error to the ORT rows."""
    code = (
        "from cxr.predictor import load_classifier\n"
        f"for int8 in (False, True): load_classifier({model_dir!r}, onnx=True, int8=int8)"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's peak across
    exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def forward_ms(model_dir: str, image_size: int, repeats: int = 10) -> float:
    """Median time of the model's own forward pass on one preprocessed image (no decoding)."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pixels = torch.randn(1, 3, image_size, image_size)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            model(pixel_values=pixels)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def app_work_ms(model_dir: str, image: Path, repeats: int = 10) -> float:
    """Median time of the app's own work for one upload, in this process: `app.answer_upload` (decode, forward pass with
    Grad-CAM, the X-ray check, the overlay), without Gradio's transport around it."""
    import app
    from cxr.predictor import load_classifier

    classifier = load_classifier(model_dir)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        app.answer_upload(classifier, str(image))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def app_latency(
    model_dir: str, image: Path, requests: int, no_work: bool = False, verify_tls: bool = False
) -> list[float]:
    """Milliseconds per request through the running app (gradio_client, one request at a time, loopback);
    `no_work`: through the same app answering at once (benchmarks.load.NO_WORK_APP)."""
    from gradio_client import handle_file

    from benchmarks.common import free_port
    from benchmarks.load import loopback_client, start_server

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="xray-latency-") as scratch:
        server = start_server(
            model_dir,
            port,
            Path(scratch) / "cache",
            Path(scratch) / "server.log",
            no_work_image=image if no_work else None,
        )
        try:
            client = loopback_client(f"http://127.0.0.1:{port}/", verify_tls)
            for _ in range(2):
                client.predict(handle_file(str(image)), api_name="/predict")
            times = []
            for _ in range(requests):
                start = time.perf_counter()
                client.predict(handle_file(str(image)), api_name="/predict")
                times.append(1000 * (time.perf_counter() - start))
            return times
        finally:
            server.terminate()
            server.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        nargs="*",
        default=[str(SHIPPED_MODEL_DIR)],
        help="Trained model folders to measure; --model with none measures only the --presets.",
    )
    parser.add_argument(
        "--presets",
        nargs="*",
        default=[],
        choices=PRESETS,
        metavar="PRESET",
        help=f"Architectures to measure too, built with random weights: {', '.join(PRESETS)}.",
    )
    parser.add_argument(
        "--images", type=Path, default=DEFAULT_IMAGES, help="Folder of X-ray images to time (full resolution)."
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="Pass over the images this many times (more images, steadier figures)."
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--agreement_images",
        type=int,
        default=500,
        help=(
            "Kaggle training X-rays (a fixed sample from the chest_xray/train/ folder beside the default --images) "
            "each path also labels, untimed, after the timed run: agreement is counted over them and the "
            "distinct timed images."
        ),
    )
    parser.add_argument(
        "--requests", type=int, default=20, help="Single requests sent through the app per model (0 skips the app)."
    )
    parser.add_argument(
        "--verify_tls",
        action="store_true",
        help=(
            "gradio_client's default: load the CA bundle for every HTTP request, though loopback HTTP has no TLS (see "
            "benchmarks.load.loopback_client)."
        ),
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "PATH"), help=argparse.SUPPRESS)
    return parser


def run_worker(args: argparse.Namespace, folder: str, path_name: str) -> dict:
    """`worker` for one path, in a fresh process with this run's options."""
    command = [sys.executable, "-m", "benchmarks.speed", "--images", str(args.images), "--repeat", str(args.repeat)]
    command += ["--batch_size", str(args.batch_size), "--agreement_images", str(args.agreement_images)]
    finished = subprocess.run([*command, "--worker", folder, path_name], capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{path_name} failed on {folder}:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> None:
    args = build_parser().parse_args()
    disable_progress_bar()  # loading weights, here and in the workers: the table is the output

    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")) * args.repeat
    if not images:
        raise SystemExit(f"No images in {args.images}")
    # The distinct timed images plus a fixed sample of training X-rays (none where that folder is absent).
    check_images = sample_benchmark_images(args.images, KAGGLE_TRAIN, args.agreement_images)
    if args.worker:
        print(json.dumps(worker(*args.worker, images, args.batch_size, check_images)))
        return
    missing = [folder for folder in args.model if not (Path(folder) / "config.json").is_file()]
    if missing:
        raise SystemExit(
            f"No trained model in {', '.join(missing)}: train it (README), name another with --model FOLDER, or "
            "measure only presets with --presets NAME --model"
        )

    from predict import DEFAULT_RUNTIME

    rate, int8_rate = matmul_gflops(), int8_matmul_gops()
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
        f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}; float32 matmul {rate:.0f} GFLOP/s, "
        f"int8 matmul (ONNX Runtime) {int8_rate:.0f} GOP/s; {len(images)} images from {args.images} timed; agreement "
        f"over {len(check_images)} distinct images ({len(check_images) - len(set(images))} more from {KAGGLE_TRAIN})\n"
    )
    with tempfile.TemporaryDirectory() as scratch:
        models = []
        for preset in args.presets:
            model, processor, _ = build_model(preset, ID2LABEL)
            model.save_pretrained(Path(scratch) / preset)
            processor.save_pretrained(Path(scratch) / preset)
            models.append((f"{preset} (random weights)", str(Path(scratch) / preset)))
        models += [(folder, folder) for folder in args.model]

        width = max(32, *(len(label) for label, _ in models))
        header = (
            f"{'model':<{width}} {'path':<28} {'images/s':>9} {'x plain':>8} {'% ceiling':>10} {'peak MiB':>9} "
            f"{'top-1 agree':>12} {'differ':>7} {'check agree':>12} {'batch dp':>9}"
        )
        print(header + "\n" + "-" * len(header))
        latencies = []
        for label, folder in models:
            image_size = input_size(AutoImageProcessor.from_pretrained(folder))
            operations = count_operations(AutoModelForImageClassification.from_pretrained(folder), image_size)
            float32_ceiling, int8_ceiling = ceiling(operations, rate), ceiling(operations, rate, int8_rate)
            export_onnx(folder)
            rows = {path_name: run_worker(args, folder, path_name) for path_name in PATHS}
            plain, reference = rows[PLAIN], rows[REFERENCE]
            for path_name, row in rows.items():
                if "error" in row:
                    print(f"{label:<{width}} {path_name:<28} {'cannot run: ' + row['error']}")
                    continue
                labels, verdicts = agreement(row, reference)
                differ = round((1 - labels) * len(check_images))
                own_ceiling = int8_ceiling if "int8" in path_name else float32_ceiling
                check = "—" if verdicts is None else f"{100 * verdicts:.1f}%"
                shift = "—" if row["batch_effect"] is None else f"{row['batch_effect']:.1e}"
                print(
                    f"{label:<{width}} {path_name:<28} {row['rate']:>9.2f} {row['rate'] / plain['rate']:>7.2f}x "
                    f"{100 * row['rate'] / own_ceiling:>9.0f}% {row['peak_mib']:>9.0f} "
                    f"{100 * labels:>11.1f}% {differ:>7} {check:>12} {shift:>9}"
                )
            print(
                f"{'':<{width}} ceiling = {rate:.0f} GFLOP/s / {operations.total / 1e9:.3g} GFLOP per image = "
                f"{float32_ceiling:.3g} images/s (float32 rows);"
            )
            print(
                f"{'':<{width}}           the Linear layers' {operations.linear / 1e9:.3g} GFLOP at "
                f"{int8_rate:.0f} GOP/s int8 = {int8_ceiling:.3g} images/s (int8 rows) = "
                f"{int8_ceiling / plain['rate']:.3g}x plain"
            )
            bar = (
                f">= {DEFAULT_BAR['speedup']}x plain, >= {100 * DEFAULT_BAR['labels']:g}% labels, "
                f">= {100 * DEFAULT_BAR['verdicts']:g}% X-ray check verdicts, "
                f"batch dp <= {DEFAULT_BAR['batch_effect']:g}"
            )
            if agreement(reference, reference)[1] is None:
                print(f"{'':<{width}} {bar}: not judged, this folder has no X-ray check\n")
            else:
                cleared = runtimes_clearing_bar(rows, reference)
                names = ", ".join(f"{name} ({speedup:.2f}x)" for name, speedup, _, _ in cleared) or "none"
                print(f"{'':<{width}} {bar} (predict.py's default now: {DEFAULT_RUNTIME}): {names}\n")
            if args.requests:
                times = sorted(app_latency(folder, images[0], args.requests, verify_tls=args.verify_tls))
                latencies.append(
                    (
                        label,
                        image_size,
                        forward_ms(folder, image_size),
                        app_work_ms(folder, images[0]),
                        statistics.median(times),
                        times[int(0.95 * (len(times) - 1))],
                    )
                )
        if latencies:  # the model loaded behind the no-work app does not matter: it never runs
            floor = sorted(
                app_latency(models[-1][1], images[0], args.requests, no_work=True, verify_tls=args.verify_tls)
            )

    if latencies:
        print(
            f"App latency, one request at a time through gradio_client ({args.requests} requests of {images[0].name}, "
            "prediction + Grad-CAM overlay):"
        )
        print(
            f"{'model':<32} {'input':>6} {'forward ms':>11} {'app work ms':>13} {'app p50 ms':>11} {'app p95 ms':>11} "
            f"{'p50 / forward':>14} {'transport ms':>13}"
        )
        for label, size, forward, work, p50, p95 in latencies:
            print(
                f"{label:<32} {size:>6} {forward:>11.0f} {work:>13.0f} {p50:>11.0f} {p95:>11.0f} "
                f"{p50 / forward:>13.2f}x {p50 - work:>13.0f}"
            )
        print(
            f"{'the same app, answering at once':<32} {'':>6} {'':>11} {0:>13} {statistics.median(floor):>11.0f} "
            f"{floor[int(0.95 * (len(floor) - 1))]:>11.0f} {'':>14} {statistics.median(floor):>13.0f}"
        )
        print(
            "app work: answer_upload(), the app's own work for one upload in-process (decode, forward with Grad-CAM, "
            "X-ray check, overlay);"
        )
        print(
            "transport: app p50 minus that, i.e. upload, Gradio's queue and events, the overlay's download, "
            "gradio_client."
        )
        print(
            "The last row is the same Interface with answer_upload() replaced by a ready answer: the floor no model "
            "can go under."
        )


if __name__ == "__main__":
    main()
