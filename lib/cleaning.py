"""Verify that every image decodes, exclude the ones that do not, and report why.

The real Oxford-IIIT Pet archive holds a few corrupt files, and PNG, grayscale or CMYK data under ``.jpg``
names (TFDS notes, fastai-recipe.md §0). fastai finds out while training; here every file is decoded once,
up front, through the same ``images.open_rgb`` that training uses, so what is kept is known to load.
Originals are only read.
"""

import hashlib
import io
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from lib import images

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


def clean_images(
    manifest: pd.DataFrame,
    *,
    max_pixels: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> CleaningResult:
    """Decode every image of a manifest and split its rows into kept and excluded.

    Args:
        manifest: One row per image with at least ``path`` (absolute) and ``label``; other columns are kept.
        max_pixels: Largest allowed width * height; see ``images.open_rgb``.
        workers: Threads decoding in parallel; defaults to the CPUs this process may use.
        progress: Show a progress bar.
    """
    paths = manifest["path"].astype(str).tolist()
    workers = workers or len(os.sched_getaffinity(0))
    # Threads suffice: Pillow releases the GIL while decoding and hashlib while hashing. Pillow's own bomb
    # warning is raised as an error in the workers (the filter is process-wide), so open_rgb turns it into
    # too_large instead of printing it.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        checks = pool.map(lambda path: _check_image(path, max_pixels), paths)  # map keeps the input order
        bar = tqdm(checks, total=len(paths), desc="verifying images", unit="image", disable=not progress)
        verdicts = list(bar)
    # A positional mask, not an index-aligned Series: the manifest's index may be anything.
    is_kept = np.array([verdict.reason is None for verdict in verdicts], dtype=bool)
    return CleaningResult(
        kept=_with_columns(manifest[is_kept], [v for v in verdicts if v.reason is None], KEPT_COLUMNS),
        excluded=_with_columns(manifest[~is_kept], [v for v in verdicts if v.reason], EXCLUDED_COLUMNS),
    )


def write_cleaning_report(result: CleaningResult, out_dir: Path) -> Path:
    """Write cleaning_report.json (counts and excluded files) and excluded.csv; return the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = [column for column in ("path", "label", *EXCLUDED_COLUMNS) if column in result.excluded.columns]
    report = {"counts": result.counts(), "excluded": result.excluded[listed].to_dict(orient="records")}
    _write_atomically(out_dir / EXCLUDED_NAME, result.excluded.to_csv(index=False))
    return _write_atomically(out_dir / REPORT_NAME, json.dumps(report, indent=2, default=str) + "\n")


def _check_image(path: str, max_pixels: int | None) -> _Verdict:
    """Read one file once, decode it fully and say whether to keep it."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:  # permission denied, a directory, a file gone since listing
        return _Verdict(reason="unreadable", detail=str(error))
    if not data:
        return _Verdict(reason="empty", detail="the file has zero bytes")
    try:
        return _describe_image(path, data, max_pixels)
    except Exception as error:  # every failure must become a row of the report, not stop the whole run
        return _Verdict(reason=_reason_for(error), detail=str(error) or type(error).__name__)


def _describe_image(path: str, data: bytes, max_pixels: int | None) -> _Verdict:
    """Decode image bytes through images.open_rgb and record their size, mode and hash."""
    buffer = io.BytesIO(data)
    buffer.name = path  # open_rgb names the file in its errors
    rgb = images.open_rgb(buffer, max_pixels=max_pixels)
    with Image.open(io.BytesIO(data)) as original:  # header only: the mode and orientation before conversion
        mode, rotated = original.mode, images.exif_orientation(original) != 1
    return _Verdict(
        width=rgb.width,
        height=rgb.height,
        mode=mode,
        converted=mode != "RGB" or rotated,
        sha256=hashlib.sha256(data).hexdigest(),
    )


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


def _write_atomically(path: Path, text: str) -> Path:
    """Write text to a temporary file beside `path`, then rename it over `path`."""
    prefix = f".{path.name}."  # hidden, and named after its target, should a crash leave it behind
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=prefix, delete=False) as temporary:
        try:
            temporary.write(text)
        except BaseException:
            Path(temporary.name).unlink()
            raise
    os.replace(temporary.name, path)  # readers see the old file or the new one, never half of one
    return path
