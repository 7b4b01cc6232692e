"""The one image loader: every kind of upload gives an RGB image or a clear ImageLoadError."""

import struct

import numpy as np
import pytest
from PIL import Image

from cxr.images import MAX_DICOM_READS, MAX_FILE_BYTES, MAX_FRAGMENTS, MAX_PIXELS, ImageLoadError, load_image
from inputs import (
    chest_like,
    compressed_dicom,
    dicom_bytes,
    encapsulated_dicom,
    encode,
    padded_dicom,
    png_claiming_size,
    read_dicom,
    save_dicom,
)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.fromarray(chest_like(), "L"), "JPEG"),
        lambda: encode(Image.fromarray(chest_like(), "L").convert("RGB"), "PNG"),
        lambda: encode(Image.fromarray(chest_like(), "L").convert("RGBA"), "PNG"),
        lambda: encode(Image.fromarray(chest_like(), "L").convert("P"), "GIF"),
        lambda: encode(Image.fromarray(chest_like(), "L").convert("LA"), "PNG"),
    ],
    ids=["gray-jpeg", "rgb-png", "rgba-png", "palette-gif", "gray-alpha-png"],
)
def test_common_formats_become_rgb_of_the_same_size(make):
    image = load_image(make())
    assert image.mode == "RGB"
    assert image.size == (300, 240)


def test_sixteen_bit_png_uses_its_own_range():
    # A 12-bit detector image stored in 16 bits: values 0..4095 must span the full 8-bit range, not look black.
    pixels = chest_like().astype(np.uint16) * 16
    image = load_image(encode(Image.fromarray(pixels), "PNG"))
    gray = np.asarray(image)[..., 0]
    assert gray.min() == 0 and gray.max() == 255


def test_exif_orientation_is_applied():
    image = Image.fromarray(chest_like(300, 200), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: viewers show it portrait
    loaded = load_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (200, 300)


def test_file_path_and_bytes_give_the_same_pixels(tmp_path):
    data = encode(Image.fromarray(chest_like(), "L"), "JPEG")
    path = tmp_path / "xray.jpeg"
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(data)))


def test_bytes_with_their_file_name_read_exactly_as_the_file(tmp_path):
    # what the Ray scorer does: bytes read elsewhere, named by their path; no preamble, so only the suffix says DICOM
    headerless = tmp_path / "headerless.dcm"
    headerless.write_bytes(dicom_bytes(chest_like(200, 160).astype(np.uint16) * 16)[132:])
    as_bytes = load_image(headerless.read_bytes(), file_name=str(headerless))
    assert np.array_equal(np.asarray(as_bytes), np.asarray(load_image(headerless)))
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(encode(Image.fromarray(chest_like(), "L"), "JPEG")[:600])
    messages = []
    for source, file_name in ((cut, None), (cut.read_bytes(), str(cut))):
        with pytest.raises(ImageLoadError) as error:
            load_image(source, file_name=file_name)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and messages[0].startswith("'cut.jpeg' is damaged")


def test_draft_decodes_large_jpegs_smaller_but_not_below_the_requested_size():
    data = encode(Image.fromarray(chest_like(2000, 1600), "L"), "JPEG")
    image = load_image(data, draft_size=224)
    assert 224 <= min(image.size) < 1600


def test_large_real_size_image_is_accepted():
    assert load_image(encode(Image.fromarray(chest_like(3000, 2500), "L"), "JPEG")).size == (3000, 2500)


def test_dicom_is_decoded_and_monochrome1_inverted():
    pixels = np.tile(np.linspace(0, 4095, 64), (48, 1))  # dark on the left, bright on the right
    normal = np.asarray(load_image(dicom_bytes(pixels)))[..., 0]
    inverted = np.asarray(load_image(dicom_bytes(pixels, "MONOCHROME1")))[..., 0]
    assert normal.shape == (48, 64)
    assert normal[:, 0].mean() < 10 and normal[:, -1].mean() > 245
    assert np.array_equal(inverted, 255 - normal)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is a text file, not an X-ray\n" * 20, "not an image"),
        (encode(Image.fromarray(chest_like(), "L"), "JPEG")[:600], "truncated"),
        (encode(Image.new("L", (10, 10)), "PNG"), "at least"),
        (png_claiming_size(6325, 6325), "megapixels are refused by this app"),  # Pillow's own check would not refuse it
        (b"\0" * 128 + b"DICM" + b"\x02\x00" * 40, "DICOM"),
    ],
    ids=["empty", "text", "truncated-jpeg", "tiny-10px", "just-over-the-pixel-limit", "broken-dicom"],
)
def test_bad_inputs_raise_a_clear_error(data, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(data)


# ---- the limits: each test below fails when its guard in cxr/images.py is removed -----------------------------------


def test_pixel_limit_is_the_projects_below_pillows_own():
    # 6325 x 6325 = 40.0 MP: over MAX_PIXELS but under Pillow's own error threshold (twice its MAX_IMAGE_PIXELS),
    # so only the project's header check can refuse it with this message (without it the decode fails as truncated).
    assert MAX_PIXELS < 6325 * 6325 < 2 * 89_478_485
    with pytest.raises(ImageLoadError, match="6325 x 6325 px; images over 40 megapixels are refused by this app"):
        load_image(png_claiming_size(6325, 6325))
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS  # Pillow's own check agrees with the project's


def test_a_file_over_the_byte_limit_is_refused_as_bytes_and_as_a_path(tmp_path):
    # a valid PNG, padded past the cap
    too_big = encode(Image.fromarray(chest_like(), "L"), "PNG") + b"\0" * MAX_FILE_BYTES
    with pytest.raises(ImageLoadError, match="the limit is 64 MiB"):
        load_image(too_big)
    path = tmp_path / "big.png"
    path.write_bytes(too_big)
    with pytest.raises(ImageLoadError, match="the limit is 64 MiB"):
        load_image(path)


@pytest.mark.parametrize(
    "data",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 240\n0 0 moveto 300 240 lineto stroke\nshowpage\n",
        encode(Image.fromarray(chest_like(), "L"), "PPM"),
        encode(Image.fromarray(chest_like(), "L"), "TGA"),
    ],
    ids=["eps", "ppm", "tga"],
)
def test_only_the_readme_formats_are_opened(data):
    # EPS would hand the upload to Ghostscript; PPM and TGA decode fine in Pillow, but are not formats the README names.
    with pytest.raises(ImageLoadError, match="not an image this app reads"):
        load_image(data)


def test_only_the_first_dicom_frame_is_decoded():
    frames = np.stack([chest_like(), 255 - chest_like(), np.zeros((240, 300), np.uint8)])
    multi = load_image(dicom_bytes(frames, frames=3))
    single = load_image(dicom_bytes(frames[0]))
    assert np.array_equal(np.asarray(multi), np.asarray(single))


def test_progressive_jpeg_with_too_many_scans_is_refused():
    # One scan repeated: a 2000 x 2000 picture that libjpeg would decode 200 more times;
    # the limit at 4 megapixels is 160 scans.
    data = encode(Image.fromarray(chest_like(2000, 2000), "L"), "JPEG", progressive=True)
    end, last = data.rindex(b"\xff\xd9"), data.rindex(b"\xff\xda")
    with pytest.raises(ImageLoadError, match="JPEG of 206 scans.*the limit is 160"):
        load_image(data[:end] + data[last:end] * 200 + data[end:])


def test_padded_dicom_is_refused_without_parsing_every_element():
    data = padded_dicom(dicom_bytes(chest_like()), MAX_DICOM_READS + 10)
    with pytest.raises(ImageLoadError, match="header has more than 50,000 elements"):
        load_image(data)


def test_compressed_frame_must_match_the_header():
    big_jpeg = encode(Image.fromarray(chest_like(600, 500), "L"), "JPEG")
    from pydicom.uid import JPEGBaseline8Bit

    with pytest.raises(ImageLoadError, match="says 100 x 100 px with 1 sample.*compressed frame is 600 x 500 px"):
        load_image(encapsulated_dicom([big_jpeg], JPEGBaseline8Bit, rows=100, columns=100))


def test_rle_rgb_at_the_pixel_limit_is_over_the_decode_budget():
    # 6300 x 6300 is under 40 megapixels, but 3 samples of 16 bits decode to 227 MiB, over the 153 MiB budget.
    from pydicom.uid import RLELossless

    # six segments, as RGB 16-bit needs; their bytes are never read
    header = struct.pack("<16I", 6, *[64] * 6, *[0] * 9)
    with pytest.raises(ImageLoadError, match="would take 227 MiB to decode"):
        load_image(
            encapsulated_dicom([header + b"\x81\x00" * 64], RLELossless, rows=6300, columns=6300, samples=3, bits=16)
        )


def test_encapsulated_fragments_are_bounded():
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = encode(Image.fromarray(chest_like(), "L"), "JPEG")
    fragments = [jpeg[:100]] + [b"\0\0"] * MAX_FRAGMENTS
    with pytest.raises(ImageLoadError, match="more than 10,000 fragments"):
        load_image(encapsulated_dicom(fragments, JPEGBaseline8Bit, rows=240, columns=300))


def test_deflated_dicom_is_refused_before_inflating():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = read_dicom(dicom_bytes(chest_like()))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with pytest.raises(ImageLoadError, match="deflated"):
        load_image(save_dicom(dataset))


def test_error_messages_carry_no_markup_from_the_file(tmp_path):
    dataset = read_dicom(dicom_bytes(chest_like()))
    dataset.file_meta.TransferSyntaxUID = "1.2.3.<img src=x onerror=alert(1)>"
    with pytest.raises(ImageLoadError) as error:
        load_image(save_dicom(dataset))
    path = tmp_path / "<img src=x onerror=alert(1)>.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError) as named:
        load_image(path)
    for message in (str(error.value), str(named.value)):
        assert "<" not in message and ">" not in message


# ---- DICOM as hospitals send it -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"],
    ids=["jpeg-ls", "jpeg-2000", "rle"],
)
def test_compressed_dicom_decodes_like_the_uncompressed_file(syntax):
    plain = dicom_bytes(chest_like().astype(np.uint16) * 16)
    assert np.array_equal(np.asarray(load_image(compressed_dicom(plain, syntax))), np.asarray(load_image(plain)))


def test_jpeg_baseline_and_12_bit_dicom_decode():
    import os

    import pydicom
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = encode(Image.fromarray(chest_like(), "L"), "JPEG", quality=95)
    assert load_image(encapsulated_dicom([jpeg], JPEGBaseline8Bit, rows=240, columns=300)).size == (300, 240)
    # shipped with pydicom
    extended = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "JPGExtended.dcm")
    assert load_image(extended).size == (256, 1024)


def test_window_width_zero_falls_back_to_the_full_range():
    pixels = chest_like().astype(np.uint16) * 16
    plain = np.asarray(load_image(dicom_bytes(pixels)))
    for width in (0, -5):
        assert np.array_equal(np.asarray(load_image(dicom_bytes(pixels, WindowCenter=2000, WindowWidth=width))), plain)


def test_palette_color_dicom_is_shown_in_its_colours():
    dataset = read_dicom(dicom_bytes(chest_like()))
    dataset.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16) * 257
    for i, table in enumerate((ramp, ramp[::-1].copy(), np.zeros(256, np.uint16))):  # red up, green down, no blue
        dataset.add_new(0x00281101 + i, "US", [256, 0, 16])
        dataset.add_new(0x00281201 + i, "OW", table.tobytes())
    rgb = np.asarray(load_image(save_dicom(dataset))).astype(int)
    index = chest_like().astype(int)
    assert rgb[..., 2].max() == 0
    assert np.corrcoef(rgb[..., 0].ravel(), index.ravel())[0, 1] > 0.99
    assert np.corrcoef(rgb[..., 1].ravel(), index.ravel())[0, 1] < -0.99


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ImageLoadError, match="Cannot read"):
        load_image(tmp_path / "nope.jpeg")


def test_numpy_arrays_and_pil_images_are_accepted():
    assert load_image(chest_like()).mode == "RGB"
    assert load_image(Image.fromarray(chest_like())).size == (300, 240)
