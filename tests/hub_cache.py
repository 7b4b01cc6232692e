"""Put a local model folder into a Hugging Face cache under a Hub id, as a download (or a Space's
`preload_from_hub`) leaves it, so that Hub-id code paths run offline (`HF_HUB_OFFLINE=1`, `HF_HUB_CACHE`)."""

import hashlib
import os
import shutil
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name


def fill_hub_cache(cache_dir: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Copy every file of `folder` into `cache_dir` in huggingface_hub's layout: blobs named by content hash,
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
