"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary_path) beside path, then rename the temporary file over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and named after its target, should a crash leave it behind.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)  # atomic on POSIX within one filesystem
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """Write text to path atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))
