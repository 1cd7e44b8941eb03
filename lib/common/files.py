"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(
    path: Path, write: Callable[[Path], object], *, durable: bool = False, keep_previous: Path | None = None
) -> Path:
    """Call write(temporary_path) beside path, flush it to the disk, then rename the temporary file over path.

    The fsync comes before the rename: without it a crash or a full disk can leave the new name pointing at data that
    never reached the disk (a 0-byte file after a reboot, or an ENOSPC that only surfaces when the kernel writes
    back). The temporary file is removed whatever fails.

    durable: also flush the folder's entry after the rename, so that even a power cut keeps the new name. Off by
    default: a lost rename leaves the old file (or none), never half a new one, and a cache of thousands of small
    files would pay a second flush each.
    keep_previous: a path in the same folder that the file being replaced is renamed to first, so that at every
    moment one of the two is complete (path is absent only between the two renames).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and named after its target, should a crash leave it behind.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        sync_file(temporary)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(temporary, path)  # atomic on POSIX within one filesystem
        if durable and os.name == "posix":  # Windows cannot open a folder
            sync_file(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def sync_file(path: Path) -> None:
    """Block until a written file's (or a folder's) data is on the disk (os.fsync); a held-back error is raised."""
    descriptor = os.open(path, os.O_RDONLY)  # the writer closed it, so its buffers are flushed to the kernel already
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text_atomically(path: Path, text: str) -> Path:
    """Write text to path atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))
