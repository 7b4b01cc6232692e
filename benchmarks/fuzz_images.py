"""Fuzz the one image loader: every input must end in an RGB image or `ImageLoadError`, promptly, in bounded memory.

    python -m benchmarks.fuzz_images --seconds 120
    python -m benchmarks.fuzz_images --seconds 60 --model outputs/vit-xray   # also app.predict on what decodes

Hypothesis draws the inputs (no shrinking: every input is kept going, none stops the run):
  mutate   a valid seed file (JPEG gray/RGB/CMYK/progressive/EXIF-rotated, PNG 1/8/16-bit, palette, alpha, GIF, BMP,
           TIFF, WebP, DICOM 8/16-bit, MONOCHROME1, RGB, multi-frame, RLE-compressed) with bit flips, overwritten,
           inserted, deleted or repeated runs of bytes, truncation, or spliced onto another seed
  header   the size fields of a PNG (CRC fixed), JPEG, BMP or GIF header set to small, boundary or huge values
  dicom    a DICOM file built from drawn tags: rows, columns, frames, samples, bits, photometric interpretation,
           transfer syntax, pixel data of any length, broken LUT and rescale values
  bomb     a valid PNG of zeros at or just over the 40-megapixel limit, 8/16-bit gray, RGB or RGBA (real decoding)
  magic    random bytes behind a real format's magic number
each passed as bytes, or as a file whose name says .png, .jpeg or .dcm (names decide the DICOM path too).

Each input runs in a worker process, one at a time; the parent kills the worker when an input takes longer than
--time-limit or its memory passes --memory-limit, and starts a new one. The worker resets its peak-memory mark
(VmHWM) before each input, so every input's own peak is known. Prints the inputs tried, the outcomes (ImageLoadError
messages grouped by their wording), the slowest input and the largest peak memory; every crash, hang or memory kill
is saved under --out for replay: `python -m benchmarks.fuzz_images --replay FILE`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import re
import struct
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

SUFFIXES = [None, ".png", ".jpeg", ".dcm"]
PROBLEMS = ("crash", "hang", "memory", "worker died")  # outcomes that break the loader's promise  # None: the raw bytes are passed, as an upload's contents
HUGE = [0, 1, 2, 31, 32, 33, 255, 256, 4096, 6324, 6325, 20000, 32767, 32768, 65535, 65536, 2**24, 2**31 - 1, 2**32 - 1]


# ---- seeds: small valid files of every kind the loader accepts -------------------------------------------------------


def picture(width: int = 72, height: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((np.sin(x / 7.0) + np.cos(y / 5.0) + 2) * 60).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, frames: int | None = None, rle: bool = False, **tags) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    samples = 3 if pixels.ndim == (4 if frames else 3) else 1
    dataset.Rows, dataset.Columns = pixels.shape[(1 if frames else 0):(3 if frames else 2)]
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = photometric
    if samples == 3:
        dataset.PlanarConfiguration = 0
    if frames:
        dataset.NumberOfFrames = frames
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    if rle:
        dataset.compress(RLELossless)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_seeds() -> dict[str, bytes]:
    gray = Image.fromarray(picture(), "L")
    rotated = gray.copy()
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.fromarray(picture().astype(np.uint16) * 64)
    return {
        "jpeg-gray": encode(gray, "JPEG"),
        "jpeg-rgb": encode(gray.convert("RGB"), "JPEG", quality=80),
        "jpeg-cmyk": encode(gray.convert("CMYK"), "JPEG"),
        "jpeg-progressive": encode(gray, "JPEG", progressive=True),
        "jpeg-exif-rotated": encode(rotated, "JPEG", exif=exif.tobytes()),
        "png-gray": encode(gray, "PNG"),
        "png-16bit": encode(sixteen, "PNG"),
        "png-1bit": encode(gray.convert("1"), "PNG"),
        "png-palette": encode(gray.convert("P"), "PNG"),
        "png-rgba": encode(gray.convert("RGBA"), "PNG"),
        "png-gray-alpha": encode(gray.convert("LA"), "PNG"),
        "png-exif-rotated": encode(gray, "PNG", exif=exif.tobytes()),
        "gif": encode(gray.convert("P"), "GIF"),
        "bmp": encode(gray, "BMP"),
        "tiff-16bit": encode(sixteen, "TIFF"),
        "tiff-lzw-rgb": encode(gray.convert("RGB"), "TIFF", compression="tiff_lzw"),
        "webp": encode(gray.convert("RGB"), "WEBP"),
        "dicom-16bit": dicom(picture().astype(np.uint16) * 16),
        "dicom-8bit-monochrome1": dicom(picture(), "MONOCHROME1", bits=8),
        "dicom-rgb": dicom(np.stack([picture()] * 3, axis=-1), "RGB", bits=8),
        "dicom-2-frames": dicom(np.stack([picture().astype(np.uint16)] * 2), frames=2),
        "dicom-rgb-2-frames": dicom(np.stack([np.stack([picture()] * 3, axis=-1)] * 2), "RGB", bits=8, frames=2),
        "dicom-rle": dicom(picture().astype(np.uint16) * 16, rle=True),
        "dicom-voi-lut": dicom(picture().astype(np.uint16) * 16, WindowCenter=2000, WindowWidth=4000, RescaleSlope=1, RescaleIntercept=-1024),
    }


# ---- hypothesis strategies ---------------------------------------------------------------------------------------------


def strategies(seeds: dict[str, bytes]):
    from hypothesis import strategies as st

    names = sorted(seeds)
    where = st.one_of(st.integers(0, 160), st.floats(0, 1))  # the header, or anywhere
    mutation = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("set"), where, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), where, st.integers(1, 256)),
        st.tuples(st.just("repeat"), where, st.integers(1, 256), st.integers(2, 64)),
        st.tuples(st.just("truncate"), where),
    )
    size = st.one_of(st.sampled_from(HUGE), st.integers(0, 2**32 - 1))

    @st.composite
    def mutated(draw):
        name = draw(st.sampled_from(names))
        data = bytearray(seeds[name])
        steps = draw(st.lists(mutation, min_size=1, max_size=6))
        for step in steps:
            data = apply(data, step)
        if draw(st.booleans()) and draw(st.booleans()):  # now and then: spliced onto another seed
            other = draw(st.sampled_from(names))
            cut = draw(st.floats(0, 1))
            data = data[: int(cut * len(data))] + seeds[other][int(cut * len(seeds[other])) :]
            name += f"+{other}"
        return bytes(data), f"mutate {name}: {describe(steps)}"

    @st.composite
    def header(draw):
        kind = draw(st.sampled_from(["png", "jpeg", "bmp", "gif"]))
        width, height = draw(size), draw(size)
        if kind == "png":
            data = bytearray(seeds[draw(st.sampled_from(["png-gray", "png-16bit", "png-palette", "png-rgba", "png-1bit"]))])
            depth, color = draw(st.sampled_from([1, 2, 4, 8, 16, 0, 7])), draw(st.sampled_from([0, 2, 3, 4, 6, 1]))
            ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, draw(st.sampled_from([0, 1])))
            data[16:29] = ihdr
            data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        elif kind == "jpeg":
            data = bytearray(seeds[draw(st.sampled_from(["jpeg-gray", "jpeg-rgb", "jpeg-progressive", "jpeg-cmyk"]))])
            at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
            data[at + 5 : at + 9] = struct.pack(">HH", height % 65536, width % 65536)
        elif kind == "bmp":
            data = bytearray(seeds["bmp"])
            data[18:26] = struct.pack("<ii", width - 2**31, height - 2**31) if draw(st.booleans()) else struct.pack("<II", width, height)
            data[28:30] = struct.pack("<H", draw(st.sampled_from([1, 4, 8, 16, 24, 32, 0, 64])))
        else:
            data = bytearray(seeds["gif"])
            data[6:10] = struct.pack("<HH", width % 65536, height % 65536)
        return bytes(data), f"header {kind} {width} x {height}"

    @st.composite
    def dicom_file(draw):
        from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

        exact = draw(st.booleans())  # pixel data of exactly the length the tags claim, so pydicom decodes it
        sides = [31, 32, 33, 64] if exact else [0, 1, 31, 32, 64, 4096, 6325, 65535]
        rows, columns = draw(st.sampled_from(sides)), draw(st.sampled_from(sides))
        samples = draw(st.sampled_from([1, 3] if exact else [1, 3, 4, 0]))
        bits = draw(st.sampled_from([8, 16, 32] if exact else [8, 16, 1, 12, 32, 64]))
        frames = draw(st.sampled_from([None, "1", "2", "3"] if exact else [None, "1", "2", "0", "-1", "100000", "abc"]))
        photometric = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "??"]))
        syntax = draw(st.sampled_from([None, ImplicitVRLittleEndian, ExplicitVRBigEndian] if exact else
                                      [None, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless, JPEGBaseline8Bit, DeflatedExplicitVRLittleEndian]))
        if exact:
            length = rows * columns * samples * (bits // 8) * int(frames or 1) + draw(st.sampled_from([0, 0, 0, 1, -1]))
            pixel_bytes = (bytes(range(256)) * (length // 256 + 1))[: max(length, 0)]
        else:
            pixel_bytes = draw(st.one_of(st.binary(max_size=512), st.integers(0, 400_000).map(lambda n: b"\x07" * n)))
        data = bytearray(dicom(picture(), bits=8))
        try:
            import pydicom

            dataset = pydicom.dcmread(io.BytesIO(bytes(data)))
            dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = rows, columns, samples
            dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, max(bits - 1, 0)
            dataset.PhotometricInterpretation = photometric
            dataset.PixelRepresentation = draw(st.sampled_from([0, 1]))
            if frames is not None:
                dataset.add_new(0x00280008, "IS", frames)
            if draw(st.booleans()):
                dataset.WindowCenter, dataset.WindowWidth = draw(st.sampled_from([("40", "0"), ("1e308", "-5"), ("nan", "nan"), ("1", "1")]))
            if draw(st.booleans()):
                dataset.RescaleSlope, dataset.RescaleIntercept = draw(st.sampled_from([("0", "0"), ("1e300", "1e300"), ("inf", "1")]))
            dataset.PixelData = pixel_bytes
            if syntax is not None:
                dataset.file_meta.TransferSyntaxUID = syntax
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=False)
            data = bytearray(buffer.getvalue())
        except Exception:  # noqa: BLE001 - a combination pydicom will not write: send what we have
            pass
        return bytes(data), f"dicom {rows} x {columns} x {frames} frames, {samples} samples, {bits} bits, {photometric}, {syntax or 'explicit LE'}, {len(pixel_bytes)} pixel bytes"

    bomb = st.tuples(st.sampled_from(["L", "I;16", "RGB", "RGBA"]), st.sampled_from([(6324, 6324), (6325, 6325), (20000, 2000)])).map(
        lambda spec: (zero_png(*spec), f"bomb PNG of zeros, {spec[0]} {spec[1][0]} x {spec[1][1]}")
    )
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\0" * 128 + b"DICM", b"P5\n64 64\n255\n"]
    magic = st.tuples(st.sampled_from(magics), st.binary(max_size=2048)).map(lambda pair: (pair[0] + pair[1], f"magic {pair[0][:12]!r} + {len(pair[1])} random bytes"))

    @st.composite
    def any_input(draw):
        roll = draw(st.integers(0, 99))  # mutate 55 %, header 15 %, dicom 20 %, magic 7 %, bomb 3 % (each costs a second)
        kind = mutated() if roll < 55 else header() if roll < 70 else dicom_file() if roll < 90 else magic if roll < 97 else bomb
        return draw(kind)

    return st.tuples(any_input(), st.sampled_from(SUFFIXES))


def apply(data: bytearray, step: tuple) -> bytearray:
    if not data:
        return data
    kind, where = step[0], step[1]
    at = min(int(where * len(data)) if isinstance(where, float) else where, len(data) - 1)
    if kind == "flip":
        data[at] ^= 1 << step[2]
    elif kind == "set":
        data[at : at + len(step[2])] = step[2]
    elif kind == "insert":
        data[at:at] = step[2]
    elif kind == "delete":
        del data[at : at + step[2]]
    elif kind == "repeat":
        data[at:at] = data[at : at + step[2]] * step[3]
    elif kind == "truncate":
        del data[at:]
    return data


def describe(steps: list[tuple]) -> str:
    return ", ".join(f"{step[0]}@{step[1]:.3g}" if isinstance(step[1], float) else f"{step[0]}@{step[1]}" for step in steps)


_ZERO_PNGS: dict[tuple, bytes] = {}


def zero_png(mode: str, size: tuple[int, int]) -> bytes:
    """A valid PNG of zeros of `size`, built row by row (never the whole raw image in memory); cached."""
    if (mode, size) not in _ZERO_PNGS:
        width, height = size
        depth, color, channels = {"L": (8, 0, 1), "I;16": (16, 0, 2), "RGB": (8, 2, 3), "RGBA": (8, 6, 4)}[mode]
        compressor, row, parts = zlib.compressobj(9), b"\0" * (1 + width * channels), []
        for _ in range(height):
            parts.append(compressor.compress(row))
        parts.append(compressor.flush())
        ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
        idat = b"".join(parts)
        chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
        _ZERO_PNGS[(mode, size)] = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return _ZERO_PNGS[(mode, size)]


# ---- the worker: one input at a time -----------------------------------------------------------------------------------


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(connection, model: str | None) -> None:
    import os
    import warnings

    warnings.simplefilter("ignore")  # Pillow and pydicom warn on most broken inputs; the outcome says enough
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # and libtiff prints to stderr from C
    from cxr.images import MAX_PIXELS, MIN_SIDE, ImageLoadError, load_image

    classifier = None
    if model:
        import gradio as gr

        import app
        from cxr.predict import load_classifier

        classifier = load_classifier(model)
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-"))
    connection.send("ready")
    while True:
        message = connection.recv()
        if message is None:
            return
        data, suffix = message
        reset_peak()
        at_rest, start = rss_mib(), time.perf_counter()
        try:
            source = data
            if suffix or classifier:
                source = scratch / f"input{suffix or '.bin'}"
                source.write_bytes(data)
            image = load_image(source)
            if image.mode != "RGB" or min(image.size) < MIN_SIDE or image.width * image.height > MAX_PIXELS:
                outcome = f"crash: returned a {image.mode} image of {image.size}"
            else:
                outcome = "RGB image"
                if classifier:
                    try:
                        warning, scores, overlay, check = app.predict(classifier, str(source))
                        outcome = "RGB image; app.predict answered" if len(scores) == 3 and overlay.mode == "RGB" else "crash: app.predict gave a bad answer"
                    except gr.Error as error:
                        outcome = f"crash: app.predict refused what load_image accepted: {error.message[:80]}"
        except ImageLoadError as error:
            outcome = "ImageLoadError: " + wording(str(error))
        except BaseException as error:  # noqa: BLE001 - anything else is what we are looking for
            frame = traceback.extract_tb(error.__traceback__)[-1]
            outcome = f"crash: {type(error).__name__}: {str(error)[:100]} (at {Path(frame.filename).name}:{frame.lineno} in {frame.name})"
        connection.send((outcome, time.perf_counter() - start, peak_mib() - at_rest))


def wording(message: str) -> str:
    """An ImageLoadError message without its file name, figures and quoted details, so alike messages group together."""
    message = re.sub(r"'[^']*'", "'…'", message)
    message = re.sub(r"\(.*\)", "(…)", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:110]


class Runner:
    """Sends inputs to a worker process, with a time and memory limit per input; restarts it after a kill."""

    def __init__(self, model: str | None, time_limit: float, memory_limit_mib: float):
        self.model, self.time_limit, self.memory_limit = model, time_limit, memory_limit_mib
        self.context = multiprocessing.get_context("fork")
        self.process = None
        self.start()

    def start(self) -> None:
        self.connection, child = self.context.Pipe()
        self.process = self.context.Process(target=worker, args=(child, self.model), daemon=True)
        self.process.start()
        self.watch = psutil.Process(self.process.pid)
        if not self.connection.poll(300) or self.connection.recv() != "ready":  # imports (and the model) load outside the limits
            raise SystemExit("the fuzzing worker did not start")

    def run(self, data: bytes, suffix: str | None) -> tuple[str, float, float]:
        """(outcome, seconds, MiB the worker grew by on this input: its peak RSS over its RSS before it)."""
        self.connection.send((data, suffix))
        start, peak = time.perf_counter(), 0.0
        while not self.connection.poll(0.02):
            elapsed = time.perf_counter() - start
            try:
                peak = max(peak, self.watch.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            if not self.process.is_alive():
                exit_code = self.process.exitcode
                self.start()
                return f"worker died (exit code {exit_code})", elapsed, peak
            if elapsed > self.time_limit or peak > self.memory_limit:
                self.process.kill()
                self.process.join()
                self.start()
                return ("hang: over the time limit" if elapsed > self.time_limit else "memory: over the memory limit"), elapsed, peak
        try:
            return self.connection.recv()
        except (EOFError, OSError):  # the worker died after the input was sent (e.g. killed for memory by the kernel)
            self.process.join()
            exit_code = self.process.exitcode
            self.start()
            return f"worker died (exit code {exit_code})", time.perf_counter() - start, peak

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120, help="How long to fuzz.")
    parser.add_argument("--time-limit", type=float, default=10, help="Seconds one input may take before it counts as a hang.")
    parser.add_argument("--memory-limit", type=float, default=3072, help="MiB the worker may reach on one input.")
    parser.add_argument("--model", help="Also run app.predict (with this model folder) on every input that decodes.")
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz"), help="Where crashing, hanging and memory-hungry inputs are saved.")
    parser.add_argument("--replay", type=Path, help="Run one saved input (its .json beside it gives the suffix) and print the outcome.")
    args = parser.parse_args()

    runner = Runner(args.model, args.time_limit, args.memory_limit)
    if args.replay:
        suffix = json.loads(args.replay.with_suffix(".json").read_text()).get("suffix") if args.replay.with_suffix(".json").exists() else None
        print(runner.run(args.replay.read_bytes(), suffix))
        runner.close()
        return

    from hypothesis import HealthCheck, Phase, given, settings

    outcomes, problems = collections.Counter(), []
    slowest, largest = (0.0, ""), (0.0, "")
    end = 0.0  # set once the seeds have run
    tried = 0

    @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategies(make_seeds()))
    def fuzz(case) -> None:
        nonlocal tried, slowest, largest
        if time.monotonic() > end:
            return
        (data, description), suffix = case
        outcome, seconds, peak = runner.run(data, suffix)
        tried += 1
        kind = outcome.split(":")[0]
        outcomes[outcome if kind == "ImageLoadError" or kind == "RGB image" else outcome[:160]] += 1
        label = f"{description} [{suffix or 'bytes'}, {len(data):,} bytes]"
        slowest = max(slowest, (seconds, label))
        largest = max(largest, (peak, label))
        if outcome.startswith(PROBLEMS):
            args.out.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1(data).hexdigest()[:16]
            (args.out / f"{name}.bin").write_bytes(data)
            (args.out / f"{name}.json").write_text(json.dumps({"outcome": outcome, "input": description, "suffix": suffix}, indent=2))
            problems.append((outcome, label, args.out / f"{name}.bin"))

    for name, data in make_seeds().items():  # every seed as it is, first: each must decode
        outcome, seconds, peak = runner.run(data, None)
        tried += 1
        outcomes["seed decoded" if outcome.startswith("RGB image") else f"crash: seed {name}: {outcome}"] += 1
    started = time.monotonic()
    end = started + args.seconds
    while time.monotonic() < end:
        fuzz()
    runner.close()

    print(f"Fuzzed cxr.images.load_image{' and app.predict' if args.model else ''} for {time.monotonic() - started:.0f} s: {tried:,} inputs "
          f"(time limit {args.time_limit:g} s, memory limit {args.memory_limit:,.0f} MiB per input)\n")
    for outcome, count in outcomes.most_common():
        print(f"  {count:>7,}  {outcome}")
    bad = sum(count for outcome, count in outcomes.items() if outcome.startswith(PROBLEMS))
    print(f"\n  {tried - bad:,} of {tried:,} inputs ended in an RGB image or ImageLoadError; {bad:,} did not" + (":" if bad else "."))
    for outcome, label, path in problems[:20]:
        print(f"    {outcome}\n      input: {label}\n      saved: {path}")
    print(f"\nslowest input: {slowest[0]:.2f} s, {slowest[1]}")
    print(f"most memory for one input: +{largest[0]:,.0f} MiB over the worker's resident memory before it, {largest[1]}")


if __name__ == "__main__":
    main()
