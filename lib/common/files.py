"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(
    path: Path, write: Callable[[Path], object], *, durable: bool = False, keep_previous: Path | None = None
) -> Path:
    """Call write(temporary_path) beside path, then rename the temporary file over path.

    durable: flush the new file to the disk before the rename and the folder's entry after it (fsync), so that even
    a power cut leaves the old file or the whole new one. Off by default: a rebuildable cache of thousands of small
    files would pay one disk flush each.
    keep_previous: a path in the same folder that the file being replaced is renamed to first, so that at every
    moment one of the two is complete (path is absent only between the two renames).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and named after its target, should a crash leave it behind.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        if durable:
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(temporary, path)  # atomic on POSIX within one filesystem
        if durable:
            _fsync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames into it) to the disk; POSIX only, Windows cannot open a folder."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomically(path: Path, text: str) -> Path:
    """Write text to path atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))
