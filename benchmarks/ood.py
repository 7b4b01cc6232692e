"""Out-of-distribution check: how well each candidate score tells real chest X-rays from everything else.

    python -m benchmarks.ood                                    # the shipped model with data/prepared/chest_xray
    python -m benchmarks.ood --model outputs/quick --data_dir data/prepared/synthetic

The model folder must hold the statistics `python calibrate.py` (or train_vit.py) writes; every threshold
is the stored one, set so that ACCEPT_RATE (97 %) of the validation X-rays are accepted.

In distribution:  the validation split (patient-grouped, never trained on) and the full-resolution originals
                  in --originals, decoded as the app decodes them.
Not an X-ray:     sample images shipped inside installed packages (gradio, scikit-learn, matplotlib, and
                  scikit-image's `skimage.data` when installed: `pip install scikit-image`), and generated ones:
                  noise, flat grey, gradients, document pages with text, photo-like colour scenes.
Altered X-ray:    the originals inverted (bone dark) and rotated by 90 degrees: real X-ray content the model was
                  not trained on, reported apart from the non-X-rays.
Every image goes through the app's path: encoded file -> `load_image(file, draft_size=input size)` -> image
processor -> model. Offline only: nothing is downloaded.

Prints, per candidate score: ROC-AUC (X-rays vs non-X-rays), the share of non-X-rays and of altered X-rays
flagged at the stored threshold, and the share of real X-rays wrongly flagged; then, for the chosen score, the
same figures had the threshold accepted another share of the validation split (how ACCEPT_RATE was picked), and
its misses per source. Targets: >= 95 % of real X-rays accepted, >= 95 % of non-X-rays flagged.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from sklearn.metrics import roc_auc_score

from cxr.features import embed_split, forward_features
from cxr.images import load_image
from cxr.models import SHIPPED_MODEL_DIR, input_size
from cxr.ood import ACCEPT_RATE, SCORES, accept_threshold
from cxr.predictor import load_classifier

ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray_originals"
SITE_PACKAGES = Path(np.__file__).resolve().parents[1]
PACKAGE_IMAGE_DIRS = [
    "gradio/media_assets/images",
    "gradio/test_data",
    "sklearn/datasets/images",
    "matplotlib/mpl-data/sample_data",
]
SKIMAGE_SAMPLES = [  # the skimage.data images that ship inside the wheel (the rest need a download)
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "shepp_logan_phantom",
    "text",
]


# ---- the images, each as the bytes of a file ------------------------------------------------------------


def png(image: Image.Image | np.ndarray) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def package_images() -> dict[str, bytes]:
    found = {}
    for folder in PACKAGE_IMAGE_DIRS:
        for path in sorted((SITE_PACKAGES / folder).glob("*")):
            if path.suffix.lower() in (".png", ".jpg", ".jpeg") and path.stat().st_size > 5_000:  # skip icons
                found[f"{folder.split('/')[0]}: {path.name}"] = path.read_bytes()
    try:
        import skimage.data
    except ImportError:
        print("scikit-image not installed: its sample images are left out (pip install scikit-image).", file=sys.stderr)
        return found
    for name in SKIMAGE_SAMPLES:
        array = getattr(skimage.data, name)()
        found[f"skimage: {name}"] = png(array.astype(np.uint8) if array.dtype != np.uint8 else array)
    return found


def document(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A white page with a title and paragraphs of text, as a scanned letter or a screenshot of one."""
    page = Image.new("L", (width, height), 250)
    draw = ImageDraw.Draw(page)
    words = (
        "patient report chest radiograph findings normal lungs clear no consolidation impression date signed".split()
    )
    draw.text((width * 0.1, height * 0.05), "DISCHARGE SUMMARY", fill=0, font_size=max(12, width // 20))
    y = height * 0.15
    while y < height * 0.9:
        line = " ".join(rng.choice(words, size=int(rng.integers(4, 10))))
        draw.text((width * 0.1, y), line, fill=int(rng.integers(0, 60)), font_size=max(8, width // 40))
        y += max(10, width // 30) * (2 if rng.random() < 0.15 else 1)
    return page


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Sky, ground and a few coloured shapes, softened: a stand-in for a snapshot."""
    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([200, 220, 250]) * y) * np.ones((1, width, 1))
    horizon = int(height * rng.uniform(0.4, 0.7))
    sky[horizon:] = np.array([60, 130, 50]) + rng.normal(0, 12, (height - horizon, width, 3))
    image = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        size = int(rng.integers(20, max(21, width // 3)))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image.filter(ImageFilter.GaussianBlur(2))


def generated_images(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    images = {}
    for size in (224, 512, 1024):
        images[f"noise, grey {size}px"] = png(rng.integers(0, 256, (size, size), dtype=np.uint8))
        images[f"noise, colour {size}px"] = png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        images[f"noise, smooth {size}px"] = png(
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).filter(
                ImageFilter.GaussianBlur(size / 40)
            )
        )
    for level in (0, 128, 255):
        images[f"flat grey {level}"] = png(Image.new("L", (400, 400), level))
    ramp = np.linspace(0, 255, 512)
    images["gradient, horizontal"] = png(np.tile(ramp, (384, 1)).astype(np.uint8))
    images["gradient, vertical"] = png(np.tile(ramp[:384, None], (1, 512)).astype(np.uint8))
    yy, xx = np.mgrid[-1:1:400j, -1:1:400j]
    images["gradient, radial"] = png((np.clip(1 - np.hypot(xx, yy), 0, 1) * 255).astype(np.uint8))
    images["gradient, colour"] = png(
        np.stack([np.tile(ramp, (384, 1)), np.tile(ramp[:384, None], (1, 512)), np.full((384, 512), 128.0)], -1).astype(
            np.uint8
        )
    )
    for index, (width, height) in enumerate([(850, 1100), (1240, 1754), (600, 800), (1100, 850)]):
        images[f"document page {index + 1}"] = png(document(rng, width, height))
    for index in range(6):
        images[f"photo-like scene {index + 1}"] = png(
            photo_like(rng, int(rng.integers(400, 900)), int(rng.integers(300, 700)))
        )
    return images


def altered_xrays(originals: dict[str, bytes]) -> dict[str, bytes]:
    altered = {}
    for name, data in originals.items():
        image = load_image(data)
        altered[f"inverted {name}"] = png(ImageOps.invert(image))
        altered[f"rotated 90 {name}"] = png(image.rotate(90, expand=True))
    return altered


# ---- scoring -----------------------------------------------------------------------------------------------


def score_files(classifier, files: dict[str, bytes], batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every candidate score for each file, decoded exactly as the app decodes an upload."""
    size = input_size(classifier.image_processor)
    names = list(files)
    batches = []
    for start in range(0, len(names), batch_size):
        images = [load_image(files[name], draft_size=size) for name in names[start : start + batch_size]]
        batches.append(
            forward_features(classifier.model, classifier.image_processor(images, return_tensors="pt")["pixel_values"])
        )
    return classifier.ood_detector.scores({key: torch.cat([batch[key] for batch in batches]) for key in batches[0]})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=str(SHIPPED_MODEL_DIR),
        help="Model folder with ood.safetensors (run python calibrate.py on it first). Default: the shipped model.",
    )
    parser.add_argument(
        "--data_dir",
        default="data/prepared/chest_xray",
        help="The prepared data the model was trained on (its validation split).",
    )
    parser.add_argument(
        "--originals", type=Path, default=ORIGINALS, help="Full-resolution real X-rays (JPEG/PNG/DICOM)."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    from hf_data import load_prepared

    classifier = load_classifier(args.model)
    detector = classifier.ood_detector
    if detector is None:
        raise SystemExit(
            f"{args.model} has no out-of-distribution statistics: python calibrate.py {args.model} --data_dir "
            f"{args.data_dir}"
        )
    validation = load_prepared(args.data_dir)["validation"]
    outputs, _ = embed_split(classifier.model, classifier.image_processor, validation, desc="Validation")
    originals = {
        path.name: path.read_bytes()
        for path in sorted(args.originals.glob("*"))
        if path.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm")
    }
    files = {
        "originals": originals,
        "not X-ray": package_images() | generated_images(),
        "altered X-ray": altered_xrays(originals),
    }
    groups = {"validation": detector.scores(outputs)} | {
        group: score_files(classifier, images) for group, images in files.items()
    }
    sizes = {group: len(scores["energy"]) for group, scores in groups.items()}
    print(
        f"\nModel {args.model}. Each threshold accepts {ACCEPT_RATE:.0%} of the validation split "
        f"({sizes['validation']} X-rays); also {sizes['originals']} full-resolution originals; out of distribution: "
        f"{sizes['not X-ray']} non-X-rays, {sizes['altered X-ray']} altered X-rays.\n"
    )

    header = (
        f"{'score':<26}{'ROC-AUC':>8}{'non-X-rays flagged':>20}{'altered X-rays flagged':>24}"
        f"{'validation wrongly flagged':>28}{'originals wrongly flagged':>27}"
    )
    print(header + "\n" + "-" * len(header))
    for name in SCORES:
        threshold = detector.thresholds[name]
        real = np.concatenate([groups["validation"][name], groups["originals"][name]])
        auroc = roc_auc_score(
            np.r_[np.zeros(len(real)), np.ones(sizes["not X-ray"])], np.r_[real, groups["not X-ray"][name]]
        )
        flagged = {group: float((scores[name] > threshold).mean()) for group, scores in groups.items()}
        label = name + (" (chosen)" if name == detector.score_name else "")
        print(
            f"{label:<26}{auroc:>8.3f}{flagged['not X-ray']:>20.1%}{flagged['altered X-ray']:>24.1%}"
            f"{flagged['validation']:>28.1%}{flagged['originals']:>27.1%}"
        )
    print("ROC-AUC: real X-rays (validation + originals) against the non-X-rays.")

    name, threshold = detector.score_name, detector.threshold
    print(f"\nChosen score ({name}) if the threshold accepted another share of the validation split:")
    header = (
        f"{'validation accepted':>20}{'threshold':>11}{'originals accepted':>20}{'all real X-rays accepted':>26}"
        f"{'non-X-rays flagged':>20}{'altered X-rays flagged':>24}"
    )
    print(header + "\n" + "-" * len(header))
    real = np.concatenate([groups["validation"][name], groups["originals"][name]])
    for rate in sorted({0.95, 0.97, 0.98, 0.99, 1.0, ACCEPT_RATE}):
        cut = accept_threshold(groups["validation"][name], rate)
        print(
            f"{rate:>20.0%}{cut:>11.4g}{(groups['originals'][name] <= cut).mean():>20.1%}{(real <= cut).mean():>26.1%}"
            f"{(groups['not X-ray'][name] > cut).mean():>20.1%}{(groups['altered X-ray'][name] > cut).mean():>24.1%}"
        )
    print(f"Lowest non-X-ray score: {groups['not X-ray'][name].min():.4g}; highest real X-ray score: {real.max():.4g}.")

    print(f"\nChosen score ({name}, threshold {threshold:.4g}); the misses (accepted non-X-rays, flagged real X-rays):")
    for group, images in files.items():
        scores = groups[group][name]
        flagged = scores > threshold
        print(f"  {group}: {flagged.sum()} of {len(scores)} flagged")
        for file_name, score, flag in zip(images, scores, flagged, strict=True):
            if flag == (group == "originals"):
                print(f"    {'flagged' if flag else 'accepted'}  {score:10.4g}  {file_name}")


if __name__ == "__main__":
    main()
