"""One image path: every X-ray the project touches is decoded here.

Training, evaluation, the app, the batch predictor, the benchmarks and the tests all call
`load_image`, so the model always sees the same pixels for the same file:

    file -> byte cap -> format allowed? -> header read (bounded) -> decode budget -> decode one frame
    -> EXIF orientation -> bit depth and mode normalised -> RGB PIL image

The decode budget: before any pixel is decoded, the header says what decoding will cost (width x height,
samples, bits, for compressed DICOM the embedded frame's own header) and anything over the limits below is
refused. What a header cannot lie about past that point is measured by `python -m benchmarks.fuzz_images --worst`
(docs/security.md). Resizing and normalisation are left to the model's own image processor.
Anything that cannot be turned into an image raises `ImageLoadError` with a plain-text message meant for a
person, never a bare Pillow traceback; values taken from the file are quoted and stripped of markup.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import math
import os
import queue
import re
import select
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import fcntl
except ImportError:  # Windows: no pipe sizes to set (and no isolated decoding)
    fcntl = None

# Real chest X-rays are at most ~3,000 x 3,000 px (9 MP); DICOM detectors reach ~4,300 x 4,300.
# Anything far beyond that is a mistake or a decompression bomb, refused before decoding.
MAX_PIXELS = 40_000_000
# Bytes one decoded frame may take: an RGB image at the pixel limit as Pillow holds it (4 bytes a pixel).
# A 40-megapixel 8-bit RGB or 16-bit grey X-ray fits; 16-bit RGB or a 16-bit palette at that size does not.
MAX_DECODE_BYTES = 4 * MAX_PIXELS
MAX_FILE_BYTES = 64 * 1024 * 1024
MIN_SIDE = 32
# Header reads pydicom may make (about one per element): a real X-ray header has a few hundred elements, while
# a file padded with millions of empty ones would cost seconds and hundreds of MiB to parse.
MAX_DICOM_READS = 50_000
MAX_FRAGMENTS = 10_000  # encapsulated DICOM pixel data: fragments walked to find the first frame
# A progressive JPEG is decoded in one pass per scan (libjpeg writes 6 for grey, 10 for colour); a small file repeating
# one scan thousands of times is a CPU bomb its size header cannot show: scans x pixels is bounded, as 16 scans at
# 40 MP.
MAX_SCAN_PIXELS = 16 * MAX_PIXELS
# Only the formats the README names; everything else (EPS would start Ghostscript) is refused unopened.
PILLOW_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP")  # JPEG includes MPO, the JPEGs phones and cameras write
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check agrees (it errors at twice this, warns above it)
# The file names the batch predictor and the app's examples pick up in a folder: Pillow's common formats and DICOM.
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageLoadError(ValueError):
    """An input that is not a usable image; the message is plain text, safe to show to a user."""


def load_image(
    source: ImageSource, draft_size: int | None = None, isolate: bool = False, file_name: str | None = None
) -> Image.Image:
    """Decode `source` into an RGB image, or raise `ImageLoadError` saying why not.

    `source` is a file path, the raw bytes of a file, a PIL image or a numpy array.
    `draft_size`, when given, lets large JPEGs decode at a reduced scale that is still at least
    `draft_size` pixels on each side (much cheaper, and invisible after resizing to the model's input).
    `isolate=True` (for uploads from strangers) decodes a file in a worker process capped at `DECODE_SECONDS` and
    `DECODE_MEMORY`, bounding what no header tells; training and batch prediction of one's own files do without.
    `file_name`, for raw bytes, is the file they were read from (cxr.cluster reads files as bytes): messages name it,
    and its suffix marks DICOM, exactly as for the path itself.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        try:
            image = Image.fromarray(source)
        except (TypeError, ValueError) as error:
            raise ImageLoadError(f"Array of shape {source.shape} and dtype {source.dtype} is not an image.") from error
    else:
        data, name = _read_bytes(source, file_name)
        dicom = _is_dicom(data, file_name or source)
        if isolate:
            return _to_rgb(_decode_in_worker(data, dicom, name, draft_size))
        image = _decode_file(data, dicom, name, draft_size)
    return _to_rgb(_finish(image, _name_of(file_name or source)))


def _decode_file(data: bytes, dicom: bool, name: str, draft_size: int | None) -> Image.Image:
    return _decode_dicom(data, name) if dicom else _open_with_pillow(data, name, draft_size)


def _finish(image: Image.Image, name: str) -> Image.Image:
    """The decoded frame upright, as 8-bit grey ("L") or RGB: the last step, to RGB, is `_to_rgb`'s."""
    _check_size(image.size, name)
    if image.getexif().get(0x0112, 1) != 1:  # exif_transpose copies even an upright image: 160 MB at 40 MP in RGB
        image = ImageOps.exif_transpose(image)
    return _to_gray_or_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def _quote(value: object, limit: int = 80) -> str:
    """A value from the file (its name, a tag, a decoder's complaint) as quoted plain text: no markup, bounded."""
    text = re.sub(r"[^\w .,:;()/+=#@%-]", "?", str(value))
    return "'" + (text[:limit] + "..." if len(text) > limit else text) + "'"


def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return _quote(Path(source).name)
    return "The upload"


def _read_bytes(source: str | os.PathLike | bytes, file_name: str | None = None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), _name_of(file_name)
    else:
        path = Path(source)
        name = _quote(path.name)
        try:
            info = path.stat()
            # a folder, a pipe (opening it would wait forever) or a device (/dev/zero never ends)
            if not stat.S_ISREG(info.st_mode):
                raise ImageLoadError(f"{name} is not a regular file.")
            if info.st_size > MAX_FILE_BYTES:
                raise ImageLoadError(
                    f"{name} is {info.st_size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB."
                )
            with path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)  # never more than the limit, even from a file still growing
        except OSError as error:
            raise ImageLoadError(f"Cannot read {name}: {_quote(error.strerror or error)}.") from error
    if not data:
        raise ImageLoadError(f"{name} is empty (0 bytes).")
    if len(data) > MAX_FILE_BYTES:
        raise ImageLoadError(f"{name} is {len(data) / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB.")
    return data, name


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(
            f"{name} is {width} x {height} px; images over {MAX_PIXELS / 1e6:.0f} megapixels are refused by this app "
            "(no chest X-ray is that large, and decoding it could exhaust memory)."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(
            f"{name} is only {width} x {height} px; a chest X-ray needs at least {MIN_SIDE} px a side."
        )


def _check_budget(decoded_bytes: int, what: str, name: str) -> None:
    if decoded_bytes > MAX_DECODE_BYTES:
        raise ImageLoadError(
            f"{name} would take {decoded_bytes / 2**20:,.0f} MiB to decode ({what}); the limit is "
            f"{MAX_DECODE_BYTES / 2**20:,.0f} MiB, a {MAX_PIXELS / 1e6:.0f}-megapixel RGB image."
        )


# ---- JPEG, PNG, TIFF, BMP, GIF, WebP: Pillow -------------------------------------------------------------------------


def _open_with_pillow(data: bytes, name: str, draft_size: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over MAX_PIXELS: refused just below
            image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        _check_size(image.size, name)  # header only: refuse bombs before a single pixel is decoded
        _check_budget(image.width * image.height * _bytes_per_pixel(image.mode), f"{image.mode} pixels", name)
        if image.format in ("JPEG", "MPO"):
            _check_scans(data, image.width * image.height, name)
        if draft_size and image.format in ("JPEG", "MPO"):
            image.draft(image.mode, (draft_size, draft_size))
        image.load()  # the first frame only, for GIF, TIFF, WebP and MPO
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageLoadError(
            f"{name} is not an image this app reads (JPEG, PNG, TIFF, BMP, GIF, WebP or DICOM)."
        ) from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"{name} is refused: images over {MAX_PIXELS / 1e6:.0f} megapixels could exhaust memory."
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageLoadError(f"{name} is damaged or truncated and cannot be decoded ({_quote(error)}).") from error
    return image


def _check_scans(jpeg: bytes, pixels: int, name: str) -> None:
    # FF DA starts a scan; inside compressed data an FF is always followed by 00 or a restart marker, so counting
    # FF DA counts scans (and those of an embedded EXIF thumbnail).
    scans = jpeg.count(b"\xff\xda")
    if scans * pixels > MAX_SCAN_PIXELS:
        raise ImageLoadError(
            f"{name} is a JPEG of {scans:,} scans, each a full decoding pass; "
            f"at its size the limit is {MAX_SCAN_PIXELS // max(pixels, 1)}."
        )


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow allocates per pixel: 1 for one 8-bit band, 2 for 16-bit grey, 4 for everything else."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def _is_dicom(data: bytes, source: str | os.PathLike | bytes) -> bool:
    named = isinstance(source, (str, os.PathLike)) and str(source).lower().endswith((".dcm", ".dicom"))
    return data[128:132] == b"DICM" or named


# ---- DICOM: pydicom, header first ------------------------------------------------------------------------------------

_DICOM_TAGS = [  # all the decode reads; everything else in the header is skipped, not parsed
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "PixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
]
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_RLE = "1.2.840.10008.1.2.5"
_JPEG = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",  # baseline, 12-bit, lossless
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
}  # JPEG-LS
_JPEG2000 = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}  # HTJ2K


class _BoundedReader(io.BytesIO):
    """The file as pydicom reads it: a bounded number of reads (one per element, roughly), and never `read()` of
    everything, which is how pydicom inflates a deflated data set (a zip bomb in waiting)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads, self.refused = 0, ""

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > MAX_DICOM_READS:
            self.refused = f"its header has more than {MAX_DICOM_READS:,} elements"
        elif size is None or size < 0:
            self.refused = "its data set is deflated (zip-compressed), which this app does not read"
        if self.refused:
            raise EOFError(self.refused)  # pydicom may rewrap it; load_image reports `refused`
        return super().read(size)


def _decode_dicom(data: bytes, name: str) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut
    except ImportError as error:  # pragma: no cover - pydicom is in requirements.txt
        raise ImageLoadError("DICOM support needs pydicom: pip install pydicom") from error
    reader = _BoundedReader(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every non-conformant tag; broken files fail below
            dataset = pydicom.dcmread(reader, force=True, specific_tags=_DICOM_TAGS)
            if reader.refused:  # pydicom swallows an EOFError in the header and returns what it read so far
                raise ImageLoadError(f"{name} is refused: {reader.refused}.")
            reader.reads = -(10**9)  # header read: the decode below may read freely
            _check_dicom_budget(dataset, name)
            dataset.pixel_array_options(index=0)  # multi-frame: only the first frame is decoded
            pixels = dataset.pixel_array
            photometric = str(dataset.get("PhotometricInterpretation", ""))
            if photometric == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, dataset)  # grey indices into a colour table, not grey values
    except ImageLoadError:
        raise
    except Exception as error:  # pydicom raises many types for bad or unsupported files
        if reader.refused:
            raise ImageLoadError(f"{name} is refused: {reader.refused}.") from error
        raise ImageLoadError(f"{name} looks like DICOM but its pixels cannot be read ({_quote(error)}).") from error
    if pixels.ndim == 3:
        return Image.fromarray(_stretch_to_uint8(pixels))
    gray = _stretch_to_uint8(pixels, lambda chunk: _window(apply_modality_lut(chunk, dataset), dataset))
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores bone dark; X-ray viewers (and our model) expect bone bright
        np.subtract(255, gray, out=gray)
    return Image.fromarray(gray, mode="L")


def _check_dicom_budget(dataset, name: str) -> None:
    """Refuse, from the header alone, a DICOM whose first frame is over the limits or not what the header says."""
    if "PixelData" not in dataset:
        raise ImageLoadError(f"{name} is a DICOM file without pixel data (a report or a structured document?).")
    rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
    samples, bits = int(dataset.get("SamplesPerPixel") or 1), int(dataset.get("BitsAllocated") or 0)
    _check_size((columns, rows), name)
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise ImageLoadError(
            f"{name} has {samples} samples of {bits} bits a pixel; "
            "this app reads 1 or 3 samples of 1, 8, 16 or 32 bits."
        )
    cost, what = rows * columns * samples * math.ceil(bits / 8), f"{samples} x {bits}-bit samples a pixel"
    if str(dataset.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        entry_bits = _int_at(dataset.get("RedPaletteColorLookupTableDescriptor"), 2, 16)
        cost, what = (
            max(cost, rows * columns * 3 * (2 if entry_bits > 8 else 1)),
            f"RGB from a {entry_bits}-bit colour table",
        )
    _check_budget(cost, what, name)
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1"))
    pixel_data = dataset.PixelData
    if syntax in _NATIVE:
        from pydicom.pixels.utils import get_expected_length

        frames = max(1, _int_at([dataset.get("NumberOfFrames")], 0, 1))
        # YBR_FULL_422 holds 2 samples a pixel, not 3
        needed = math.ceil(get_expected_length(dataset, unit="bytes") / frames)
        if len(pixel_data) < needed:
            raise ImageLoadError(
                f"{name} is truncated: its first frame needs {needed:,} bytes of pixel data, "
                f"it holds {len(pixel_data):,}."
            )
        return
    if syntax != _RLE and syntax not in _JPEG | _JPEG2000:
        raise ImageLoadError(f"{name} uses transfer syntax {_quote(syntax, 64)}, which this app does not decode.")
    frame = _first_frame(pixel_data, dataset, name)
    if syntax == _RLE:
        segments = struct.unpack("<I", frame[:4])[0] if len(frame) >= 64 else 0
        if segments != samples * math.ceil(bits / 8):
            raise ImageLoadError(
                f"{name}'s RLE frame holds {segments} segments; its header needs {samples * math.ceil(bits / 8)}."
            )
        return
    if syntax in _JPEG:
        _check_scans(frame, rows * columns, name)
    embedded = _jpeg_size(frame) if syntax in _JPEG else _jpeg2000_size(frame)
    if embedded is None:
        raise ImageLoadError(f"{name}'s compressed frame has no readable size header.")
    width, height, components = embedded
    if (width, height, components) != (columns, rows, samples):
        raise ImageLoadError(
            f"{name} says {columns} x {rows} px with {samples} sample(s), but its compressed frame is "
            f"{width} x {height} px with {components}; refused before decoding."
        )


def _int_at(value, index: int, default: int) -> int:
    try:
        return int(value[index])
    except (TypeError, IndexError, ValueError):
        return default


def _first_frame(pixel_data: bytes, dataset, name: str) -> bytes:
    """The bytes of the first frame of encapsulated pixel data, after checking the number of fragments."""
    from pydicom.encaps import get_frame

    position, fragments = 0, 0
    while position + 8 <= len(pixel_data) and fragments <= MAX_FRAGMENTS:  # items: (FFFE,E000) + length + bytes
        tag, length = struct.unpack_from("<II", pixel_data, position)
        if tag != 0xE000FFFE:
            break
        position, fragments = position + 8 + length, fragments + 1
    if fragments > MAX_FRAGMENTS:
        raise ImageLoadError(f"{name}'s pixel data is split into more than {MAX_FRAGMENTS:,} fragments.")
    frames = max(1, _int_at([dataset.get("NumberOfFrames")], 0, 1))
    return get_frame(pixel_data, 0, number_of_frames=frames)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG or JPEG-LS frame's start-of-frame marker."""
    position = 2 if frame[:2] == b"\xff\xd8" else len(frame)
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker, length = frame[position + 1], struct.unpack_from(">H", frame, position + 2)[0]
        if marker in _SOF and position + 10 <= len(frame):
            height, width, components = struct.unpack_from(">HHB", frame, position + 5)
            return width, height, components
        position += 2 + length
    return None


def _jpeg2000_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 codestream's SIZ marker (inside a JP2 box or bare)."""
    at = frame.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 42 > len(frame):
        return None
    width, height, left, top = struct.unpack_from(">IIII", frame, at + 8)
    components = struct.unpack_from(">H", frame, at + 40)[0]
    return width - left, height - top, components


def _window(values: np.ndarray, dataset) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    width = dataset.get("WindowWidth")
    # several windows: pydicom uses the first
    if width is not None and not isinstance(width, (str, bytes)) and hasattr(width, "__len__"):
        width = width[0] if len(width) else None
    if "VOILUTSequence" not in dataset and width is not None and not _positive(width):
        return values  # a window width <= 0 is invalid (PS3.3 C.11.2.1.2): fall back to the full range
    return apply_voi_lut(values, dataset)


def _positive(value) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


# ---- to 8-bit RGB ----------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # values a time: float64 working copies stay at 8 MiB, not 8 bytes for every pixel of the image


def _stretch_to_uint8(pixels: np.ndarray, transform=None) -> np.ndarray:
    """Map the image's own value range (after `transform`, if given) onto 0-255, a chunk of rows at a time.

    12- and 16-bit X-rays rarely use their full range. Working in chunks keeps the extra memory to a few MiB
    whatever the image's size, where whole-image float64 copies cost 8 bytes for every pixel and sample.
    """
    rows = max(1, _CHUNK // max(1, pixels[0].size if pixels.ndim > 1 else 1))
    chunks = [slice(start, start + rows) for start in range(0, pixels.shape[0], rows)]
    values = lambda part: np.asarray(transform(pixels[part]) if transform else pixels[part], dtype=np.float64)  # noqa: E731
    low, high = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a chunk of NaNs only; an image of NaNs only ends black below
        for part in chunks:
            chunk = values(part)
            if chunk.size:
                low, high = min(low, float(np.nanmin(chunk))), max(high, float(np.nanmax(chunk)))
    out = np.zeros(pixels.shape, dtype=np.uint8)
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return out
    scale = 255.0 / (high - low)
    for part in chunks:
        out[part] = np.round((values(part) - low) * scale)
    return out


def _to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """8-bit grey stays grey (a third of the bytes to move), everything else becomes 8-bit RGB."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)), mode="L")
    if image.mode in ("L", "1"):
        return image if image.mode == "L" else image.convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent areas become black, the background of an X-ray: black pasted through the inverted alpha, which
        # costs one RGB copy and two alpha bands where a composite over a black RGBA image cost four full copies.
        if image.mode not in ("RGBA", "LA"):
            image = image.convert("RGBA")
        transparency = image.getchannel("A").point(lambda alpha: 255 - alpha)
        rgb = image.convert("RGB")
        rgb.paste((0, 0, 0), mask=transparency)
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")


# ---- isolate=True: the decode in a worker process, capped in time and memory -----------------------------------------
# Workers are fresh interpreters (`subprocess`, fork+exec), started once and reused: a fork of the server itself would
# copy the locks its other threads hold inside torch (OpenMP, allocator), and a child or the parent could wait on them
# for good. A worker imports this module's decoders only (numpy, Pillow, pydicom; never torch or gradio), sets its own
# memory cap (RLIMIT_AS) and is killed and replaced when it overruns the time cap, dies or answers out of protocol.
#
# What crosses the boundary cannot run code in the server: fixed binary headers and raw bytes, never a pickle.
#   request  server -> worker: REQUEST (magic, DICOM flag, draft size, name length, data length), the name (UTF-8),
#            the file's bytes
#   reply    worker -> server: REPLY (magic, kind, channels, width, height, body length), the body (8-bit pixels row
#            by row for an image, UTF-8 text for an error), then REPLY_END
# The server checks the reply's header against its own limits (kind, channels, sides, pixels, decode budget, body
# length) before it allocates the body; anything else is refused like a file that cannot be decoded.

DECODE_SECONDS = 10.0  # wall time one isolated decode may take
DECODE_MEMORY = 4 * MAX_DECODE_BYTES  # address space a worker may add to what it holds once its decoders are imported
WORKER_START_SECONDS = 60.0  # a fresh worker's imports, paid once, outside any upload's time cap
WORKER_READY = b"CXRW"
REQUEST = struct.Struct("<4sBxxxIII")  # magic, DICOM flag, draft size (0: none), name length, data length
REQUEST_MAGIC = b"CXRQ"
REPLY = struct.Struct("<4sBBxxIIQ")  # magic, kind, channels, width, height, body length
REPLY_MAGIC, REPLY_END = b"CXRA", b"CXRE"
REPLY_IMAGE, REPLY_ERROR = 0, 1
MAX_ERROR_BYTES = 4096
_MODES = {1: "L", 3: "RGB"}
_CRASHED = "{name} stopped its decoder (out of memory or a crash); it cannot be read."


def _worker_command(memory: int) -> list[str]:
    return [sys.executable, "-c", f"from cxr.images import serve_decodes; serve_decodes({int(memory)})"]


class DecodeWorkers:
    """A pool of decode workers, started now; `decode` takes a free one (waiting while all are busy)."""

    def __init__(self, size: int = 2, memory: int | None = None, command: list[str] | None = None):
        self.command = command or _worker_command(DECODE_MEMORY if memory is None else memory)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: set = set()
        self._lock = threading.Lock()
        for _ in range(size):
            self._idle.put(self._start())

    def _start(self) -> subprocess.Popen:
        # Between the decodes: one thread, and big buffers handed back to the system, so the memory cap stays a cap.
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        worker = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        os.set_blocking(worker.stdin.fileno(), False)
        for pipe in (worker.stdin, worker.stdout):  # fewer round trips for a 40-megapixel answer
            with contextlib.suppress(OSError, AttributeError):  # Linux only; 1 MiB: the unprivileged maximum
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        worker.ready = False
        with self._lock:
            self._workers.add(worker)
        return worker

    def _retire(self, worker: subprocess.Popen) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.kill()
        worker.wait()
        for pipe in (worker.stdin, worker.stdout):
            pipe.close()

    def decode(self, data: bytes, dicom: bool, name: str, draft_size: int | None) -> Image.Image:
        worker = self._idle.get()
        keep = False
        try:
            if worker.poll() is not None:  # died while idle: its replacement takes the request
                self._retire(worker)
                worker = self._start()
            if not worker.ready:
                _receive(worker, len(WORKER_READY), time.monotonic() + WORKER_START_SECONDS, name, exact=WORKER_READY)
                worker.ready = True
            image = _exchange(worker, data, dicom, name, draft_size)
            keep = True
            return image
        except _ErrorReply as reply:  # the worker answered in protocol: it stays
            keep = True
            raise ImageLoadError(str(reply)) from None
        finally:
            if not keep:
                self._retire(worker)
                worker = self._start()
            self._idle.put(worker)

    def pids(self) -> list[int]:
        with self._lock:
            return [worker.pid for worker in self._workers]

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            self._retire(worker)


class _ErrorReply(Exception):
    """A well-formed error answer from a worker: the file's fault, not the worker's."""


def _exchange(worker: subprocess.Popen, data: bytes, dicom: bool, name: str, draft_size: int | None) -> Image.Image:
    deadline = time.monotonic() + DECODE_SECONDS
    label = name.encode("utf-8")
    _send(worker, REQUEST.pack(REQUEST_MAGIC, int(dicom), draft_size or 0, len(label), len(data)), deadline, name)
    _send(worker, label + data, deadline, name)
    magic, kind, channels, width, height, length = REPLY.unpack(_receive(worker, REPLY.size, deadline, name))
    refused = _check_reply(magic, kind, channels, width, height, length)
    if refused:
        raise ImageLoadError(f"{name} cannot be decoded: its decoder's answer was refused ({refused}).")
    body = _receive(worker, length, deadline, name)
    _receive(worker, len(REPLY_END), deadline, name, exact=REPLY_END)
    if kind == REPLY_ERROR:
        raise _ErrorReply(body.decode("utf-8", "replace"))
    mode = _MODES[channels]
    return Image.frombuffer(mode, (width, height), body, "raw", mode, 0, 1)


def _check_reply(magic: bytes, kind: int, channels: int, width: int, height: int, length: int) -> str:
    """Why a reply header is refused, before anything is allocated for its body; '' if it is within the limits."""
    if magic != REPLY_MAGIC:
        return "not a decoder reply"
    if kind == REPLY_ERROR:
        return "" if length <= MAX_ERROR_BYTES else f"an error message of {length:,} bytes"
    if kind != REPLY_IMAGE or channels not in _MODES:
        return f"kind {kind} with {channels} channels"
    if min(width, height) < MIN_SIDE or width * height > MAX_PIXELS or width * height * channels > MAX_DECODE_BYTES:
        return f"{width} x {height} px, outside the limits"
    if length != width * height * channels:
        return f"{length:,} bytes of pixels where {width} x {height} x {channels} needs {width * height * channels:,}"
    return ""


def _send(worker: subprocess.Popen, data: bytes, deadline: float, name: str) -> None:
    view, fd = memoryview(data), worker.stdin.fileno()
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise ImageLoadError(f"{name} took longer than {DECODE_SECONDS:g} s to decode and was stopped.")
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except OSError as error:  # the worker is gone
            raise ImageLoadError(
                f"{name} stopped its decoder (out of memory or a crash); it cannot be read."
            ) from error


def _receive(worker: subprocess.Popen, size: int, deadline: float, name: str, exact: bytes | None = None) -> bytearray:
    """`size` bytes from the worker (`exact` ones, if given) before `deadline`, or an ImageLoadError."""
    buffer, fd, got = bytearray(size), worker.stdout.fileno(), 0
    view = memoryview(buffer)
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ImageLoadError(f"{name} took longer than {DECODE_SECONDS:g} s to decode and was stopped.")
        count = os.readv(fd, [view[got:]])
        if not count:  # the worker died mid-answer: killed for memory, or a decoder crashed
            raise ImageLoadError(_CRASHED.format(name=name))
        got += count
    if exact is not None and buffer != exact:
        raise ImageLoadError(f"{name} cannot be decoded: its decoder's answer was refused (out of protocol).")
    return buffer


_pool: DecodeWorkers | None = None
_pool_lock = threading.Lock()


def start_decode_workers(size: int) -> DecodeWorkers:
    """Start the pool `load_image(..., isolate=True)` uses, `size` workers (the app: one per concurrent prediction);
    call it at start-up, so no upload waits for an interpreter. Later calls return the running pool."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = DecodeWorkers(size)
            atexit.register(_pool.close)
        return _pool


def _decode_in_worker(data: bytes, dicom: bool, name: str, draft_size: int | None) -> Image.Image:
    return start_decode_workers(2).decode(data, dicom, name, draft_size)


def serve_decodes(memory: int = DECODE_MEMORY) -> None:
    """A worker's loop: decode requests from stdin, answer on stdout, until stdin closes. Its own address space is
    capped at what it holds now plus `memory`."""
    import resource

    import pydicom.pixels  # noqa: F401 (paid at start-up, not on the first DICOM upload)

    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    in_use = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (in_use + memory, in_use + memory))
    replies.write(WORKER_READY)
    replies.flush()
    while header := requests.read(REQUEST.size):
        magic, dicom, draft_size, name_length, data_length = REQUEST.unpack(header)
        if magic != REQUEST_MAGIC:
            return
        name = requests.read(name_length).decode("utf-8", "replace")
        data = requests.read(data_length)
        image = None
        try:
            image = _finish(_decode_file(data, bool(dicom), name, draft_size or None), name)
            kind, channels, size, body = REPLY_IMAGE, len(image.getbands()), image.size, b""
        except ImageLoadError as error:
            kind, channels, size, body = REPLY_ERROR, 0, (0, 0), str(error).encode()[:MAX_ERROR_BYTES]
        except MemoryError:
            message = f"{name} needs more than {memory / 2**20:,.0f} MiB to decode; it is refused."
            kind, channels, size, body = REPLY_ERROR, 0, (0, 0), message.encode()[:MAX_ERROR_BYTES]
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises, the server gets a message
            message = f"{name} cannot be decoded ({_quote(error)})."
            kind, channels, size, body = REPLY_ERROR, 0, (0, 0), message.encode()[:MAX_ERROR_BYTES]
        replies.write(REPLY.pack(REPLY_MAGIC, kind, channels, *size, size[0] * size[1] * channels or len(body)))
        if kind == REPLY_IMAGE:  # a strip of rows at a time: no second copy of a 40-megapixel image
            rows = max(1, (4 << 20) // (size[0] * channels))
            for top in range(0, size[1], rows):
                replies.write(image.crop((0, top, size[0], min(size[1], top + rows))).tobytes())
        else:
            replies.write(body)
        image = None
        replies.write(REPLY_END)
        replies.flush()
