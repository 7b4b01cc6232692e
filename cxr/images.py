"""One image path: every X-ray the project touches is decoded here.

Training, evaluation, the app, the batch predictor, the benchmarks and the tests all call
`load_image`, so the model always sees the same pixels for the same file:

    file (JPEG / PNG / DICOM / anything Pillow reads) -> size guard -> decode -> EXIF orientation
    -> bit depth and mode normalised -> RGB PIL image

Resizing and normalisation are left to the model's own image processor.
Anything that cannot be turned into an image raises `ImageLoadError` with a message meant for a
person, never a bare Pillow traceback.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Real chest X-rays are at most ~3,000 x 3,000 px (9 MP); DICOM detectors reach ~4,300 x 4,300.
# Anything far beyond that is a mistake or a decompression bomb, refused before decoding.
MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
MIN_SIDE = 32

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageLoadError(ValueError):
    """An input that is not a usable image; the message is safe to show to a user."""


def load_image(source: ImageSource, draft_size: int | None = None) -> Image.Image:
    """Decode `source` into an RGB image, or raise `ImageLoadError` saying why not.

    `source` is a file path, the raw bytes of a file, a PIL image or a numpy array.
    `draft_size`, when given, lets large JPEGs decode at a reduced scale that is still at least
    `draft_size` pixels on each side (much cheaper, and invisible after resizing to the model's input).
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        try:
            image = Image.fromarray(source)
        except (TypeError, ValueError) as error:
            raise ImageLoadError(f"Array of shape {source.shape} and dtype {source.dtype} is not an image.") from error
    else:
        data, name = _read_bytes(source)
        if _is_dicom(data, name):
            image = _decode_dicom(data, name)
        else:
            image = _open_with_pillow(data, name, draft_size)
    _check_size(image, _name_of(source))
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    return "upload"


def _read_bytes(source: str | os.PathLike | bytes) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "upload"
    else:
        path = Path(source)
        name = path.name
        try:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):  # a folder, a pipe (opening it would wait forever) or a device (/dev/zero never ends)
                raise ImageLoadError(f"'{name}' is not a regular file.")
            if info.st_size > MAX_FILE_BYTES:
                raise ImageLoadError(f"'{name}' is {info.st_size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB.")
            with path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)  # never more than the limit, even from a file still growing
        except OSError as error:
            raise ImageLoadError(f"Cannot read '{name}': {error.strerror or error}.") from error
    if not data:
        raise ImageLoadError(f"'{name}' is empty (0 bytes).")
    if len(data) > MAX_FILE_BYTES:
        raise ImageLoadError(f"'{name}' is {len(data) / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB.")
    return data, name


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(
            f"'{name}' is {width} x {height} px; images over {MAX_PIXELS / 1e6:.0f} megapixels are refused "
            "(no chest X-ray is that large, and decoding it could exhaust memory)."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(f"'{name}' is only {width} x {height} px; a chest X-ray needs at least {MIN_SIDE} px a side.")


def _open_with_pillow(data: bytes, name: str, draft_size: int | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        _check_size(image, name)  # header only: refuse bombs before a single pixel is decoded
        if draft_size and image.format == "JPEG":
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageLoadError(f"'{name}' is not an image Pillow or pydicom can read (JPEG, PNG, DICOM, ...).") from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"'{name}' is refused: images over {MAX_PIXELS / 1e6:.0f} megapixels could exhaust memory ({error}).") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"'{name}' is damaged or truncated and cannot be decoded ({error}).") from error
    return image


def _is_dicom(data: bytes, name: str) -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _decode_dicom(data: bytes, name: str) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:  # pragma: no cover - pydicom is in requirements.txt
        raise ImageLoadError("DICOM support needs pydicom: pip install pydicom") from error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every non-conformant tag; broken files fail below
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            rows, columns = int(dataset.Rows), int(dataset.Columns)
            if rows * columns > MAX_PIXELS:
                raise ImageLoadError(f"'{name}' is {columns} x {rows} px; images over {MAX_PIXELS / 1e6:.0f} megapixels are refused.")
            dataset.pixel_array_options(index=0)  # multi-frame: only the first frame is decoded
            pixels = dataset.pixel_array
            if pixels.ndim == 2:
                pixels = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    except ImageLoadError:
        raise
    except Exception as error:  # pydicom raises many types for bad or unsupported files
        raise ImageLoadError(f"'{name}' looks like DICOM but its pixels cannot be read ({error}).") from error
    if pixels.ndim == 3:
        return Image.fromarray(_stretch_to_uint8(pixels))
    gray = _stretch_to_uint8(pixels)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1 stores bone dark; X-ray viewers (and our model) expect bone bright
    return Image.fromarray(gray, mode="L")


def _stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map the image's own value range onto 0-255 (12- and 16-bit X-rays rarely use their full range)."""
    pixels = pixels.astype(np.float64)
    low, high = np.nanmin(pixels), np.nanmax(pixels)
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent areas become black, the background of an X-ray.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
