"""Presizing: resize every image once on the CPU into a content-addressed cache that later runs reuse.

fastbook ch. 5 presizes with `item_tfms=Resize(460)` and decodes every original JPEG again in every epoch. Here each
original is decoded once: its short side is scaled to the presize (bilinear, antialiased, as Pillow's BILINEAR is
when it shrinks) and the result is cached under the sha256 of the original's bytes, beside the facts decoding found.
Cleaning fills the cache as it verifies each image (lib/data/cleaning.py), so the presize stage usually only collects
paths. The per-epoch random square crop (centre crop on validation) happens at load time (lib/data/loading.py).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from lib.common.errors import UserError
from lib.common.files import write_atomically, write_text_atomically
from lib.common.progress import ProgressCallback, progress_bar
from lib.data.images import ImageFacts, open_rgb_with_facts
from lib.recipe import DEFAULT_PRESIZE

# Quality 95 keeps re-encoding loss below what the bilinear resize and augmentation already change.
CACHE_JPEG_QUALITY = 95
# Bump when the resize or encoding changes, so old cache entries are never read as new ones.
CACHE_FORMAT_VERSION = "v1-bilinear-q95"


def presized_shape(width: int, height: int, presize: int) -> tuple[int, int]:
    """Return (width, height) scaled so the short side equals presize, the aspect ratio kept."""
    scale = presize / min(width, height)
    return max(presize, round(width * scale)), max(presize, round(height * scale))


def presize_image(image: Image.Image, presize: int) -> Image.Image:
    """Scale an image so its short side equals presize (bilinear, antialiased when shrinking, as Pillow's is)."""
    return image.resize(presized_shape(*image.size, presize), Image.Resampling.BILINEAR)


class CacheWriteError(UserError, RuntimeError):
    """The presize cache could not be written: a disk or permission problem, not a problem of the image."""


class PresizeCache:
    """Presized images and the facts about their originals, addressed by the sha256 of the original file."""

    def __init__(self, root: Path, presize: int = DEFAULT_PRESIZE):
        if presize < 1:
            raise ValueError(f"presize must be a positive number of pixels, got {presize}: e.g. --presize 460.")
        self.presize = presize
        self.folder = Path(root) / f"presize-{presize}-{CACHE_FORMAT_VERSION}"
        self._folder = str(self.folder)

    def _stem(self, sha256: str) -> str:
        # Plain strings, not Paths: a warm run asks for every image's entry, and pathlib costs more than the stats.
        return os.path.join(self._folder, sha256[:2], sha256)

    def image_path(self, sha256: str) -> Path:
        """Return where the presized image of the original with this digest lives."""
        return Path(self.image_path_str(sha256))

    def image_path_str(self, sha256: str) -> str:
        """`image_path` as a string (it is asked for every image of every run)."""
        return self._stem(sha256) + ".jpg"

    def lookup(self, sha256: str) -> ImageFacts | None:
        """Return the facts of a cached original, or None when it is not (completely) cached."""
        if not self.holds(sha256):
            return None
        return ImageFacts(**json.loads(self.image_path(sha256).with_suffix(".json").read_text()))

    def holds(self, sha256: str) -> bool:
        """Return whether a complete entry is cached (the facts file is written last), without reading it."""
        stem = self._stem(sha256)
        return os.path.isfile(stem + ".json") and os.path.isfile(stem + ".jpg")

    def store(self, sha256: str, image: Image.Image, facts: ImageFacts) -> Path:
        """Presize an upright RGB image and cache it; the facts are written last, so they mark a complete entry.

        Raises:
            CacheWriteError: The cache cannot be written (disk full, read-only, not a folder). Nothing partial is
                left under an entry's name: each file is written beside it and renamed into place.
        """
        resized = presize_image(image, self.presize)
        target = self.image_path(sha256)
        try:
            write_atomically(target, lambda path: resized.save(path, format="JPEG", quality=CACHE_JPEG_QUALITY))
            write_text_atomically(target.with_suffix(".json"), json.dumps(facts.as_dict()))
        except OSError as error:
            raise CacheWriteError(
                f"Cannot write the presize cache at {self.folder}: {error}. Free space on that disk, or point "
                "--cache-dir (or PETS_HOME) at a writable disk with room for the presized images."
            ) from error
        return target


@dataclass(frozen=True)
class PresizeResult:
    """The manifest with a `presized_path` column, and how many images were found in the cache."""

    manifest: pd.DataFrame
    cache_hits: int
    written: int


def presize_file(source: Path, sha256: str, cache: PresizeCache) -> Path:
    """Decode one original and cache its presized version."""
    image, facts = open_rgb_with_facts(source)
    return cache.store(sha256, image, facts)


def presize_images(
    manifest: pd.DataFrame,
    cache_dir: Path,
    *,
    presize: int = DEFAULT_PRESIZE,
    workers: int | None = None,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> PresizeResult:
    """Presize every image of the manifest (needs `path` and `sha256` columns) that is not cached yet.

    Args:
        manifest: cleaned manifest; `sha256` is the digest of each original file.
        cache_dir: root of the presize cache, shared by runs.
        presize: short side of the cached images, in pixels.
        workers: threads decoding and resizing (Pillow releases the GIL while it does both).
        progress: show a progress bar: on a terminal (None), always (True) or never (False).
        on_progress: called as `on_progress(done, total)` after each image presized.
    """
    cache = PresizeCache(cache_dir, presize)
    digests = manifest["sha256"].tolist()
    missing = {
        digest: Path(path) for path, digest in zip(manifest["path"], digests, strict=True) if not cache.holds(digest)
    }
    with ThreadPoolExecutor(max_workers=workers or len(os.sched_getaffinity(0))) as pool:
        jobs = pool.map(lambda item: presize_file(item[1], item[0], cache), missing.items())
        bar = progress_bar(jobs, show=progress, total=len(missing), desc=f"presize {presize}px", unit="img")
        for done, _ in enumerate(bar, start=1):
            if on_progress is not None:
                on_progress(done, len(missing))
    result = manifest.assign(presized_path=[cache.image_path_str(digest) for digest in digests])
    hits = sum(digest not in missing for digest in digests)
    return PresizeResult(manifest=result, cache_hits=hits, written=len(missing))
