"""List image files and label each one from its file name with a regular expression."""

from __future__ import annotations

import mimetypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lib.common.errors import InputError, MissingInputError, NotAFolderError, UserError
from lib.recipe import DEFAULT_LABEL_PATTERN

# fastbook ch. 5: `RegexLabeller(pat=r'(.+)_\d+.jpg$')` applied to the file name. The `.` is unescaped in the
# book, so it matches any character; we keep the book's pattern verbatim.
MAX_EXAMPLES = 5


class UnmatchedFilesError(UserError, ValueError):
    """Raised when some file names do not match the label pattern."""


class NoImagesError(MissingInputError):
    """Raised when a data folder holds no image files."""


@dataclass(frozen=True)
class LabelledImages:
    """The manifest of labelled images and the files the pattern skipped."""

    manifest: pd.DataFrame
    unmatched: tuple[str, ...]


def image_extensions() -> frozenset[str]:
    """Return every extension the OS mime database maps to an image type, as fastai's `image_extensions`."""
    mimetypes.init()
    from_mime = {ext.lower() for ext, mime in mimetypes.types_map.items() if mime.startswith("image/")}
    # A minimal mime database must still find the common formats.
    return frozenset(from_mime | {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})


def image_files(root: Path) -> list[Path]:
    """List image files under root recursively, skipping hidden files and folders, sorted by path.

    fastai's `get_image_files` returns os.walk order; sorting makes the manifest, and so the split, independent of
    the filesystem.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotAFolderError(f"Data folder {root} does not exist or is not a folder: pass an existing --data-dir.")
    extensions = image_extensions()
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [
            os.path.join(folder, n)
            for n in names
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions
        ]
    # Sorted by path components, as sorting Path objects does, but without building 7000 Paths to compare.
    return [Path(name) for name in sorted(found, key=lambda name: name.split(os.sep))]


def label_from_filename(name: str, pattern: re.Pattern[str]) -> str | None:
    """Return the first group of the pattern searched in the file name, or None where it does not match."""
    match = pattern.search(name)
    return match.group(1) if match else None


NO_IMAGES_FIX = {  # by the option that chose the images
    "--data-dir": "Point --data-dir at the folder that holds the images.",
    "--data-url": "Check that --data-url names an archive of images, or pass --data-dir with a folder of images.",
}


def label_images(
    root: Path, *, pattern: str = DEFAULT_LABEL_PATTERN, skip_unmatched: bool = False, source: str = "--data-dir"
) -> LabelledImages:
    """Label every image under root from its file name.

    Args:
        root: folder searched recursively for images.
        pattern: regular expression searched in each file name; its first group is the label.
        skip_unmatched: report files the pattern does not match instead of raising.
        source: the option that chose the images (a key of NO_IMAGES_FIX): the fix NoImagesError suggests.

    Raises:
        NoImagesError: root holds no image files.
        UnmatchedFilesError: some names do not match and skip_unmatched is False.
    """
    compiled = _compile_pattern(pattern)
    # Resolved once here rather than per file: the paths found below it are then absolute and canonical already.
    paths = image_files(Path(root).resolve())
    if not paths:
        raise NoImagesError(
            f"No image files found under {root} (searched recursively for {', '.join(sorted(image_extensions())[:8])}"
            f", ...). {NO_IMAGES_FIX[source]}"
        )
    labels = [label_from_filename(p.name, compiled) for p in paths]
    unmatched = tuple(str(p) for p, label in zip(paths, labels, strict=True) if label is None)
    if unmatched and not skip_unmatched:
        raise UnmatchedFilesError(_unmatched_message(unmatched, len(paths), pattern))
    rows = [_manifest_row(p, label) for p, label in zip(paths, labels, strict=True) if label is not None]
    if not rows:
        raise UnmatchedFilesError(_unmatched_message(unmatched, len(paths), pattern))
    return LabelledImages(manifest=pd.DataFrame(rows), unmatched=unmatched)


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise InputError(f"Label pattern {pattern!r} is not a valid regular expression: {error}") from error
    if compiled.groups < 1:
        raise InputError(
            f"Label pattern {pattern!r} needs a group, e.g. r'(.+)_\\d+.jpg$': its first group is the label."
        )
    return compiled


def _manifest_row(path: Path, label: str) -> dict:
    # Size and mtime make the manifest change when a file does, so it can key caches of later stages.
    stat = path.stat()
    return {"path": str(path), "label": label, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _unmatched_message(unmatched: tuple[str, ...], total: int, pattern: str) -> str:
    examples = ", ".join(Path(p).name for p in unmatched[:MAX_EXAMPLES])
    return (
        f"{len(unmatched)} of {total} file names do not match the label pattern '{pattern}' "
        f"(e.g. {examples}). Fix the pattern with --label-pattern, or pass --skip-unmatched to leave them out."
    )
