"""What several benchmarks and tests share: a free loopback port, a Hugging Face cache filled from a local folder,
the fixed sample of X-rays the speed and load benchmarks time, and the earlier spelling of a renamed option."""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import socket
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_benchmark_images(originals: Path, kaggle_train: Path, sample: int, seed: int = 0) -> list[Path]:
    """Every original, plus `sample` Kaggle training images (a fixed random choice), shuffled once."""
    images = sorted(path for path in originals.glob("*") if path.suffix.lower() in (".jpeg", ".jpg", ".png"))
    train = sorted(path for path in kaggle_train.rglob("*") if path.suffix.lower() in (".jpeg", ".jpg", ".png"))
    rng = random.Random(seed)
    images += rng.sample(train, min(sample, len(train)))
    rng.shuffle(images)
    return images


def add_old_spelling(parser: argparse.ArgumentParser, option: str, dest: str, **kwargs) -> None:
    """Accept an earlier spelling of an option without listing it, so commands written before the rename still run."""
    parser.add_argument(option, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def fill_hub_cache(cache_dir: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Put a local model folder into a Hugging Face cache under a Hub id, as a download (or a Space's
    `preload_from_hub`) leaves it, so that Hub-id code paths run offline (`HF_HUB_OFFLINE=1`, `HF_HUB_CACHE`).

    Copies every file of `folder` into `cache_dir` in huggingface_hub's layout: blobs named by content hash,
    a snapshot of links to them, and `refs/<revision>` naming that snapshot. Returns the snapshot folder."""
    repo_dir = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    commit = hashlib.sha1("".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for path in files:
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as huggingface_hub links them
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot
