"""Where the pipeline keeps downloads, caches and run outputs unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Return $PETS_HOME, or ~/.cache/pets: downloads, extracted archives and the presize cache live here."""
    return Path(os.environ.get("PETS_HOME") or Path.home() / ".cache" / "pets")


def default_output_dir() -> Path:
    """Return ./outputs: per-run manifests, reports, summaries and plots go under it."""
    return Path("outputs")
