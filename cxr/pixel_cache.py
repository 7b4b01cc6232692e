"""Decode once: a prepared tree's training and validation X-rays, decoded by the one loader (`cxr.images.load_image`)
and resized by the model's own image processor, kept as one uint8 array in a file beside the tree.

    <prepared_dir>.pixels/128px-<resize>-<data>.npy     (N, C, H, W) uint8: train, then validation, by path

Training reads its batches from that file (memory-mapped) instead of decoding every JPEG every epoch; augmentation and
normalisation then run on the batch as tensors (`cxr.transforms`). Without augmentation a row gives the tensor the
processor gives at inference, to float rounding (tests/test_pixel_cache.py holds it to 1/255 a pixel).

- Key: the tree's cached entries as `hf_data.prepare` recorded them (each row's path in the tree, the user's file it
  links to, that file's size and modification time: the pixel-relevant columns of its manifest.csv, read from the
  tree itself), the processor's resize settings (its whole configuration but the normalisation: networks that
  resize alike share one file) and `CACHE_VERSION` with the Pillow and transformers versions that decode and
  resize. Any change names another file, built afresh; the stale one of the same resize is removed.
- Grey: X-rays decode with R = G = B, so one channel is stored (expanded to three at batch time); three are stored
  only if some image has colour.
- Whole or absent: written under a temporary name, flushed and renamed (a killed build leaves no half cache; the
  next build, under the same lock, removes its leftovers). A file lock makes concurrent runs (several processes of
  one run, or two runs on one tree) build it once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import PIL
import transformers
from filelock import FileLock
from tqdm import tqdm

from cxr.folders import replaced_file
from cxr.images import load_image
from cxr.models import input_size
from cxr.transforms import processor_resize, resize_settings

CACHE_VERSION = 1  # raise when load_image or the way a row is made changes what a row holds
CACHED_SPLITS = ("train", "validation")  # decoded every epoch; test is decoded once, at the end, as before


def cache_folder(prepared_dir: str | os.PathLike) -> Path:
    return Path(f"{Path(prepared_dir).expanduser().resolve()}.pixels")


class PixelCache:
    """The training and validation rows of the prepared tree `prepared_dir`, resized by each of `processors` (None
    entries are skipped, so `[processor, teacher_processor]` may be passed as it is), built where missing or stale."""

    def __init__(self, prepared_dir: str | os.PathLike, processors: list):
        self.root = Path(prepared_dir).expanduser().resolve()
        self.files = [  # split/class/file, as the tree's manifest lists them (the tree is read, not the CSV)
            path.relative_to(self.root).as_posix()
            for split in CACHED_SPLITS
            for path in sorted((self.root / split).rglob("*"))
            if path.is_file() and not path.name.startswith(".")  # not a link `prepare` is staging
        ]
        self.rows = {str(self.root / file): index for index, file in enumerate(self.files)}
        self.arrays: dict[str, np.ndarray] = {}  # resize settings -> (N, C, H, W) uint8, memory-mapped
        self.paths: dict[str, Path] = {}
        for processor in processors:
            if processor is not None and self.files and resize_settings(processor) not in self.arrays:
                path = self._open_or_build(processor)
                self.paths[resize_settings(processor)] = path
                self.arrays[resize_settings(processor)] = np.load(path, mmap_mode="r")

    def rows_of(self, sources: list, processor) -> list[int | None]:
        """The row of each image source (a path in the tree) in `processor`'s array; None for one it does not hold
        (another split, raw bytes, a processor it was not built for)."""
        if resize_settings(processor) not in self.arrays:
            return [None] * len(sources)
        return [self.rows.get(os.path.abspath(source)) if isinstance(source, str) else None for source in sources]

    def array(self, processor) -> np.ndarray:
        return self.arrays[resize_settings(processor)]

    def _open_or_build(self, processor) -> Path:
        folder = cache_folder(self.root)
        folder.mkdir(parents=True, exist_ok=True)
        settings = resize_settings(processor)
        prefix = f"{input_size(processor)}px-{_digest(settings)[:8]}-"
        path = folder / f"{prefix}{self._data_key(settings)[:16]}.npy"
        with FileLock(folder / "build.lock"):
            if path.is_file():
                return path
            for leftover in [*folder.glob(".*.partial"), *folder.glob(f"{prefix}*.npy")]:
                leftover.unlink()  # a killed build's temporary file, or the cache of an older tree or loader
            try:
                self._build(path, processor, channels=1)
            except _NotGrey:
                self._build(path, processor, channels=3)
        return path

    def _data_key(self, settings: str) -> str:
        """What the rows hold depends on: which files, in which order, each one's bytes (its size and time stand for
        them), the resize and the code that decodes and resizes."""
        digest = hashlib.sha256()
        for file in self.files:
            target = os.path.realpath(self.root / file)  # through the tree's link, to the user's file
            status = os.stat(target)
            digest.update(f"{file}\0{target}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        digest.update(f"{settings}\0{CACHE_VERSION}\0{PIL.__version__}\0{transformers.__version__}".encode())
        return digest.hexdigest()

    def _build(self, path: Path, processor, channels: int) -> None:
        size = input_size(processor)
        with replaced_file(path, "wb") as file:
            os.fchmod(file.fileno(), 0o644)  # readable like the tree itself (a temporary file starts private)
            shape = None
            progress = tqdm(self.files, desc=f"Decoding X-rays once ({size} px, {path.parent.name})", unit="image")
            for file_name in progress:
                image = load_image(self.root / file_name, draft_size=size)
                pixels = processor_resize(processor, [image])[0].numpy()  # (3, H, W) uint8
                if shape is None:
                    shape = (len(self.files), channels, *pixels.shape[1:])
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
                    np.lib.format.write_array_header_1_0(file, header | {"shape": shape})
                if pixels.shape[1:] != shape[2:]:
                    raise ValueError(
                        f"The image processor resizes {file_name} to {pixels.shape[1:]}, the first image to "
                        f"{shape[2:]}: a batch needs one size (train with --pixel_cache false)."
                    )
                if channels == 1:
                    if not (pixels[1:] == pixels[:1]).all():
                        raise _NotGrey
                    pixels = pixels[:1]
                file.write(np.ascontiguousarray(pixels).tobytes())


class _NotGrey(Exception):
    """An image with colour: the cache is rebuilt with three channels."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
