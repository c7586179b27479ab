"""Atomic file writes and forgiving reads of JSON records.

    from rlhf_lib.io import atomic_write_text, read_json
    atomic_write_text(path, json.dumps(record))     # temp file beside it, fsync, rename, fsync the folder
    atomic_copy_file(source, target)                # the same for a copy
    record = read_json(path)                        # None (with a warning) when missing or torn
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through a temporary file in the same directory, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding=encoding) as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_copy_file(source: Path | str, target: Path | str) -> Path:
    """Copy `source` (contents and times) to `target` through a temporary file beside it, fsynced, then renamed."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        shutil.copy2(source, tmp)
        with open(tmp, "rb") as copied:
            os.fsync(copied.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(target.parent)
    return target


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
