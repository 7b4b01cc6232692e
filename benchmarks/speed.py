"""Inference speed: the plain one-image-at-a-time pipeline against the project's batched paths.

    python -m benchmarks.speed                          # ViT-B/16 (random weights) and scratch-small on ../shared/data/xray_originals
    python -m benchmarks.speed --model outputs/vit-xray # also a trained model folder (top-1 agreement means most here)

Same process, same images (full-resolution JPEGs: decoding and resizing included), side by side:
  plain pipeline   pipeline("image-classification")(path) one image at a time: where every user starts
  batched fp32     the project's predictor, same full decode, batched         : must agree 100% with plain
  + draft decode   JPEGs decoded at reduced scale (Image.draft) before resizing
  + int8           Linear layers dynamically quantized to int8                : must agree >= 99%
Prints images/s, speed-up over plain, peak memory above the process's start, top-1 agreement with plain,
and the physical ceiling from this machine's float32 matmul rate.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import pipeline

from cxr.models import PRESETS, build_model
from cxr.predict import classify, load_classifier

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray_originals"
LABELS = {0: "Bacterial pneumonia", 1: "Normal", 2: "Viral pneumonia"}


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
    """Forward FLOPs of one image through a ViT (2 per multiply-add): patch embedding, attention, MLP, head."""
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    d, m = config.hidden_size, config.intermediate_size
    embedding = 2 * (tokens - 1) * 3 * config.patch_size**2 * d
    per_layer = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d
    return (embedding + config.num_hidden_layers * per_layer) / 1e9


class PeakMemory:
    """Peak resident memory of this process while the block runs, above what it held when the block began."""

    def __enter__(self):
        self.process, self.start, self.peak, self.running = psutil.Process(), psutil.Process().memory_info().rss, 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = max(0, self.peak - self.start) / 2**20


def timed(run, images):
    with PeakMemory() as memory:
        start = time.perf_counter()
        labels = run(images)
        seconds = time.perf_counter() - start
    return labels, len(images) / seconds, memory.mib


def benchmark(model_dir: str, images: list[Path], batch_size: int, gflop_rate: float) -> list[dict]:
    plain = pipeline("image-classification", model=model_dir)
    config = plain.model.config
    ceiling = gflop_rate / vit_gflops(config)
    fp32 = load_classifier(model_dir)
    int8 = load_classifier(model_dir, int8=True)
    paths = {
        "plain pipeline, 1 at a time": lambda files: [plain(str(f), top_k=1)[0]["label"] for f in files],
        "batched fp32": lambda files: [p.top_label for p in classify(fp32, files, batch_size=batch_size, draft=False)],
        "batched fp32 + draft decode": lambda files: [p.top_label for p in classify(fp32, files, batch_size=batch_size)],
        "batched int8 + draft decode": lambda files: [p.top_label for p in classify(int8, files, batch_size=batch_size)],
    }
    for run in paths.values():  # warm-up: first calls allocate and pick kernels
        run(images[:2])
    rows, reference = [], None
    for name, run in paths.items():
        labels, rate, mib = timed(run, images)
        reference = reference or labels
        agreement = sum(a == b for a, b in zip(labels, reference)) / len(labels)
        rows.append(dict(path=name, rate=rate, ceiling=ceiling, mib=mib, agreement=agreement))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="Folder of X-ray images to classify.")
    parser.add_argument("--repeat", type=int, default=2, help="Pass over the images this many times (more images, steadier figures).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--presets", nargs="*", default=["scratch-base", "scratch-small"], help=f"Architectures built with random weights: {', '.join(PRESETS)}.")
    parser.add_argument("--model", action="append", default=[], help="A trained model folder or Hub id to add (repeatable).")
    args = parser.parse_args()

    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")) * args.repeat
    if not images:
        raise SystemExit(f"No images in {args.images}")
    rate = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 matmul {rate:.0f} GFLOP/s; {len(images)} images from {args.images}\n")

    models = []
    with tempfile.TemporaryDirectory() as scratch:
        for preset in args.presets:
            model, processor, _ = build_model(preset, LABELS)
            folder = Path(scratch) / preset
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            models.append((f"{preset} (random weights)", str(folder)))
        models += [(name, name) for name in args.model]

        header = f"{'model':<32} {'path':<30} {'images/s':>9} {'x plain':>8} {'% ceiling':>10} {'peak MiB':>9} {'top-1 agree':>12}"
        print(header + "\n" + "-" * len(header))
        for label, folder in models:
            rows = benchmark(folder, images, args.batch_size, rate)
            base = rows[0]["rate"]
            for row in rows:
                print(
                    f"{label:<32} {row['path']:<30} {row['rate']:>9.2f} {row['rate'] / base:>7.2f}x {100 * row['rate'] / row['ceiling']:>9.0f}% "
                    f"{row['mib']:>9.0f} {100 * row['agreement']:>11.1f}%"
                )
            print(f"{'':<32} ceiling = matmul rate / FLOPs per image = {rows[0]['ceiling']:.2f} images/s\n")


if __name__ == "__main__":
    main()
