"""Test inputs made in memory: chest-like pictures in every format a user uploads, and broken ones."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

MARKUP_NAME = "<img src=x onerror=alert(1)><b>bold.png"  # a file name may hold any character but '/'
MARKUP_DICOM = "<b>MONO</b><img src=x>"  # a DICOM's Photometric Interpretation, which the decoder's message quotes


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def chest_like(width=300, height=240) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((np.sin(x / 17.0) + np.cos(y / 11.0) + 2) * 60).astype(np.uint8)


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int | None = None, **tags) -> bytes:
    """An uncompressed DICOM: uint8 pixels as 8-bit, anything else as 12-bit in 16; (frames, rows, columns) with
    `frames`."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    eight = pixels.dtype == np.uint8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = (8, 8, 7) if eight else (16, 12, 11)
    dataset.PixelRepresentation = 0
    if frames:
        dataset.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.PixelData = pixels.astype(np.uint8 if eight else np.uint16).tobytes()
    return save_dicom(dataset)


def save_dicom(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_dicom(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


def compressed_dicom(data: bytes, syntax) -> bytes:
    """The DICOM `data` re-encoded with pydicom's encoder for `syntax` (JPEG-LS: pyjpegls; JPEG 2000: openjpeg; RLE)."""
    dataset = read_dicom(data)
    dataset.compress(syntax)
    return save_dicom(dataset)


def encapsulated_dicom(
    fragments: list[bytes], syntax, rows: int, columns: int, samples: int = 1, bits: int = 8
) -> bytes:
    """A DICOM whose header says `rows` x `columns` and whose pixel data is `fragments`, as given: forged at will."""
    from pydicom.encaps import encapsulate

    dataset = read_dicom(dicom_bytes(np.zeros((rows, columns), np.uint8)))
    dataset.SamplesPerPixel, dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = samples, bits, bits, bits - 1
    if samples == 3:
        dataset.PhotometricInterpretation, dataset.PlanarConfiguration = "RGB", 0
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = (
        encapsulate(fragments)
        if len(fragments) == 1
        else b"".join(
            [struct.pack("<HHI", 0xFFFE, 0xE000, 0)]
            + [struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in fragments]
        )
    )
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    return save_dicom(dataset)


def padded_dicom(data: bytes, elements: int) -> bytes:
    """The DICOM `data` with `elements` empty private elements (8 bytes each) inserted before its pixel data."""
    at = data.rindex(b"\xe0\x7f\x10\x00")
    tags = ((0x0009 + 2 * (i // 0xF000), 0x1000 + i % 0xF000) for i in range(elements))
    return data[:at] + b"".join(struct.pack("<HH2sH", group, element, b"LO", 0) for group, element in tags) + data[at:]


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims another size: what a decompression bomb looks like to a decoder."""
    data = bytearray(encode(Image.new("L", (64, 64)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)
