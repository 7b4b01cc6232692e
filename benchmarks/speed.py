"""Inference speed: the plain one-image-at-a-time pipeline against the project's batched paths, and the app's latency.

    python -m benchmarks.speed                          # ViT-B/16 (random weights) and scratch-small on the X-rays
                                                        # in --images
    python -m benchmarks.speed --model outputs/vit-xray # also a trained model folder (top-1 agreement means most here)

Same model, same images (full-resolution JPEGs: decoding and resizing included), one path after another:
  plain pipeline   pipeline("image-classification")(path) one image at a time: where every user starts
  batched fp32     the project's predictor, every pixel decoded, batched      : must agree 100% with plain
  + draft decode   JPEGs decoded at reduced scale (Image.draft) before resizing: approximate, must agree >= 99%
  + int8           Linear layers dynamically quantized to int8                : must agree >= 99%
  ORT fp32         draft decode, the forward pass run by ONNX Runtime         : must agree >= 99% (the decode)
  ORT int8         the same with ONNX Runtime's int8 quantization             : must agree >= 99%
The ONNX graphs (cxr.onnx_runtime) are exported into the model folder before any path is timed, as a second
run of the predictor finds them, so no row includes the export.
Each path runs in its own fresh worker process, so its peak memory (peak RSS, torch and the model included)
is its own. Prints images/s, speed-up over plain, share of the physical ceiling (FLOPs per image against this
machine's float32 matmul rate for float32 rows, its int8 matmul rate under ONNX Runtime for int8 rows), peak
memory and top-1 agreement with plain. Agreement is counted, untimed, over the distinct timed images plus
--agreement_images training X-rays (224 px copies: 24 originals alone cannot show 99%, one image is 4%).
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
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning: see app.py

import torch  # noqa: E402
from transformers import AutoConfig

from benchmarks.common import sample_benchmark_images
from cxr.labels import ID2LABEL
from cxr.models import PRESETS, build_model

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray_originals"
KAGGLE_TRAIN = DEFAULT_IMAGES.parent / "chest_xray" / "train"
LABELS = ID2LABEL
PATHS = [
    "plain pipeline, 1 at a time",
    "batched fp32",
    "batched fp32 + draft decode",
    "batched int8 + draft decode",
    "ORT fp32 + draft decode",
    "ORT int8 + draft decode",
]


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply rate (2 n^3 FLOPs per product), best of a few runs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def vit_gflops(config) -> float:
    """Forward FLOPs of one image through a ViT, counting a multiply-add as 2 FLOPs (the unit of the matmul rate)."""
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    d, m = config.hidden_size, config.intermediate_size
    embedding = 2 * (tokens - 1) * 3 * config.patch_size**2 * d
    per_layer = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d
    return (embedding + config.num_hidden_layers * per_layer) / 1e9


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
    the top-1 labels of `check_images` (more real X-rays, for a finer agreement figure)."""
    from transformers import pipeline

    from cxr.predictor import classify, load_classifier

    if path_name == PATHS[0]:
        plain = pipeline("image-classification", model=model_dir)
        run = lambda files: [plain(str(f), top_k=1)[0]["label"] for f in files]  # noqa: E731
    else:
        classifier = load_classifier(model_dir, int8="int8" in path_name, onnx=path_name.startswith("ORT"))
        draft = "draft" in path_name
        run = lambda files: [p.top_label for p in classify(classifier, files, batch_size=batch_size, draft=draft)]  # noqa: E731
    run(images[:2])  # warm-up: first calls allocate and pick kernels
    start = time.perf_counter()
    labels = run(images)
    rate = len(images) / (time.perf_counter() - start)
    peak_mib = peak_rss_mib()
    return dict(labels=labels, rate=rate, peak_mib=peak_mib, check_labels=run(check_images))


def export_onnx(model_dir: str) -> None:
    """Write the folder's cached ONNX graphs (float32 and int8), so the ORT rows time and measure the memory of a
    load that finds them, as every load after the first does. In a process of its own, like the paths (its
    progress bars stay out of the table)."""
    code = (
        "from cxr.predictor import load_classifier\n"
        f"for int8 in (False, True): load_classifier({model_dir!r}, onnx=True, int8=int8)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's peak across
    exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def forward_ms(model_dir: str, repeats: int = 10) -> float:
    """Median time of the model's own forward pass on one preprocessed image (no decoding)."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size)
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
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="Folder of X-ray images to classify.")
    parser.add_argument(
        "--repeat", type=int, default=2, help="Pass over the images this many times (more images, steadier figures)."
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--agreement_images",
        type=int,
        default=200,
        help=(
            "Kaggle training X-rays (a fixed sample from the chest_xray/train/ folder beside the default --images) "
            "each path also labels, untimed, after the timed run: top-1 agreement is counted over them and the "
            "distinct timed images."
        ),
    )
    parser.add_argument(
        "--presets",
        nargs="*",
        default=["scratch-base", "scratch-small"],
        help=f"Architectures built with random weights: {', '.join(PRESETS)}.",
    )
    parser.add_argument("--model", action="append", default=[], help="A trained model folder to add (repeatable).")
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


def main() -> None:
    args = build_parser().parse_args()

    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")) * args.repeat
    if not images:
        raise SystemExit(f"No images in {args.images}")
    # The distinct timed images plus a fixed sample of training X-rays (none where that folder is absent).
    check_images = sample_benchmark_images(args.images, KAGGLE_TRAIN, args.agreement_images)
    if args.worker:
        print(json.dumps(worker(*args.worker, images, args.batch_size, check_images)))
        return

    rate, int8_rate = matmul_gflops(), int8_matmul_gops()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 matmul {rate:.0f} GFLOP/s, int8 matmul "
        f"(ONNX Runtime) {int8_rate:.0f} GOP/s; {len(images)} images from {args.images} timed; top-1 agreement over "
        f"{len(check_images)} distinct images ({len(check_images) - len(set(images))} more from {KAGGLE_TRAIN})\n"
    )
    with tempfile.TemporaryDirectory() as scratch:
        models = []
        for preset in args.presets:
            model, processor, _ = build_model(preset, LABELS)
            model.save_pretrained(Path(scratch) / preset)
            processor.save_pretrained(Path(scratch) / preset)
            models.append((f"{preset} (random weights)", str(Path(scratch) / preset), model.config))
        for folder in args.model:
            models.append((folder, folder, AutoConfig.from_pretrained(folder)))

        header = (
            f"{'model':<32} {'path':<30} {'images/s':>9} {'x plain':>8} {'% ceiling':>10} {'peak MiB':>9} "
            f"{'top-1 agree':>12} {'differ':>7}"
        )
        print(header + "\n" + "-" * len(header))
        latencies = []
        for label, folder, config in models:
            ceiling, int8_ceiling = rate / vit_gflops(config), int8_rate / vit_gflops(config)
            export_onnx(folder)
            rows = {}
            for path_name in PATHS:
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks.speed",
                    "--images",
                    str(args.images),
                    "--repeat",
                    str(args.repeat),
                    "--batch_size",
                    str(args.batch_size),
                    "--worker",
                    folder,
                    path_name,
                ]
                rows[path_name] = json.loads(
                    subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                )
            plain = rows[PATHS[0]]
            for path_name, row in rows.items():
                differ = sum(a != b for a, b in zip(row["check_labels"], plain["check_labels"], strict=True))
                own_ceiling = int8_ceiling if "int8" in path_name else ceiling
                print(
                    f"{label:<32} {path_name:<30} {row['rate']:>9.2f} {row['rate'] / plain['rate']:>7.2f}x "
                    f"{100 * row['rate'] / own_ceiling:>9.0f}% {row['peak_mib']:>9.0f} "
                    f"{100 * (1 - differ / len(check_images)):>11.1f}% {differ:>7}"
                )
            print(
                f"{'':<32} ceiling = {rate:.0f} GFLOP/s / {vit_gflops(config):.2f} GFLOP per image = {ceiling:.2f} "
                "images/s (float32 rows);"
            )
            print(
                f"{'':<32}           {int8_rate:.0f} GOP/s int8 / {vit_gflops(config):.2f} = {int8_ceiling:.2f} "
                f"images/s (int8 rows) = {int8_ceiling / plain['rate']:.2f}x plain\n"
            )
            if args.requests:
                times = sorted(app_latency(folder, images[0], args.requests, verify_tls=args.verify_tls))
                latencies.append(
                    (
                        label,
                        config.image_size,
                        forward_ms(folder),
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
