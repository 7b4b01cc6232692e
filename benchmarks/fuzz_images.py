"""Fuzz the one image loader: every input must end in an RGB image or `ImageLoadError`, promptly, in bounded memory.

    python -m benchmarks.fuzz_images --seconds 120
    python -m benchmarks.fuzz_images --seconds 60 --model outputs/vit-xray   # also app.answer_upload on what decodes
    python -m benchmarks.fuzz_images --worst --time_limit 60 --repeats 2     # the table in docs/security.md

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

--worst builds each worst case of issue 15 on purpose (40-megapixel legitimate uploads, RLE RGB at the pixel limit,
padded DICOM, a mismatched embedded frame, palette, window width 0, deflate, progressive scans, EPS, a forged header in
each format) and prints, per case, its peak memory over the worker at rest, its time and the loader's answer.

Each input runs in a worker process, one at a time; the parent kills the worker when an input takes longer than
--time_limit or its memory passes --memory_limit, and starts a new one. The worker resets its peak-memory mark
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

from benchmarks.common import add_old_spelling

SUFFIXES = [None, ".png", ".jpeg", ".dcm"]
PROBLEMS = (
    "crash",
    "hang",
    "memory",
    "worker died",
)  # outcomes that break the loader's promise  # None: the raw bytes are passed, as an upload's contents
HUGE = [0, 1, 2, 31, 32, 33, 255, 256, 4096, 6324, 6325, 20000, 32767, 32768, 65535, 65536, 2**24, 2**31 - 1, 2**32 - 1]


# ---- seeds: small valid files of every kind the loader accepts -------------------------------------------------------


def picture(width: int = 72, height: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((np.sin(x / 7.0) + np.cos(y / 5.0) + 2) * 60).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    frames: int | None = None,
    rle: bool = False,
    **tags,
) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    samples = 3 if pixels.ndim == (4 if frames else 3) else 1
    dataset.Rows, dataset.Columns = pixels.shape[(1 if frames else 0) : (3 if frames else 2)]
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
        "dicom-voi-lut": dicom(
            picture().astype(np.uint16) * 16,
            WindowCenter=2000,
            WindowWidth=4000,
            RescaleSlope=1,
            RescaleIntercept=-1024,
        ),
    }


# ---- hypothesis strategies -------------------------------------------------------------------------------------------


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
            data = bytearray(
                seeds[draw(st.sampled_from(["png-gray", "png-16bit", "png-palette", "png-rgba", "png-1bit"]))]
            )
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
            data[18:26] = (
                struct.pack("<ii", width - 2**31, height - 2**31)
                if draw(st.booleans())
                else struct.pack("<II", width, height)
            )
            data[28:30] = struct.pack("<H", draw(st.sampled_from([1, 4, 8, 16, 24, 32, 0, 64])))
        else:
            data = bytearray(seeds["gif"])
            data[6:10] = struct.pack("<HH", width % 65536, height % 65536)
        return bytes(data), f"header {kind} {width} x {height}"

    @st.composite
    def dicom_file(draw):
        from pydicom.uid import (
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
            ImplicitVRLittleEndian,
            JPEGBaseline8Bit,
            RLELossless,
        )

        exact = draw(st.booleans())  # pixel data of exactly the length the tags claim, so pydicom decodes it
        sides = [31, 32, 33, 64] if exact else [0, 1, 31, 32, 64, 4096, 6325, 65535]
        rows, columns = draw(st.sampled_from(sides)), draw(st.sampled_from(sides))
        samples = draw(st.sampled_from([1, 3] if exact else [1, 3, 4, 0]))
        bits = draw(st.sampled_from([8, 16, 32] if exact else [8, 16, 1, 12, 32, 64]))
        frames = draw(st.sampled_from([None, "1", "2", "3"] if exact else [None, "1", "2", "0", "-1", "100000", "abc"]))
        photometric = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "??"]))
        syntax = draw(
            st.sampled_from(
                [None, ImplicitVRLittleEndian, ExplicitVRBigEndian]
                if exact
                else [
                    None,
                    ImplicitVRLittleEndian,
                    ExplicitVRBigEndian,
                    RLELossless,
                    JPEGBaseline8Bit,
                    DeflatedExplicitVRLittleEndian,
                ]
            )
        )
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
                dataset.WindowCenter, dataset.WindowWidth = draw(
                    st.sampled_from([("40", "0"), ("1e308", "-5"), ("nan", "nan"), ("1", "1")])
                )
            if draw(st.booleans()):
                dataset.RescaleSlope, dataset.RescaleIntercept = draw(
                    st.sampled_from([("0", "0"), ("1e300", "1e300"), ("inf", "1")])
                )
            dataset.PixelData = pixel_bytes
            if syntax is not None:
                dataset.file_meta.TransferSyntaxUID = syntax
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=False)
            data = bytearray(buffer.getvalue())
        except Exception:  # noqa: BLE001 - a combination pydicom will not write: send what we have
            pass
        return (
            bytes(data),
            f"dicom {rows} x {columns} x {frames} frames, {samples} samples, {bits} bits, {photometric}, "
            f"{syntax or 'explicit LE'}, {len(pixel_bytes)} pixel bytes",
        )

    bomb = st.tuples(
        st.sampled_from(["L", "I;16", "RGB", "RGBA"]), st.sampled_from([(6324, 6324), (6325, 6325), (20000, 2000)])
    ).map(lambda spec: (zero_png(*spec), f"bomb PNG of zeros, {spec[0]} {spec[1][0]} x {spec[1][1]}"))
    magics = [
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0",
        b"\xff\xd8\xff\xdb",
        b"GIF89a",
        b"BM",
        b"II*\x00",
        b"MM\x00*",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"\0" * 128 + b"DICM",
        b"P5\n64 64\n255\n",
    ]
    magic = st.tuples(st.sampled_from(magics), st.binary(max_size=2048)).map(
        lambda pair: (pair[0] + pair[1], f"magic {pair[0][:12]!r} + {len(pair[1])} random bytes")
    )

    @st.composite
    def any_input(draw):
        # mutate 55 %, header 15 %, dicom 20 %, magic 7 %, bomb 3 % (each costs a second)
        roll = draw(st.integers(0, 99))
        kind = (
            mutated()
            if roll < 55
            else header()
            if roll < 70
            else dicom_file()
            if roll < 90
            else magic
            if roll < 97
            else bomb
        )
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
    return ", ".join(
        f"{step[0]}@{step[1]:.3g}" if isinstance(step[1], float) else f"{step[0]}@{step[1]}" for step in steps
    )


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

        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        _ZERO_PNGS[(mode, size)] = (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
        )
    return _ZERO_PNGS[(mode, size)]


# ---- worst cases: each case of issue 15, built on purpose and measured one at a time ---------------------------------


def ramp_png(mode: str, size: tuple[int, int]) -> bytes:
    """A valid PNG of `size` whose every row is a ramp (so stretching has work to do), built row by row."""
    width, height = size
    depth, color, channels = {"L": (8, 0, 1), "I;16": (16, 0, 1), "RGB": (8, 2, 3)}[mode]
    ramp = (np.arange(width) * (4096 // max(1, width // 16))) % (65536 if depth == 16 else 256)
    row = b"\0" + np.repeat(ramp.astype(">u2" if depth == 16 else np.uint8), channels).tobytes()
    compressor = zlib.compressobj(6)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def rle_zero_frame(rows: int, columns: int, segments: int) -> bytes:
    """A DICOM RLE frame of zeros: `segments` byte planes, each row one run-length packet list (PS3.5 G.3)."""
    full, rest = divmod(columns, 128)
    row = b"\x81\x00" * full + (bytes([257 - rest, 0]) if rest else b"")
    plane = row * rows
    plane += b"\0" * (len(plane) % 2)
    offsets = [64 + i * len(plane) for i in range(segments)]
    return struct.pack("<16I", segments, *offsets, *[0] * (15 - segments)) + plane * segments


def encapsulated(base: bytes, frame: bytes, syntax: str, **tags) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(io.BytesIO(base))
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def padded(data: bytes, mib: float) -> bytes:
    """`data` with `mib` MiB of empty private elements (8 bytes each) before its pixel data."""
    at = data.rindex(b"\xe0\x7f\x10\x00")
    count = int(mib * 2**20) // 8
    tags = ((0x0009 + 2 * (i // 0xF000), 0x1000 + i % 0xF000) for i in range(count))
    return data[:at] + b"".join(struct.pack("<HH2sH", group, element, b"LO", 0) for group, element in tags) + data[at:]


def forge_tiff(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.fromarray(picture()), "TIFF"))
    offset = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, offset)[0]):
        at = offset + 2 + 12 * i
        tag = struct.unpack_from("<H", data, at)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, at, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def forge_jpeg(width: int, height: int, mode: str = "L") -> bytes:
    data = bytearray(encode(Image.fromarray(picture()).convert(mode), "JPEG"))
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def worst_cases():
    """(label, bytes, suffix, legitimate) for every worst case; built one at a time, as they are measured."""
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    side = 6324  # 6324 x 6324 = 39.99 MP, the largest square under the 40-megapixel limit

    def ramp16(rows, columns):
        return (np.arange(rows * columns, dtype=np.uint32) % 4096).astype(np.uint16).reshape(rows, columns)

    originals = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray_originals"
    largest = max(originals.glob("*.jpeg"), key=lambda path: path.stat().st_size, default=None)
    if largest:
        yield f"real X-ray, largest of xray_originals ({largest.name})", largest.read_bytes(), None, True
    yield "40 MP 8-bit grey PNG", ramp_png("L", (side, side)), None, True
    yield "40 MP 16-bit grey PNG", ramp_png("I;16", (side, side)), None, True
    yield "40 MP 8-bit RGB PNG", ramp_png("RGB", (side, side)), None, True
    yield "40 MP RGBA PNG (20000 x 2000, transparency made black)", zero_png("RGBA", (20000, 2000)), None, False
    yield (
        "40 MP 8-bit grey JPEG",
        encode(Image.fromarray(np.tile(picture(side, 1)[0], (side, 1)), "L"), "JPEG", quality=90),
        None,
        True,
    )
    progressive = encode(Image.fromarray(np.tile(picture(side, 1)[0], (side, 1)), "L"), "JPEG", progressive=True)
    end, last = progressive.rindex(b"\xff\xd9"), progressive.rindex(b"\xff\xda")
    scans = progressive.count(b"\xff\xda")
    yield (
        "40 MP grey progressive JPEG, last scan repeated to 16 scans (the most allowed)",
        progressive[:end] + progressive[last:end] * (16 - scans) + progressive[end:],
        None,
        False,
    )
    repeats = (60 << 20) // (end - last)
    yield (
        f"40 MP grey progressive JPEG, last scan repeated {repeats:,} times",
        progressive[:end] + progressive[last:end] * repeats + progressive[end:],
        None,
        False,
    )
    yield (
        "40 MP RGB progressive JPEG",
        encode(Image.fromarray(np.tile(picture(side, 1)[0], (side, 1)), "L").convert("RGB"), "JPEG", progressive=True),
        None,
        True,
    )
    big = dicom(ramp16(5792, 5792))  # 33.5 MP: the largest 16-bit DICOM under the 64 MiB cap
    yield "33.5 MP 16-bit DICOM, 64 MiB (largest uncompressed under the cap)", big, None, True
    yield (
        "  the same, window width 0 (falls back to the full range)",
        dicom(ramp16(5792, 5792), WindowCenter=2048, WindowWidth=0),
        None,
        True,
    )
    del big
    yield (
        "RLE RGB 16-bit 6300 x 6300 (227 MiB decoded)",
        encapsulated(
            dicom(picture(64, 64), bits=8),
            rle_zero_frame(6300, 6300, 6),
            RLELossless,
            Rows=6300,
            Columns=6300,
            SamplesPerPixel=3,
            PhotometricInterpretation="RGB",
            PlanarConfiguration=0,
            BitsAllocated=16,
            BitsStored=16,
            HighBit=15,
        ),
        None,
        False,
    )
    yield (
        "RLE RGB 8-bit 6300 x 6300 (114 MiB decoded, under the budget)",
        encapsulated(
            dicom(picture(64, 64), bits=8),
            rle_zero_frame(6300, 6300, 3),
            RLELossless,
            Rows=6300,
            Columns=6300,
            SamplesPerPixel=3,
            PhotometricInterpretation="RGB",
            PlanarConfiguration=0,
        ),
        None,
        False,
    )
    small = dicom(picture().astype(np.uint16) * 16)
    yield "padded DICOM, 16 MiB of empty private elements", padded(small, 16), None, False
    yield "padded DICOM, 64 MiB of empty private elements", padded(small, 64 - 0.01), None, False
    yield (
        "100 x 100 DICOM wrapping a 54 MP JPEG frame",
        encapsulated(dicom(picture(100, 100), bits=8), encode(Image.new("L", (9000, 6000)), "JPEG"), JPEGBaseline8Bit),
        None,
        False,
    )
    yield "palette DICOM 6324 x 6324, 16-bit colour table (229 MiB as RGB)", palette_dicom(side, side), None, False
    yield "palette DICOM 4000 x 4000, 16-bit colour table", palette_dicom(4000, 4000), None, False
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\0" * 2**24
    yield (
        "deflated DICOM inflating to 1 GiB",
        deflated(small, b"".join(deflate.compress(zeros) for _ in range(64)) + deflate.flush()),
        None,
        False,
    )
    yield (
        "EPS (Ghostscript, where installed)",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 6000 6000\nshowpage\n",
        None,
        False,
    )
    yield "forged PNG header 6325 x 6325 (just over)", png_claiming(6325, 6325), None, False
    yield "forged PNG header 50000 x 50000", png_claiming(50000, 50000), None, False
    yield "forged JPEG header 6324 x 6324 RGB (under the limit)", forge_jpeg(side, side, "RGB"), None, False
    yield "forged JPEG header 65535 x 65535", forge_jpeg(65535, 65535), None, False
    yield "forged TIFF header 6324 x 6324", forge_tiff(side, side), None, False
    yield "forged TIFF header 100000 x 100000", forge_tiff(100000, 100000), None, False
    bmp = bytearray(encode(Image.fromarray(picture()), "BMP"))
    bmp[18:26] = struct.pack("<ii", side, side)
    yield "forged BMP header 6324 x 6324", bytes(bmp), None, False
    gif = bytearray(encode(Image.fromarray(picture()).convert("P"), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    yield "forged GIF header 65535 x 65535", bytes(gif), None, False
    webp = bytearray(encode(Image.fromarray(picture()).convert("RGB"), "WEBP"))
    webp[26:30] = struct.pack("<HH", 16383, 16383)
    yield "forged WebP header 16383 x 16383", bytes(webp), None, False
    yield "forged DICOM header 6324 x 6324, 16-bit, 8 KiB of pixels", forged_dicom(side, side), None, False
    yield "DICOM claiming 100,000 frames", forged_dicom(64, 72, NumberOfFrames="100000", exact=True), None, False


def png_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (64, 64)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def palette_dicom(rows: int, columns: int) -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom(picture(64, 64), "PALETTE COLOR", bits=8)))
    dataset.Rows, dataset.Columns = rows, columns
    ramp = np.arange(256, dtype=np.uint16) * 257
    for i, table in enumerate((ramp, ramp[::-1].copy(), ramp)):
        dataset.add_new(0x00281101 + i, "US", [256, 0, 16])
        dataset.add_new(0x00281201 + i, "OW", table.tobytes())
    dataset.PixelData = (np.arange(rows * columns, dtype=np.uint32) % 251).astype(np.uint8).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deflated(data: bytes, body: bytes) -> bytes:
    """`data`'s file meta, saying Deflated Explicit VR Little Endian, followed by `body` as the deflated data set."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, dataset.file_meta)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + body


def forged_dicom(rows: int, columns: int, exact: bool = False, **tags) -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(dicom(picture().astype(np.uint16))))
    dataset.Rows, dataset.Columns = rows, columns
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.PixelData = b"\x01\x02" * (rows * columns if exact else 4096)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def measure_worst_cases(runner: Runner, repeats: int, only: str = "") -> None:
    """Print the worst-case table: per case its peak memory over the worker at rest, its time, and the loader's
    answer."""
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in psutil.getloadavg())} ({psutil.cpu_count()} cores); "
        f"best of {repeats}\n"
    )
    print("| case | file | peak extra MiB | seconds | answer |\n|---|---:|---:|---:|---|")
    rows, reference = [], 0.0
    for label, data, suffix, legitimate in worst_cases():
        if only not in label and not legitimate:
            continue
        results = []
        # a fresh worker each time: memory an earlier case left to malloc would hide this one's
        for _ in range(repeats):
            runner.restart()
            results.append(runner.run(data, suffix))
        outcome, message = results[0][0], results[0][3]
        seconds, peak = min(r[1] for r in results), min(r[2] for r in results)
        if legitimate:
            reference = max(reference, peak)
        answer = (
            "decoded"
            if outcome.startswith("RGB image")
            else ("refused: " + message.removeprefix("The upload ")[:100])
            if message
            else outcome[:100]
        )
        rows.append((label, len(data), peak, seconds, answer, legitimate))
        print(f"| {label} | {len(data) / 2**20:,.1f} MiB | {peak:,.0f} | {seconds:.2f} | {answer} |", flush=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in psutil.getloadavg())}")
    print(
        f"largest legitimate upload: +{reference:,.0f} MiB; target: every case under {1.5 * reference:,.0f} MiB (1.5x) "
        "and 3 s"
    )
    over = [row for row in rows if row[2] > 1.5 * reference or row[3] > 3]
    print(
        "every case within the targets"
        if not over
        else "over a target: " + "; ".join(f"{row[0]} ({row[2]:,.0f} MiB, {row[3]:.2f} s)" for row in over)
    )


# ---- the worker: one input at a time ---------------------------------------------------------------------------------


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
        from cxr.predictor import load_classifier

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
        message = ""
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
                        warning, scores, overlay, check = app.answer_upload(classifier, str(source))
                        outcome = (
                            "RGB image; app.answer_upload answered"
                            if len(scores) == 3 and overlay.mode == "RGB"
                            else "crash: app.answer_upload gave a bad answer"
                        )
                    except gr.Error as error:
                        outcome = f"crash: app.answer_upload refused what load_image accepted: {error.message[:80]}"
        except ImageLoadError as error:
            outcome, message = "ImageLoadError: " + wording(str(error)), str(error)
        except BaseException as error:  # noqa: BLE001 - anything else is what we are looking for
            frame = traceback.extract_tb(error.__traceback__)[-1]
            outcome = (
                f"crash: {type(error).__name__}: {str(error)[:100]} (at {Path(frame.filename).name}:{frame.lineno} in "
                f"{frame.name})"
            )
        connection.send((outcome, time.perf_counter() - start, peak_mib() - at_rest, message))


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
        # imports (and the model) load outside the limits
        if not self.connection.poll(300) or self.connection.recv() != "ready":
            raise SystemExit("the fuzzing worker did not start")

    def run(self, data: bytes, suffix: str | None) -> tuple[str, float, float, str]:
        """(outcome, seconds, MiB the worker grew by on this input: its peak RSS over its RSS before it,
        ImageLoadError's message)."""
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
                return f"worker died (exit code {exit_code})", elapsed, peak, ""
            if elapsed > self.time_limit or peak > self.memory_limit:
                self.process.kill()
                self.process.join()
                self.start()
                return (
                    ("hang: over the time limit" if elapsed > self.time_limit else "memory: over the memory limit"),
                    elapsed,
                    peak,
                    "",
                )
        try:
            return self.connection.recv()
        except (EOFError, OSError):  # the worker died after the input was sent (e.g. killed for memory by the kernel)
            self.process.join()
            exit_code = self.process.exitcode
            self.start()
            return f"worker died (exit code {exit_code})", time.perf_counter() - start, peak, ""

    def restart(self) -> None:
        self.process.kill()
        self.process.join()
        self.start()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120, help="How long to fuzz.")
    parser.add_argument(
        "--time_limit", type=float, default=10, help="Seconds one input may take before it counts as a hang."
    )
    parser.add_argument("--memory_limit", type=float, default=3072, help="MiB the worker may reach on one input.")
    add_old_spelling(parser, "--time-limit", "time_limit", type=float)
    add_old_spelling(parser, "--memory-limit", "memory_limit", type=float)
    parser.add_argument(
        "--model", help="Also run app.answer_upload (with this model folder) on every input that decodes."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/fuzz"),
        help="Where crashing, hanging and memory-hungry inputs are saved.",
    )
    parser.add_argument(
        "--replay", type=Path, help="Run one saved input (its .json beside it gives the suffix) and print the outcome."
    )
    parser.add_argument(
        "--worst",
        action="store_true",
        help="Instead of fuzzing, measure each worst case (docs/security.md) and print the table.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="With --worst: runs per case; the table keeps the best (the CPU may be shared).",
    )
    parser.add_argument(
        "--case", default="", help="With --worst: only the cases whose label contains this text (to rerun an outlier)."
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()

    runner = Runner(args.model, args.time_limit, args.memory_limit)
    if args.worst:
        measure_worst_cases(runner, args.repeats, args.case)
        runner.close()
        return
    if args.replay:
        suffix = (
            json.loads(args.replay.with_suffix(".json").read_text()).get("suffix")
            if args.replay.with_suffix(".json").exists()
            else None
        )
        print(runner.run(args.replay.read_bytes(), suffix))
        runner.close()
        return

    from hypothesis import HealthCheck, Phase, given, settings

    outcomes, problems = collections.Counter(), []
    slowest, largest = (0.0, ""), (0.0, "")
    end = 0.0  # set once the seeds have run
    tried = 0

    @settings(
        max_examples=200, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )
    @given(strategies(make_seeds()))
    def fuzz(case) -> None:
        nonlocal tried, slowest, largest
        if time.monotonic() > end:
            return
        (data, description), suffix = case
        outcome, seconds, peak, _ = runner.run(data, suffix)
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
            (args.out / f"{name}.json").write_text(
                json.dumps({"outcome": outcome, "input": description, "suffix": suffix}, indent=2)
            )
            problems.append((outcome, label, args.out / f"{name}.bin"))

    for name, data in make_seeds().items():  # every seed as it is, first: each must decode
        outcome, seconds, peak, _ = runner.run(data, None)
        tried += 1
        outcomes["seed decoded" if outcome.startswith("RGB image") else f"crash: seed {name}: {outcome}"] += 1
    started = time.monotonic()
    end = started + args.seconds
    while time.monotonic() < end:
        fuzz()
    runner.close()

    print(
        f"Fuzzed cxr.images.load_image{' and app.answer_upload' if args.model else ''} for "
        f"{time.monotonic() - started:.0f} s: {tried:,} inputs (time limit {args.time_limit:g} s, memory limit "
        f"{args.memory_limit:,.0f} MiB per input)\n"
    )
    for outcome, count in outcomes.most_common():
        print(f"  {count:>7,}  {outcome}")
    bad = sum(count for outcome, count in outcomes.items() if outcome.startswith(PROBLEMS))
    print(
        f"\n  {tried - bad:,} of {tried:,} inputs ended in an RGB image or ImageLoadError; {bad:,} did not"
        + (":" if bad else ".")
    )
    for outcome, label, path in problems[:20]:
        print(f"    {outcome}\n      input: {label}\n      saved: {path}")
    print(f"\nslowest input: {slowest[0]:.2f} s, {slowest[1]}")
    print(
        f"most memory for one input: +{largest[0]:,.0f} MiB over the worker's resident memory before it, {largest[1]}"
    )


if __name__ == "__main__":
    main()
