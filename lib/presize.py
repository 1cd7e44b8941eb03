"""Presizing: resize every image once on the CPU into a content-addressed cache that later runs reuse.

fastbook ch. 5 presizes with `item_tfms=Resize(460)` and decodes every original JPEG again in every epoch. Here each
original is decoded once: its short side is scaled to the presize (bilinear, antialiased, as Pillow's BILINEAR does
when it shrinks) and the result is cached under the sha256 of the original's bytes. The per-epoch random square crop
(centre crop on validation) happens at load time on the cached image (see lib/loading.py).
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from lib.images import open_rgb

DEFAULT_PRESIZE = 460  # fastbook ch. 5: item_tfms=Resize(460)
# Quality 95 keeps re-encoding loss below what the bilinear resize and augmentation already change.
CACHE_JPEG_QUALITY = 95
# Bump when the resize or encoding changes, so old cache entries are never read as new ones.
CACHE_FORMAT_VERSION = "v1-bilinear-q95"


@dataclass(frozen=True)
class PresizeResult:
    """The manifest with a `presized_path` column, and how many images were read from the cache."""

    manifest: pd.DataFrame
    cache_hits: int
    written: int


def presized_shape(width: int, height: int, presize: int) -> tuple[int, int]:
    """Return (width, height) scaled so the short side equals presize, the aspect ratio kept."""
    scale = presize / min(width, height)
    return max(presize, round(width * scale)), max(presize, round(height * scale))


def cache_path(cache_dir: Path, sha256: str, presize: int) -> Path:
    """Return where the presized version of the image with this content digest lives."""
    return Path(cache_dir) / f"presize-{presize}-{CACHE_FORMAT_VERSION}" / sha256[:2] / f"{sha256}.jpg"


def presize_image(source: Path, target: Path, presize: int) -> None:
    """Decode source, scale its short side to presize and write it to target atomically."""
    image = open_rgb(source)
    resized = image.resize(presized_shape(*image.size, presize), Image.Resampling.BILINEAR)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        resized.save(temporary, format="JPEG", quality=CACHE_JPEG_QUALITY)
        os.replace(temporary, target)  # atomic: a reader sees the old state or the whole new file
    finally:
        temporary.unlink(missing_ok=True)


def presize_images(
    manifest: pd.DataFrame,
    cache_dir: Path,
    *,
    presize: int = DEFAULT_PRESIZE,
    workers: int | None = None,
    progress: bool = True,
) -> PresizeResult:
    """Presize every image of the manifest (needs `path` and `sha256` columns) that is not cached yet.

    Args:
        manifest: cleaned manifest; `sha256` is the digest of each original file.
        cache_dir: root of the presize cache, shared by runs.
        presize: short side of the cached images, in pixels.
        workers: threads decoding and resizing (Pillow releases the GIL while it does both).
        progress: show a progress bar.
    """
    if presize < 1:
        raise ValueError(f"presize must be a positive number of pixels, got {presize}: e.g. --presize 460.")
    targets = [cache_path(cache_dir, digest, presize) for digest in manifest["sha256"]]
    missing = {t: Path(s) for s, t in zip(manifest["path"], targets, strict=True) if not t.is_file()}
    workers = workers or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda item: presize_image(item[1], item[0], presize), missing.items())
        for _ in tqdm(jobs, total=len(missing), desc=f"presize {presize}px", unit="img", disable=not progress):
            pass
    result = manifest.assign(presized_path=[str(t) for t in targets])
    return PresizeResult(manifest=result, cache_hits=len(targets) - len(missing), written=len(missing))
