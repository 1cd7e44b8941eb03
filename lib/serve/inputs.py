"""What batch prediction labels: the images of a folder, of an archive (URL or path), or those a CSV lists.

`collect_inputs` turns any of them into one table, a row per image in the order predictions.csv keeps: `file` (how
the CSV names it: its path under the folder or archive, or the CSV's own value, a URL without its credentials),
`path` (the local file, downloaded when the CSV gave a URL), `sha256` of its bytes and `error` (why there is no file
to read: a download that failed, a path that does not exist). `input_digest` hashes the names with the bytes, so the
same images under the same names give the same digest wherever they sit, and any changed byte another one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from lib.common.download import DownloadError, download_file, download_lock, file_name, file_sha256, redact_url
from lib.common.errors import InputError, MissingInputError
from lib.data.digests import DIGESTS_FILE, FileDigests, stamp_of
from lib.data.labelling import list_images
from lib.data.source import ArchiveLimits, fetch_dataset, find_images_dir

INPUT_COLUMNS = ("file", "path", "sha256", "error")
CSV_COLUMNS = ("path", "url")  # the column of a CSV input that names the images, the first one found
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")  # what lib/data/source.py extracts
URL_SCHEMES = ("http://", "https://", "file://")
DOWNLOADS_FOLDER = "predict-downloads"  # under the cache: images a CSV names by URL, one folder per URL


class PredictInputError(InputError):
    """The input of `pets predict-images` is not a folder, an archive or a CSV of images it can read."""


def is_url(value: str) -> bool:
    return value.lower().startswith(URL_SCHEMES)


def input_kind(source: str) -> str:
    """Say what the input is: `folder`, `csv` or `archive`; refuse anything else naming what is accepted."""
    name = file_name(source) if is_url(source) else Path(source).name
    lowered = name.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if not is_url(source) and Path(source).is_dir():
        return "folder"
    if not is_url(source) and not Path(source).exists():
        raise MissingInputError(f"INPUT {source} does not exist: pass a folder of images, an archive or a CSV")
    raise PredictInputError(
        f"INPUT {redact_url(source)} is neither a folder, a CSV (.csv, with a path or url column) nor an archive "
        f"({', '.join(ARCHIVE_SUFFIXES)}): pass one of them"
    )


def collect_inputs(source: str, cache_dir: Path, *, limits: ArchiveLimits = ArchiveLimits()) -> pd.DataFrame:
    """Return the input table (INPUT_COLUMNS) of a folder, an archive URL or path, or a CSV of paths or URLs."""
    cache_dir = Path(cache_dir)
    kind = input_kind(source)
    if kind == "folder":
        rows = _listed(Path(source).resolve())
    elif kind == "archive":
        rows = _listed(find_images_dir(fetch_dataset(source, cache_dir, limits=limits)))
    else:
        rows = _csv_rows(_local_csv(source, cache_dir), cache_dir)
    if not rows:
        raise PredictInputError(f"INPUT {redact_url(source)} holds no image: pass a folder, archive or CSV of images")
    return _with_digests(pd.DataFrame(rows, columns=["file", "path", "error"]), cache_dir)


def input_digest(inputs: pd.DataFrame) -> str:
    """Return the hex sha256 of the images' names and bytes, in order (a missing file counts by its error)."""
    lines = (f"{file}\t{sha256}\t{error}\n" for file, sha256, error in inputs[["file", "sha256", "error"]].values)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _listed(root: Path) -> list[tuple[str, str, str]]:
    """The images under root (lib/data/labelling.py `list_images`: recursive, image extensions only)."""
    listing = list_images(root)
    return [(str(name), str(path), "") for name, path in zip(listing.relative, listing.images, strict=True)]


def _local_csv(source: str, cache_dir: Path) -> Path:
    if not is_url(source):
        return Path(source).resolve()
    try:
        return _downloaded(source, cache_dir)
    except DownloadError as error:
        raise PredictInputError(f"INPUT {redact_url(source)} could not be downloaded: {error}") from None


def _csv_rows(csv_path: Path, cache_dir: Path) -> list[tuple[str, str, str]]:
    """One row per value of the CSV's path (or url) column: a path relative to the CSV's folder, or a URL."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise PredictInputError(f"INPUT {csv_path} is not a readable CSV ({error}): fix or replace it") from None
    column = next((name for name in CSV_COLUMNS if name in table.columns), None)
    if column is None:
        raise PredictInputError(
            f"INPUT {csv_path} has no {' or '.join(CSV_COLUMNS)} column (its columns: {', '.join(table.columns)}): "
            "name the column of image paths or URLs `path` or `url`"
        )
    rows = []
    for value in table[column].str.strip():
        if not value:
            rows.append(("", "", f"the CSV's {column} cell is empty"))
        elif is_url(value):
            rows.append(_url_row(value, cache_dir))
        else:
            path = Path(value).expanduser()
            rows.append((value, str(path if path.is_absolute() else csv_path.parent / path), ""))
    return rows


def _url_row(url: str, cache_dir: Path) -> tuple[str, str, str]:
    try:
        return redact_url(url), str(_downloaded(url, cache_dir)), ""
    except DownloadError as error:  # this image is reported in its row; the others are still labelled
        return redact_url(url), "", f"{type(error).__name__}: {error.reason}"


def _downloaded(url: str, cache_dir: Path) -> Path:
    """Download url once into the cache (a folder per URL: two URLs may end in the same file name)."""
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / DOWNLOADS_FOLDER / folder / file_name(url)
    with download_lock(target):
        if not target.is_file():  # download_file renames a complete, checked transfer into place: it is whole
            download_file(url, target, progress=False)
    return target


def _with_digests(rows: pd.DataFrame, cache_dir: Path) -> pd.DataFrame:
    """Add each file's sha256, remembered by size and modification time (a warm rerun reads no file to hash it)."""
    digests = FileDigests(cache_dir / DIGESTS_FILE)
    sha256, errors = [], []
    for path, error in zip(rows["path"], rows["error"], strict=True):
        if error:
            sha256.append("")
            errors.append(error)
        elif not Path(path).is_file():
            sha256.append("")
            errors.append(f"FileNotFoundError: no such file {path}")
        else:
            sha256.append(_sha256(Path(path), digests))
            errors.append("")
    digests.save()
    return rows.assign(sha256=sha256, error=errors)[list(INPUT_COLUMNS)]


def _sha256(path: Path, digests: FileDigests) -> str:
    stamp = stamp_of(path)
    known = digests.get(path, stamp)
    if known is not None:
        return known[0]
    digest = file_sha256(path)
    digests.remember(path, stamp, digest)
    return digest
