"""Decode once, augment batches (cxr.pixel_cache, cxr.augment, cxr.transforms): without augmentation the cached path
gives the pixels the model's image processor gives at inference, for every architecture family and on real X-rays;
the cache is rebuilt when the tree, an image or the resize changes and reused otherwise, never left half-written;
the batch augmentation keeps shape, type and range, draws its views from torch's seeded generator and shows a teacher
the student's view."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline
from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
from transformers.models.levit.image_processing_pil_levit import LevitImageProcessorPil

import cxr.pixel_cache
import cxr.transforms
from cxr.augment import AREA, ASPECT, BRIGHTNESS, CONTRAST, DEGREES, GAMMA, Views, augment_batch, random_views
from cxr.images import load_image
from cxr.labels import ID2LABEL
from cxr.models import PRESETS, build_model, input_size, square_processor
from cxr.pixel_cache import PixelCache, cache_folder
from cxr.transforms import pixel_transform
from hf_data import load_prepared, make_synthetic_dataset, prepare_dataset

# One preset per architecture family (config class) the presets name, the first listed.
FAMILIES = {}
for name, (config_class, _) in PRESETS.items():
    FAMILIES.setdefault(config_class.__name__, name)

TOLERANCE = 1 / 255  # per pixel, on the tensors the model reads (after the processor's normalisation)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A prepared synthetic tree: train, validation and test splits of grey PNGs."""
    workdir = tmp_path_factory.mktemp("pixel_cache")
    source = make_synthetic_dataset(workdir / "synthetic", images_per_class=20)
    prepare_dataset(source, workdir / "prepared")
    return workdir / "prepared"


def inference_processor(processor, folder):
    """The processor as a model folder gives it to pipeline(...), the app and the predictor: saved, then loaded."""
    processor.save_pretrained(folder)
    return AutoImageProcessor.from_pretrained(folder)


def predictor_pixels(processor, paths) -> torch.Tensor:
    """What cxr.predictor.classify (predict.py, the app) feeds the model: the one loader at the draft size, then the
    processor."""
    return torch.stack(
        [
            processor(load_image(path, draft_size=input_size(processor)), return_tensors="pt")["pixel_values"][0]
            for path in paths
        ]
    )


def cached_difference(prepared, processor, split: str) -> float:
    """Largest per-pixel difference between the cached path without augmentation and the predictor's tensors."""
    dataset = load_prepared(prepared)[split]
    paths = [image["path"] for image in dataset["image"]]
    cache = PixelCache(prepared, [processor])
    assert all(row is not None for row in cache.rows_of(paths, processor)), "the split is not in the cache"
    cached = dataset.with_transform(pixel_transform(processor, augment=False, cache=cache))[:]["pixel_values"]
    reference = predictor_pixels(processor, paths)
    assert cached.shape == reference.shape and cached.dtype == reference.dtype == torch.float32
    return (cached - reference).abs().max().item()


# ---- same pixels as inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_without_augmentation_the_cache_gives_the_pixels_of_inference(family, tree, tmp_path):
    """Training's processor (the preset's) reads the cache; the model folder's processor, as pipeline(...) loads it,
    reads the files: the same tensors, within 1/255 a pixel (here to float rounding), for training and validation."""
    model, processor, _ = build_model(FAMILIES[family], ID2LABEL)
    served = inference_processor(processor, tmp_path / "folder")
    classifier = pipeline("image-classification", model=model, image_processor=served)
    cache = PixelCache(tree, [processor])
    for split in ("train", "validation"):
        dataset = load_prepared(tree)[split]
        cached = dataset.with_transform(pixel_transform(processor, augment=False, cache=cache))[:]["pixel_values"]
        reference = torch.cat([classifier.preprocess(image["path"])["pixel_values"] for image in dataset["image"]])
        difference = (cached - reference).abs().max().item()
        assert difference <= TOLERANCE, f"{family} {split}: {difference * 255:.2f}/255"
    assert cached_difference(tree, processor, "validation") <= TOLERANCE  # and the predictor's way (draft decode)


@pytest.mark.parametrize(
    "processor",
    [
        DeiTImageProcessorPil(size={"height": 56, "width": 56}, crop_size={"height": 48, "width": 48}),
        LevitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48}),
    ],
    ids=["deit-resize-then-crop", "levit-shortest-edge-imagenet-mean"],
)
def test_a_hub_checkpoints_processor_is_split_as_it_runs(processor, tree):
    """Hub checkpoints bring their own processors (a crop after the resize, ImageNet's mean): the cache keeps their
    resize and crop, the batch gets their normalisation."""
    assert cached_difference(tree, processor, "validation") <= TOLERANCE


def test_real_xrays_give_the_pixels_of_inference(shared_data, tmp_path):
    """A few real X-rays as users have them (full-size JPEGs, decoded at the draft size as predict.py and the app do)
    and as the training copies are (224 px): cached = inferred, for the resize of every preset size."""
    source = tmp_path / "source" / "train"
    originals = sorted((shared_data / "xray_originals").glob("*.jpeg"))
    copies = (
        sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:6]
        + sorted((shared_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[:12]
    )
    for path in originals + copies:
        folder = source / ("NORMAL" if "bacteria" not in path.name and "virus" not in path.name else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).symlink_to(path)
    prepare_dataset(source.parent, tmp_path / "prepared", validation_fraction=0.5)
    for size in sorted({arguments["image_size"] for _, arguments in PRESETS.values()}):
        for split in ("train", "validation"):
            difference = cached_difference(tmp_path / "prepared", square_processor(size), split)
            assert difference <= TOLERANCE, f"{size} px {split}: {difference * 255:.2f}/255"


def test_the_check_fails_when_one_side_resizes_or_normalises_differently(tree, monkeypatch):
    """The comparison above is not blind: on the training side only, a resize with another filter (nearest instead of
    bilinear), or a rescale by 1/256 instead of 1/255, is caught."""
    processor = square_processor(48)
    assert cached_difference(tree, processor, "validation") <= TOLERANCE
    original_resize, original_normalize = cxr.transforms.processor_resize, cxr.transforms.processor_normalize

    def nearest_resize(processor, images):
        other = copy.deepcopy(processor)
        other.resample = Image.NEAREST
        return original_resize(other, images)

    for module in (cxr.transforms, cxr.pixel_cache):  # the batch's resize and the cache's
        monkeypatch.setattr(module, "processor_resize", nearest_resize)
    monkeypatch.setattr(cxr.pixel_cache, "CACHE_VERSION", cxr.pixel_cache.CACHE_VERSION + 1)  # a fresh cache
    assert cached_difference(tree, processor, "validation") > TOLERANCE
    for module in (cxr.transforms, cxr.pixel_cache):
        monkeypatch.setattr(module, "processor_resize", original_resize)
    monkeypatch.setattr(cxr.pixel_cache, "CACHE_VERSION", cxr.pixel_cache.CACHE_VERSION + 1)

    def rescale_by_256(processor, pixels):
        return original_normalize(processor, pixels * 255 / 256)

    monkeypatch.setattr(cxr.transforms, "processor_normalize", rescale_by_256)
    assert cached_difference(tree, processor, "validation") > TOLERANCE


def test_images_the_cache_does_not_hold_are_decoded_alongside(tree):
    """Test images (not cached) in a batch with cached ones: each gets the same pixels as inference."""
    from datasets import concatenate_datasets

    processor = square_processor(32)
    cache = PixelCache(tree, [processor])
    splits = load_prepared(tree)
    mixed = concatenate_datasets([splits["train"].select(range(3)), splits["test"].select(range(3))])
    paths = [image["path"] for image in mixed["image"]]
    assert [row is None for row in cache.rows_of(paths, processor)] == [False] * 3 + [True] * 3
    assert cache.rows_of(paths, square_processor(40)) == [None] * 6  # not built for that resize: decoded
    cached = mixed.with_transform(pixel_transform(processor, augment=False, cache=cache))[:]["pixel_values"]
    difference = (cached - predictor_pixels(processor, paths)).abs()
    assert difference.max().item() <= TOLERANCE


# ---- the cache file ----------------------------------------------------------------------------------------------


def count_decodes(monkeypatch) -> list:
    decoded = []
    monkeypatch.setattr(
        cxr.pixel_cache, "load_image", lambda *args, **kwargs: decoded.append(1) or load_image(*args, **kwargs)
    )
    return decoded


def test_the_cache_is_reused_and_rebuilt_when_the_tree_an_image_or_the_size_changes(tmp_path, monkeypatch):
    source = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=20)
    prepared = tmp_path / "prepared"
    prepare_dataset(source, prepared)
    processor = square_processor(32)
    decoded = count_decodes(monkeypatch)
    first = PixelCache(prepared, [processor]).paths
    [path] = first.values()
    held = len(np.load(path, mmap_mode="r"))
    assert len(decoded) == held > 0 and path.parent == cache_folder(prepared) == tmp_path / "prepared.pixels"
    assert path.name.startswith("32px-")
    inode = path.stat().st_ino

    assert PixelCache(prepared, [processor]).paths == first and path.stat().st_ino == inode
    assert len(decoded) == held, "an unchanged tree is read from the cache, not decoded again"
    same_resize = square_processor(32)
    same_resize.image_mean = same_resize.image_std = [0.25] * 3  # another normalisation, the same resize: shared
    assert PixelCache(prepared, [same_resize, processor]).paths == first and len(decoded) == held

    bigger = PixelCache(prepared, [square_processor(40)]).paths  # the size: a file of its own, beside
    assert list(bigger.values())[0].name.startswith("40px-") and path.exists() and len(decoded) == 2 * held

    prepare_dataset(source, prepared, seed=7)  # another split: another manifest
    rebuilt = PixelCache(prepared, [processor]).paths
    assert rebuilt != first and not path.exists(), "the stale cache of that resize is replaced"
    assert len(decoded) == 3 * held

    image = prepared / PixelCache(prepared, []).files[0]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[:8] = 255
    Image.fromarray(pixels).save(image.resolve())  # the user's file changed under the same name
    os.utime(image.resolve(), ns=(1, 1))
    changed = PixelCache(prepared, [processor]).paths
    assert changed != rebuilt and len(decoded) == 4 * held

    other = tmp_path / "other.png"  # the same name in the tree, another file behind it (a new source folder)
    shutil.copyfile(image.resolve(), other)
    os.utime(other, ns=(1, 1))
    image.unlink()
    image.symlink_to(other)
    assert PixelCache(prepared, [processor]).paths != changed and len(decoded) == 5 * held


def test_a_build_cut_short_leaves_no_cache_and_the_next_one_cleans_up(tree, monkeypatch):
    processor = square_processor(24)
    folder = cache_folder(tree)
    folder.mkdir(exist_ok=True)
    (folder / ".24px-killed.npy.x.partial").write_bytes(b"half")  # as a build killed mid-way leaves it
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return load_image(*args, **kwargs)

    monkeypatch.setattr(cxr.pixel_cache, "load_image", failing)
    with pytest.raises(KeyboardInterrupt):
        PixelCache(tree, [processor])
    assert not list(folder.glob("24px-*.npy")), "no half cache under the final name"
    monkeypatch.setattr(cxr.pixel_cache, "load_image", load_image)
    [path] = PixelCache(tree, [processor]).paths.values()
    assert path.is_file() and not list(folder.glob(".*.partial")), "leftovers removed"
    assert np.load(path, mmap_mode="r").shape[1:] == (1, 24, 24)


def test_grey_x_rays_are_stored_once_and_colour_in_three_channels(tmp_path):
    source = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=20)
    [grey] = PixelCache(prepare_dataset(source, tmp_path / "grey").output_dir, [square_processor(32)]).arrays.values()
    assert grey.shape[1] == 1 and grey.dtype == np.uint8
    coloured = tmp_path / "colour"
    shutil.copytree(source, coloured)
    first = sorted((coloured / "train" / "normal").glob("*.png"))[0]
    rgb = np.stack([np.asarray(Image.open(first))] * 3, -1)
    rgb[..., 0] = 255 - rgb[..., 0]
    Image.fromarray(rgb).save(first)
    prepared = prepare_dataset(coloured, tmp_path / "prepared_colour").output_dir
    processor = square_processor(32)
    [colour] = PixelCache(prepared, [processor]).arrays.values()
    assert colour.shape[1] == 3
    assert cached_difference(prepared, processor, "train") <= TOLERANCE


# ---- the batch augmentation --------------------------------------------------------------------------------------


def test_the_batch_augmentation_keeps_shape_type_and_range_and_follows_the_seed():
    images = torch.randint(0, 256, (6, 1, 40, 40), dtype=torch.uint8)
    torch.manual_seed(3)
    first = augment_batch(images, random_views(6))
    assert first.shape == images.shape and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    torch.manual_seed(3)
    assert torch.equal(augment_batch(images, random_views(6)), first), "same seed, same views"
    assert not torch.equal(augment_batch(images, random_views(6)), first), "the next batch differs"


def test_the_views_stay_in_augment_xrays_ranges():
    torch.manual_seed(0)
    views = random_views(20_000)
    area, aspect = views.width * views.height, views.width / views.height
    assert AREA[0] - 1e-9 <= area.min() and area.max() <= AREA[1] + 1e-9
    unclamped = (views.width < 1) & (views.height < 1)
    assert ASPECT[0] - 1e-9 <= aspect[unclamped].min() and aspect[unclamped].max() <= ASPECT[1] + 1e-9
    assert (views.left >= 0).all() and (views.left + views.width <= 1 + 1e-9).all()
    assert (views.top >= 0).all() and (views.top + views.height <= 1 + 1e-9).all()
    assert torch.rad2deg(views.angle).abs().max() <= DEGREES and torch.rad2deg(views.angle).abs().max() > 9.9
    for factor, (low, high) in ((views.brightness, BRIGHTNESS), (views.contrast, CONTRAST), (views.gamma, GAMMA)):
        assert low <= factor.min() and factor.max() <= high and factor.max() - factor.min() > 0.95 * (high - low)


def identity_views(count: int, **changes) -> Views:
    fields = dict(left=0.0, top=0.0, width=1.0, height=1.0, angle=0.0, brightness=1.0, contrast=1.0, gamma=1.0)
    return Views(
        **{key: torch.full((count,), float(value), dtype=torch.float64) for key, value in (fields | changes).items()}
    )


def test_the_identity_view_is_the_image_and_each_effect_does_what_its_name_says():
    """No crop, rotation or exposure change gives the image back (no half-pixel shift, no flip); the effects then
    act as augment_xray's did: a quarter turn without loss, a crop zooms, black fill outside a rotated frame,
    brightness scales, contrast stretches about the mean, gamma darkens the mid-greys."""
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    pixels = images.float() / 255
    assert torch.allclose(augment_batch(images, identity_views(2)), pixels, atol=1e-6)
    quarter = augment_batch(images, identity_views(2, angle=torch.pi / 2))
    assert torch.allclose(quarter, torch.rot90(pixels, 1, (2, 3)), atol=1e-5) or torch.allclose(
        quarter, torch.rot90(pixels, -1, (2, 3)), atol=1e-5
    )
    left_half = augment_batch(images, identity_views(2, width=0.5, height=0.5))
    zoomed = torch.nn.functional.interpolate(pixels[..., :16, :16], size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(left_half[..., 2:-2, 2:-2], zoomed[..., 2:-2, 2:-2], atol=1e-5)
    rotated = augment_batch(torch.full((1, 1, 32, 32), 200, dtype=torch.uint8), identity_views(1, angle=0.17))
    assert rotated[0, 0, 0, 0] == 0 and rotated[0, 0, 16, 16] == pytest.approx(200 / 255)  # corners black
    grey = torch.full((1, 1, 8, 8), 100, dtype=torch.uint8)
    assert augment_batch(grey, identity_views(1, brightness=1.2)).mean() == pytest.approx(120 / 255)
    ramp = (64 + 2 * torch.arange(64)).to(torch.uint8).view(1, 1, 8, 8)  # stretched, stays within 0-255
    stretched = augment_batch(ramp, identity_views(1, contrast=1.2))
    assert (
        stretched.mean() == pytest.approx(ramp.float().mean() / 255, abs=1e-6)
        and stretched.std() > ramp.float().std() / 255
    )
    assert augment_batch(grey, identity_views(1, gamma=1.25)).mean() == pytest.approx((100 / 255) ** 1.25)


def test_a_teacher_at_another_size_sees_the_students_view(tree):
    """Distillation: one view per image, resampled for each network from its own cache at its own size."""
    student, teacher = square_processor(32), square_processor(64)
    cache = PixelCache(tree, [student, teacher])
    train = load_prepared(tree)["train"].select(range(8))
    torch.manual_seed(0)
    batch = train.with_transform(pixel_transform(student, augment=True, teacher_processor=teacher, cache=cache))[:]
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["teacher_pixel_values"].shape == (8, 3, 64, 64)
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    shrunk = torch.nn.functional.avg_pool2d(batch["teacher_pixel_values"], 2)
    assert (shrunk - batch["pixel_values"]).abs().mean() < 0.05  # the same crop, angle and exposure
    torch.manual_seed(1)
    other = train.with_transform(pixel_transform(student, augment=True, teacher_processor=teacher, cache=cache))[:]
    assert (other["pixel_values"] - batch["pixel_values"]).abs().mean() > 0.05
