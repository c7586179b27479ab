"""Atomic file writes and forgiving reads of JSON records.

    from rlhf_lib.io import atomic_write_text, read_json
    atomic_write_text(path, json.dumps(record))     # temp file beside it, fsync, rename, fsync the folder
    atomic_copy_file(source, target)                # the same for a copy
    fsync_tree(folder)                              # before a finished folder is published by a rename
    record = read_json(path)                        # None (with a warning) when missing or torn
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside `path` to fill; once filled it is fsynced and renamed onto `path`, and the folder
    fsynced, so a reader sees the old file or the whole new one, never a torn one. Removed if filling fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through a temporary file in the same directory, fsynced, then renamed."""
    path = Path(path)
    with _replacing(path) as tmp:
        Path(tmp).write_text(text, encoding=encoding)
    return path


def atomic_copy_file(source: Path | str, target: Path | str) -> Path:
    """Copy `source` (contents and times) to `target` through a temporary file beside it, fsynced, then renamed."""
    import shutil

    target = Path(target)
    with _replacing(target) as tmp:
        shutil.copy2(source, tmp)
    return target


def fsync_tree(folder: Path | str) -> None:
    """fsync every file and folder under `folder`: before a finished directory is published by a rename, so that
    after a power cut the published name never points at files whose data was still in the page cache."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(os.path.join(root, name))
        for name in dirs:
            _fsync_dir(Path(root) / name)
    _fsync_dir(Path(folder))


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path | str, quiet: bool = False) -> Any | None:
    """The parsed JSON at `path`; None when it is missing, or (with a warning unless quiet) torn or not JSON.

    For records a later run can rebuild: a half-written file must not make every later run fail.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if not quiet:
            warnings.warn(f"{path} is unreadable ({type(err).__name__}: {err}); ignoring it.", stacklevel=2)
        return None
