"""What isolating a decode costs: each format decoded in this process and through `load_image(..., isolate=True)`.

    python -m benchmarks.decode_cost                       # the formats users upload, best of --repeats
    python -m benchmarks.decode_cost --worst               # also every worst case of benchmarks.fuzz_images, isolated

Files: the largest of ../shared/data/xray_originals as the app reads it (JPEG at the model's draft size) and in full,
the same X-ray as a 16-bit PNG, an uncompressed 16-bit DICOM and a JPEG-LS DICOM, and 40-megapixel 8- and 16-bit
PNGs (the largest legitimate uploads). The process first loads torch and the model folder, as the app has, so a
decode path that copies the process pays for it. Prints milliseconds per decode, in-process and isolated, and for
--worst each case's time, the worker's peak resident memory during it and the answer.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.fuzz_images import ramp_png, worst_cases
from cxr.images import ImageLoadError, load_image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def dicom_of(pixels: np.ndarray, syntax: str | None = None) -> bytes:
    """A 16-bit MONOCHROME2 DICOM of `pixels`, uncompressed or encoded with `syntax` (pydicom's encoders)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    if syntax:
        dataset.compress(syntax, encoding_plugin="pyjpegls")
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def uploads(draft_size: int) -> list[tuple[str, bytes, int | None]]:
    from pydicom.uid import JPEGLSLossless

    largest = max((SHARED_DATA / "xray_originals").glob("*.jpeg"), key=lambda path: path.stat().st_size)
    jpeg = largest.read_bytes()
    gray12 = (np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.uint16) * 16).astype(np.uint16)
    png16 = io.BytesIO()
    Image.fromarray(gray12 * 16).save(png16, "PNG")  # mode I;16
    side = f"{gray12.shape[1]} x {gray12.shape[0]}"
    return [
        (f"JPEG {side}, draft {draft_size} px (as the app)", jpeg, draft_size),
        (f"JPEG {side}, full size", jpeg, None),
        (f"16-bit PNG {side}", png16.getvalue(), None),
        (f"16-bit DICOM {side}, uncompressed", dicom_of(gray12), None),
        (f"16-bit DICOM {side}, JPEG-LS", dicom_of(gray12, JPEGLSLossless), None),
        ("40 MP 8-bit grey PNG (6324 x 6324)", ramp_png("L", (6324, 6324)), None),
        ("40 MP 16-bit grey PNG (6324 x 6324)", ramp_png("I;16", (6324, 6324)), None),
    ]


def best_ms(data: bytes, draft_size: int | None, isolate: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load_image(data, draft_size=draft_size, isolate=isolate)
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def worker_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model folder to load first, as the app does (default: none).")
    parser.add_argument("--repeats", type=int, default=3, help="Decodes per file; the best is printed.")
    parser.add_argument("--draft_size", type=int, default=128, help="The model's input size (the app's draft).")
    parser.add_argument("--worst", action="store_true", help="Also run the fuzz benchmark's worst cases, isolated.")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    import torch

    if args.model:
        from cxr.predictor import load_classifier

        load_classifier(args.model)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    from cxr.images import start_decode_workers

    pool = start_decode_workers(1)  # one worker: --worst reads its peak memory
    load_image(uploads(args.draft_size)[0][1], isolate=True)  # the workers start once, outside the figures
    print(f"{'upload':<50} {'in-process ms':>14} {'isolated ms':>12} {'added ms':>9}")
    for label, data, draft in uploads(args.draft_size):
        inline, isolated = (best_ms(data, draft, isolate, args.repeats) for isolate in (False, True))
        print(f"{label:<50} {inline:>14.0f} {isolated:>12.0f} {isolated - inline:>+9.0f}")
    if not args.worst:
        return
    print(f"\n{'worst case (isolated)':<72} {'seconds':>8} {'worker peak MiB':>16}  answer")
    for label, data, _suffix, _legitimate in worst_cases():
        [pid] = pool.pids()
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to what the worker holds now
        started = time.perf_counter()
        try:
            image = load_image(data, isolate=True)
            answer = f"decoded {image.size[0]} x {image.size[1]}"
        except ImageLoadError as error:
            answer = "refused: " + str(error)[:70]
        seconds = time.perf_counter() - started
        peak = worker_peak_mib(pid) if pid in pool.pids() else float("nan")
        print(f"{label[:72]:<72} {seconds:>8.2f} {peak:>16.0f}  {answer}")


if __name__ == "__main__":
    main()
