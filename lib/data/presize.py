"""Presizing: resize every image once on the CPU into a content-addressed cache that later runs reuse.

fastbook ch. 5 presizes with `item_tfms=Resize(460)` and decodes every original JPEG again in every epoch. Here each
original is decoded once: its short side is scaled to the presize (bilinear, antialiased, as Pillow's BILINEAR is
when it shrinks) and the result is cached under the sha256 of the original's bytes, beside the facts decoding found.
Cleaning fills the cache as it verifies each image (lib/data/cleaning.py), so the presize stage usually only collects
paths. The per-epoch random square crop (centre crop on validation) happens at load time (lib/data/loading.py).

The cache heals itself. Each entry is `<sha256>.jpg` and a `<sha256>.json` record, written last, of the original's
facts and of the size and sha256 of the .jpg bytes. An entry that is missing a file, whose record does not parse or
whose .jpg differs from its record is rebuilt from its original, with one warning on the `lib.data.presize` logger
naming it. The checks are split by cost: every lookup (each image of each warm run, in cleaning and in the presize
stage) reads the small record and stats the .jpg, which catches missing, empty and truncated files and broken
records, for ~15 us an entry; the sha256 and a full decode are checked where the .jpg bytes are read anyway, when
loading them for training (`read_presized`), where hashing bytes already in memory adds ~2% to decoding them (a
460 px entry: 1.54 ms against 1.51 ms). A damaged entry stops a run only when its original is gone or has changed
(`DamagedCacheError`). Processes that rebuild one entry at once (loader workers, two runs) write the same bytes, each
by an atomic rename, so whichever rename lands last leaves a whole entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lib.common.errors import UserError
from lib.common.files import write_atomically, write_text_atomically
from lib.common.pools import thread_pool
from lib.common.progress import ProgressCallback, progress_bar
from lib.data.images import ImageFacts, open_rgb_with_facts
from lib.data.pictures import presize_image
from lib.recipe import DEFAULT_PRESIZE

logger = logging.getLogger(__name__)

# Quality 95 keeps re-encoding loss below what the bilinear resize and augmentation already change.
CACHE_JPEG_QUALITY = 95
# Bump when the resize, the encoding or an entry's files change, so old cache entries are never read as new ones.
# v2: the record holds the size and sha256 of the cached .jpg (v1 records had neither, so a v2 cache starts empty and
# a v1 folder beside it is never read: it can be deleted).
CACHE_FORMAT_VERSION = "v2-bilinear-q95"
_FOLDER_NAME = re.compile(rf"presize-([1-9][0-9]*)-{re.escape(CACHE_FORMAT_VERSION)}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Pillow raises these for image data it cannot identify or that ends or breaks early (see lib/data/cleaning.py).
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError)
_AGAIN = "re-run the data stage (pets summary)"


class CacheWriteError(UserError, RuntimeError):
    """The presize cache could not be written: a disk or permission problem, not a problem of the image."""


class DamagedCacheError(UserError, RuntimeError):
    """A damaged presize cache entry cannot be rebuilt: its original is gone, unreadable or changed."""


class EntryRecord(BaseModel):
    """The `.json` of a cache entry: the facts about the original, and the size and sha256 of the cached .jpg."""

    model_config = ConfigDict(strict=True, frozen=True)  # strict: 1 is no bool and "64" no int

    width: int = Field(gt=0)
    height: int = Field(gt=0)
    mode: str
    converted: bool
    jpeg_bytes: int = Field(gt=0)
    jpeg_sha256: str = Field(pattern=_SHA256.pattern)

    def facts(self) -> ImageFacts:
        """The facts about the original, as decoding it found them."""
        return ImageFacts(width=self.width, height=self.height, mode=self.mode, converted=self.converted)


class PresizeCache:
    """Presized images and the facts about their originals, addressed by the sha256 of the original file."""

    def __init__(self, root: Path, presize: int = DEFAULT_PRESIZE):
        if presize < 1:
            raise ValueError(f"presize must be a positive number of pixels, got {presize}: e.g. --presize 460.")
        self.presize = presize
        self.folder = Path(root) / f"presize-{presize}-{CACHE_FORMAT_VERSION}"
        self._folder = str(self.folder)
        self._warned: set[str] = set()  # damaged entries warned about and not stored since, from any thread
        self._lock = threading.Lock()

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
        """Return the facts of a cached original, or None when it is not cached whole (a damaged entry warns once)."""
        record, problem = self._inspect(sha256)
        if problem is not None:
            self._warn(sha256, problem)
        return None if record is None else record.facts()

    def holds(self, sha256: str) -> bool:
        """Return whether an entry is cached whole: its record parses and its .jpg has the recorded size."""
        return self.lookup(sha256) is not None

    def _inspect(self, sha256: str) -> tuple[EntryRecord | None, str | None]:
        """Return (record, None) for a whole entry, (None, None) for none at all, (None, what is wrong) otherwise."""
        stem = self._stem(sha256)
        try:
            with open(stem + ".json", "rb") as file:
                text: bytes | None = file.read()
        except FileNotFoundError:
            text = None
        try:
            size: int | None = os.stat(stem + ".jpg").st_size
        except FileNotFoundError:
            size = None
        if text is None:
            return None, None if size is None else "its .json record is missing"
        if size is None:
            return None, "its .jpg is missing"
        try:
            record = EntryRecord.model_validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return None, f"its .json record is broken: {where + ' ' if where else ''}{first['msg']}"
        if size != record.jpeg_bytes:
            return None, f"its .jpg has {size} bytes, its record says {record.jpeg_bytes}"
        return record, None

    def _warn(self, sha256: str, problem: str) -> None:
        with self._lock:
            if sha256 in self._warned:
                return
            self._warned.add(sha256)
        logger.warning(
            "Presize cache entry %s is damaged (%s): rebuilding it from its original.",
            self.image_path_str(sha256),
            problem,
        )

    def store(self, sha256: str, image: Image.Image, facts: ImageFacts) -> Path:
        """Presize an upright RGB image and cache it; its record is written last, so it marks a whole entry.

        Raises:
            CacheWriteError: The cache cannot be written (disk full, read-only, not a folder). Nothing partial is
                left: each file is written beside its name, fsynced and renamed into place, and a .jpg whose record
                could not follow it is removed.
        """
        resized = presize_image(image, self.presize)
        target = self.image_path(sha256)
        written: dict[str, object] = {}

        def write_jpeg(path: Path) -> None:
            resized.save(path, format="JPEG", quality=CACHE_JPEG_QUALITY)
            with open(path, "rb") as file:  # the bytes as written, from the page cache: what a reader will hash
                data = file.read()
            written.update(jpeg_bytes=len(data), jpeg_sha256=hashlib.sha256(data).hexdigest())

        try:
            write_atomically(target, write_jpeg)
            record = EntryRecord(**facts.as_dict(), **written)
            write_text_atomically(target.with_suffix(".json"), record.model_dump_json())
        except OSError as error:
            for leftover in (target.with_suffix(".json"), target):  # the record first: it marks an entry whole
                with contextlib.suppress(OSError):  # a read-only cache: nothing was written under these names either
                    leftover.unlink(missing_ok=True)
            raise CacheWriteError(
                f"Cannot write the presize cache at {self.folder}: {error}. Free space on that disk, or point "
                "--cache-dir (or PETS_HOME) at a writable disk with room for the presized images."
            ) from error
        with self._lock:
            self._warned.discard(sha256)  # whole again: damage found later is news
        return target

    def rebuild(self, sha256: str, original: str | Path | None) -> Path:
        """Presize the original again into its entry, after checking that its bytes still have this digest.

        Raises:
            DamagedCacheError: The original is not named, cannot be read, or its bytes have another digest.
            CacheWriteError: The cache cannot be written.
        """
        entry = self.image_path_str(sha256)
        fix = f"restore the original, or delete the cache folder {self.folder} and {_AGAIN}"
        if original is None:
            raise DamagedCacheError(
                f"Cannot presize the cache entry {entry}: the manifest names no original (no path column); "
                f"delete the cache folder {self.folder} and {_AGAIN}."
            )
        try:
            data = Path(original).read_bytes()
        except OSError as error:
            raise DamagedCacheError(
                f"Cannot presize {original} into the cache entry {entry}: {error.strerror or error}; {fix}."
            ) from error
        if hashlib.sha256(data).hexdigest() != sha256:
            raise DamagedCacheError(
                f"Cannot presize {original} into the cache entry {entry}: the file has changed since it was "
                f"cleaned (its sha256 is no longer {sha256}); {_AGAIN}."
            )
        buffer = io.BytesIO(data)
        buffer.name = str(original)  # open_rgb names the file in its errors
        return self.store(sha256, *open_rgb_with_facts(buffer))

    def read(self, sha256: str, original: str | Path | None) -> Image.Image:
        """Return the cached image decoded in RGB, after checking it against its record; rebuild it when damaged.

        The first problem found is warned about once, the entry is rebuilt from the original (see `rebuild` for
        what it raises) and the rebuilt .jpg is read, so a healthy and a healed entry give the same pixels.
        """
        image, problem = self._read(sha256)
        if image is not None:
            return image
        self._warn(sha256, problem or "its files are missing")
        self.rebuild(sha256, original)
        image, problem = self._read(sha256)
        if image is None:
            raise DamagedCacheError(
                f"The presize cache entry {self.image_path_str(sha256)} is still damaged after rebuilding it "
                f"({problem}): check the disk under {self.folder}."
            )
        return image

    def _read(self, sha256: str) -> tuple[Image.Image | None, str | None]:
        """Return (image, None) for an entry whose bytes match its record and decode, else (None, what is wrong)."""
        record, problem = self._inspect(sha256)
        if record is None:
            return None, problem
        try:
            with open(self.image_path_str(sha256), "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None, "its .jpg is missing"
        if len(data) != record.jpeg_bytes or hashlib.sha256(data).hexdigest() != record.jpeg_sha256:
            return None, "its .jpg bytes do not match the sha256 in its record"
        try:
            with Image.open(io.BytesIO(data)) as cached:
                return cached.convert("RGB"), None  # convert decodes in full, even an RGB image (a copy)
        except _DECODE_ERRORS as error:
            return None, f"its .jpg does not decode: {error}"


@lru_cache(maxsize=64)
def _cache_at(root: str, presize: int) -> PresizeCache:
    """One PresizeCache per cache folder and process, so each damaged entry is warned about once."""
    return PresizeCache(Path(root), presize)


def read_presized(presized_path: str, original: str | Path | None = None) -> Image.Image:
    """Decode one presized image in RGB, checked against its cache record and rebuilt from its original if damaged.

    `presized_path` is a `presized_path` of the presize stage's manifest, `original` its `path`. A file outside a
    cache of this version is decoded as it is, without a record to check it against.

    Raises:
        DamagedCacheError: The entry is damaged and cannot be rebuilt (see `PresizeCache.rebuild`).
    """
    shard, name = os.path.split(presized_path)
    folder, shard_name = os.path.split(shard)
    root, folder_name = os.path.split(folder)
    sha256, suffix = os.path.splitext(name)
    found = _FOLDER_NAME.fullmatch(folder_name)
    if found is None or suffix != ".jpg" or not _SHA256.fullmatch(sha256) or shard_name != sha256[:2]:
        with Image.open(presized_path) as image:
            return image.convert("RGB")
    return _cache_at(root, int(found.group(1))).read(sha256, original)


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
    """Presize every image of the manifest (needs `path` and `sha256` columns) not cached whole yet.

    A damaged entry is rebuilt like a missing one, with one warning naming it.

    Args:
        manifest: cleaned manifest; `sha256` is the digest of each original file.
        cache_dir: root of the presize cache, shared by runs.
        presize: short side of the cached images, in pixels.
        workers: threads decoding and resizing (Pillow releases the GIL while it does both).
        progress: show a progress bar: on a terminal (None), always (True) or never (False).
        on_progress: called as `on_progress(done, total)` after each image presized.

    Raises:
        DamagedCacheError: An original to presize is gone, unreadable, or no longer has its `sha256`.
        CacheWriteError: The cache cannot be written.
    """
    cache = PresizeCache(cache_dir, presize)
    digests = manifest["sha256"].tolist()
    missing = {
        digest: Path(path) for path, digest in zip(manifest["path"], digests, strict=True) if not cache.holds(digest)
    }
    with thread_pool(workers or len(os.sched_getaffinity(0))) as pool:
        jobs = pool.map(lambda item: cache.rebuild(*item), missing.items())
        bar = progress_bar(jobs, show=progress, total=len(missing), desc=f"presize {presize}px", unit="img")
        for done, _ in enumerate(bar, start=1):
            if on_progress is not None:
                on_progress(done, len(missing))
    result = manifest.assign(presized_path=[cache.image_path_str(digest) for digest in digests])
    hits = sum(digest not in missing for digest in digests)
    return PresizeResult(manifest=result, cache_hits=hits, written=len(missing))
