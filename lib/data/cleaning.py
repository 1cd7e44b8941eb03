"""Verify that every image decodes, exclude the ones that do not, and report why.

The real Oxford-IIIT Pet archive holds a few corrupt files, and PNG, grayscale or CMYK data under ``.jpg``
names (TFDS oxford_iiit_pet 4.0.0 notes). fastai finds out while training; here every file is decoded once,
up front, through the same ``images.open_rgb`` that training uses, so what is kept is known to load.
Originals are only read.
"""

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from lib.common.files import write_text_atomically
from lib.common.pools import thread_pool
from lib.common.progress import ProgressCallback, progress_bar
from lib.data import images
from lib.data.digests import FileDigests, stamp_of
from lib.data.duplicates import PerceptualHashes, perceptual_hash
from lib.data.presize import PresizeCache

REASONS = ("empty", "not_image", "truncated", "too_large", "unreadable")
KEPT_COLUMNS = ("width", "height", "mode", "converted", "sha256")
EXCLUDED_COLUMNS = ("reason", "detail")
_COLUMN_DTYPES = {"width": "int64", "height": "int64", "converted": "bool"}  # the rest are strings
REPORT_NAME = "cleaning_report.json"
EXCLUDED_NAME = "excluded.csv"


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames field by field has no single truth value
class CleaningResult:
    """The manifest split into images that decode and images that do not.

    Attributes:
        kept: Input rows that decode, in input order, plus width and height (as decoded, after EXIF
            rotation), mode (the original Pillow mode), converted (mode was not RGB, or EXIF rotated the
            image) and sha256 (hex digest of the file bytes, the image's content address for later stages).
        excluded: Input rows that do not decode, in input order, plus reason (one of REASONS) and detail (the
            error message).
    """

    kept: pd.DataFrame
    excluded: pd.DataFrame
    decoded: int = 0  # files decoded by this call: the others were known from the presize cache

    def counts(self) -> dict[str, int]:
        """Return the number kept, the number excluded, and the number excluded for each reason present."""
        by_reason = self.excluded["reason"].value_counts()
        return {
            "kept": len(self.kept),
            "excluded": len(self.excluded),
            **{reason: int(by_reason[reason]) for reason in REASONS if reason in by_reason},
        }


@dataclass(frozen=True)
class _Verdict:
    """What checking one file found: either a reason to exclude it or the facts about a decoded image."""

    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    converted: bool = False
    sha256: str = ""
    decoded: bool = False


def clean_images(
    manifest: pd.DataFrame,
    *,
    max_pixels: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    presize_cache: PresizeCache | None = None,
    digests: FileDigests | None = None,
    on_progress: ProgressCallback | None = None,
    hashes: PerceptualHashes | None = None,
) -> CleaningResult:
    """Decode every image of a manifest and split its rows into kept and excluded.

    Args:
        manifest: One row per image with at least ``path`` (absolute) and ``label``; other columns are kept.
        max_pixels: Largest allowed width * height; see ``images.open_rgb``.
        workers: Threads decoding in parallel; defaults to the CPUs this process may use.
        progress: Show a progress bar: on a terminal (None), always (True) or never (False).
        presize_cache: Where each image that decodes is presized while it is in memory, so no original is
            decoded twice; images it already holds are kept without decoding them again, and a damaged entry is
            rebuilt from its original (lib/data/presize.py says how entries are checked).
        digests: Remembered digests of unchanged files: with the presize cache, a warm re-run reads no original.
        on_progress: Called as `on_progress(done, total)` after each file that had to be read.
        hashes: Where the perceptual hash of each image decoded is remembered (lib/data/duplicates.py), computed
            while the image is in memory.
    """
    paths = manifest["path"].astype(str).tolist()
    workers = workers or len(os.sched_getaffinity(0))
    # Threads suffice: Pillow releases the GIL while decoding and hashlib while hashing. Pillow's own bomb
    # warning is raised as an error in the workers (the filter is process-wide), so open_rgb turns it into
    # too_large instead of printing it.
    with warnings.catch_warnings(), thread_pool(workers) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # map keeps the input order
        # Unchanged files the cache holds are settled here, with a stat each; the others are read in the pool.
        verdicts = [_remembered(path, presize_cache, digests) for path in paths]
        unsettled = [index for index, verdict in enumerate(verdicts) if verdict is None]
        checks = pool.map(
            lambda index: _check_image(paths[index], max_pixels, presize_cache, digests, hashes), unsettled
        )
        bar = progress_bar(checks, show=progress, total=len(unsettled), desc="verifying images", unit="image")
        for done, (index, verdict) in enumerate(zip(unsettled, bar, strict=True), start=1):
            verdicts[index] = verdict
            if on_progress is not None:
                on_progress(done, len(unsettled))
    if digests is not None:
        digests.save()
    if hashes is not None:
        hashes.save()
    # A positional mask, not an index-aligned Series: the manifest's index may be anything.
    is_kept = np.array([verdict.reason is None for verdict in verdicts], dtype=bool)
    return CleaningResult(
        kept=_with_columns(manifest[is_kept], [v for v in verdicts if v.reason is None], KEPT_COLUMNS),
        excluded=_with_columns(manifest[~is_kept], [v for v in verdicts if v.reason], EXCLUDED_COLUMNS),
        decoded=sum(verdict.decoded for verdict in verdicts),
    )


def write_cleaning_report(result: CleaningResult, out_dir: Path) -> Path:
    """Write cleaning_report.json (counts and excluded files) and excluded.csv; return the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = [column for column in ("path", "label", *EXCLUDED_COLUMNS) if column in result.excluded.columns]
    report = {"counts": result.counts(), "excluded": result.excluded[listed].to_dict(orient="records")}
    write_text_atomically(out_dir / EXCLUDED_NAME, result.excluded.to_csv(index=False))
    return write_text_atomically(out_dir / REPORT_NAME, json.dumps(report, indent=2, default=str) + "\n")


def _check_image(
    path: str,
    max_pixels: int | None,
    presize_cache: PresizeCache | None,
    digests: FileDigests | None = None,
    hashes: PerceptualHashes | None = None,
) -> _Verdict:
    """Read one file once, decode it fully (unless the presize cache knows it) and say whether to keep it."""
    try:
        stamp = stamp_of(path)  # before reading: a change while reading gives a new stamp next time
        data = Path(path).read_bytes()
    except OSError as error:  # permission denied, a directory, a file gone since listing
        return _Verdict(reason="unreadable", detail=str(error))
    if not data:
        return _Verdict(reason="empty", detail="the file has zero bytes")
    sha256 = hashlib.sha256(data).hexdigest()
    known = presize_cache.lookup(sha256) if presize_cache else None
    if known is not None:  # these exact bytes decoded before, or the cache would not hold them
        verdict = _Verdict(sha256=sha256, **known.as_dict())
    else:
        verdict = _decode(path, data, sha256, max_pixels, presize_cache, hashes)
        if verdict.reason is not None:
            return verdict
    if digests is not None:
        facts = {field.name: getattr(verdict, field.name) for field in fields(images.ImageFacts)}
        digests.remember(path, stamp, sha256, facts)
    return verdict


def _remembered(path: str, presize_cache: PresizeCache | None, digests: FileDigests | None) -> _Verdict | None:
    """The verdict of an unchanged file the presize cache holds, from its remembered digest; else None."""
    if digests is None or presize_cache is None:
        return None
    try:
        remembered = digests.get(path, stamp_of(path))
    except OSError:
        return None  # let the full check report it
    if remembered is None or remembered[1] is None or not presize_cache.holds(remembered[0]):
        return None
    sha256, facts = remembered
    return _Verdict(sha256=sha256, **facts)


def _decode(
    path: str,
    data: bytes,
    sha256: str,
    max_pixels: int | None,
    presize_cache: PresizeCache | None,
    hashes: PerceptualHashes | None = None,
) -> _Verdict:
    """Decode image bytes through images.open_rgb_with_facts, presize them if asked, and record the facts.

    A file that does not decode becomes a row of the report, never a stopped run. Writing the presize cache is
    outside that: a full or read-only disk is the cache's fault, not the image's, and stops the stage with
    `CacheWriteError` instead of excluding every image as broken.
    """
    buffer = io.BytesIO(data)
    buffer.name = path  # open_rgb names the file in its errors
    try:
        rgb, facts = images.open_rgb_with_facts(buffer, max_pixels=max_pixels)
    except Exception as error:
        return _Verdict(reason=_reason_for(error), detail=str(error) or type(error).__name__, decoded=True)
    if presize_cache is not None:
        presize_cache.store(sha256, rgb, facts)
    if hashes is not None:
        hashes.remember(sha256, perceptual_hash(rgb))
    return _Verdict(sha256=sha256, decoded=True, **facts.as_dict())


def _reason_for(error: Exception) -> str:
    """Map an error raised while opening or decoding image bytes to a cleaning reason."""
    if isinstance(error, images.ImageTooLargeError):
        return "too_large"
    if isinstance(error, UnidentifiedImageError):  # a subclass of OSError, so it is tested first
        return "not_image"
    # Pillow reports pixel data that ends or breaks early as OSError ("image file is truncated", "broken data
    # stream when reading image file"); its format plugins sometimes raise SyntaxError or EOFError instead.
    if isinstance(error, OSError | SyntaxError | EOFError):
        return "truncated"
    return "unreadable"


def _with_columns(rows: pd.DataFrame, verdicts: list[_Verdict], columns: tuple[str, ...]) -> pd.DataFrame:
    """Return rows renumbered from 0, with the named verdict fields appended as columns."""
    rows = rows.reset_index(drop=True)
    for column in columns:
        values = [getattr(verdict, column) for verdict in verdicts]
        rows[column] = pd.Series(values, dtype=_COLUMN_DTYPES.get(column, str))
    return rows
