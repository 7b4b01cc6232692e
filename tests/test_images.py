"""The one image loader: every kind of upload gives an RGB image or a clear ImageLoadError."""


import numpy as np
import pytest
from PIL import Image

from cxr.images import MAX_PIXELS, ImageLoadError, load_image
from inputs import chest_like, dicom_bytes, encode, png_claiming_size


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
    pixels = (chest_like().astype(np.uint16) * 16)
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
        (png_claiming_size(50_000, 50_000), "megapixels"),
        (b"\0" * 128 + b"DICM" + b"\x02\x00" * 40, "DICOM"),
    ],
    ids=["empty", "text", "truncated-jpeg", "tiny-10px", "decompression-bomb", "broken-dicom"],
)
def test_bad_inputs_raise_a_clear_error(data, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(data)


def test_bomb_is_refused_before_decoding():
    assert 50_000 * 50_000 > MAX_PIXELS
    with pytest.raises(ImageLoadError):
        load_image(png_claiming_size(50_000, 50_000))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ImageLoadError, match="Cannot read"):
        load_image(tmp_path / "nope.jpeg")


def test_numpy_arrays_and_pil_images_are_accepted():
    assert load_image(chest_like()).mode == "RGB"
    assert load_image(Image.fromarray(chest_like())).size == (300, 240)
