"""Files and folders that appear whole or not at all.

- `replaced_file(path)` / `write_text_atomic(path, text)`: a JSON or CSV file is written under a temporary name in
  its own folder, flushed to disk and renamed over `path`: a reader, or a run killed mid-write, finds the old
  file or the new one, never half of one.
- `staging_folder(target)` and `swap_in(staging, target)`: a model folder is written into a hidden sibling and
  swapped in at once. Where the system can (Linux's renameat2 with RENAME_EXCHANGE) the two folders trade places
  in one step, so `target` never goes missing; elsewhere the old folder is renamed away and the new one in.
  Either way a crash before the swap leaves the old folder untouched, and one after it the new folder complete.
  A reader that has the old folder open keeps reading the old files; one that loads file by file compares
  `folder_identity` before and after (`cxr.predictor.load_classifier` does) and loads again if the folder was swapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_file(path: str | os.PathLike, mode: str = "w", **open_args):
    """Open a temporary file beside `path` for writing; on a clean exit it replaces `path` (fsync, then rename).
    On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with open(handle, mode, **open_args) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with replaced_file(path, encoding="utf-8") as file:
        file.write(text)


def folder_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of a folder, which a swap changes; None where there is none."""
    try:
        status = os.stat(Path(path).expanduser())
    except OSError:
        return None
    return status.st_dev, status.st_ino


def staging_path(target: str | os.PathLike) -> Path:
    """The hidden sibling a new version of `target` is written into (the same for every process of a run)."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.staging")


def staging_folder(target: str | os.PathLike) -> Path:
    """A fresh, empty staging sibling of `target` (one a crashed run left behind is removed first)."""
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: str | os.PathLike, target: str | os.PathLike, replaced: tuple[str, ...] = ()) -> None:
    """Make the finished `staging` folder `target` in one step, then delete the old `target`.

    Entries of the old folder that the new one lacks (checkpoints, files the user put there) are carried over
    first, as hard links (copies where the file system has none), except top-level names matching a `replaced`
    pattern: files of the old model that the new one replaces and must not be mixed with (old plots, ONNX exports)."""
    staging, target = Path(staging), Path(os.path.abspath(target))
    if target.is_dir():
        for entry in sorted(target.iterdir()):
            if (staging / entry.name).exists() or os.path.lexists(staging / entry.name):
                continue
            if entry.is_file() and any(fnmatch.fnmatch(entry.name, pattern) for pattern in replaced):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, staging / entry.name)
        if _exchange(staging, target):
            shutil.rmtree(staging)  # now the old folder
            return
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)  # no exchange on this system: for a moment there is no `target`
        os.rename(staging, target)
        shutil.rmtree(old)
        return
    os.rename(staging, target)


def _link_or_copy(source, destination) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
        return
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or file system cannot."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"cannot swap {first} and {second}: {os.strerror(error)}")
