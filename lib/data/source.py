"""Get the dataset: download an archive (resumable, checksummed), extract it safely, find the images folder.

The transfer itself is lib/common/download.py's, shared with the pretrained weights. The stages are idempotent: a
finished download is recognised by its sidecar `<name>.json`, a finished extraction by the `.extracted.json` marker
inside it, and neither becomes visible before it is complete (a `.part` file and a temporary sibling folder are
renamed into place at the end).
"""

import gzip
import hashlib
import json
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lib.common.download import (
    ChecksumMismatchError,
    DownloadError,
    download_file,
    download_lock,
    file_name,
    file_sha256,
)
from lib.common.errors import InputError, MissingInputError, NotAFolderError, UserError
from lib.recipe import DEFAULT_MAX_ARCHIVE_BYTES, DEFAULT_MAX_ARCHIVE_MEMBERS

# fastai URLs.PETS, the archive fastbook chapter 5 downloads with untar_data.
PETS_URL = "https://s3.amazonaws.com/fast-ai-imageclas/oxford-iiit-pet.tgz"

_ARCHIVE_KINDS = {".tar.gz": "tar", ".tgz": "tar", ".tar": "tar", ".zip": "zip"}
_EXTRACTED_MARKER = ".extracted.json"
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Folders that are not part of a dataset: hidden ones and the resource forks macOS adds to zip files.
_IGNORED_DIR_NAMES = ("__MACOSX",)
_UNSAFE_FIX = "Do not use this archive: check --data-url, or pass --data-dir with a folder of images you trust."
# The options of `pets train`, `summary`, ... (flows/options.py) that choose the data; without either the archive
# is the book's, so the URL is named too.
_FIX = (
    "Check the network and the URL (--data-url; by default the Oxford-IIIT Pet archive) and --sha256 when given, or "
    "pass --data-dir with a folder of images you already have."
)


class UnsafeArchiveError(UserError, ValueError):
    """An archive member would land outside the destination folder or is a link."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may extract, against zip and tar bombs: its files' total size and its number of members
    (files, folders and links), both read from the members' headers before their data is."""

    max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
    max_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS


class ArchiveTooLargeError(UnsafeArchiveError):
    """An archive holds more members, or would extract more bytes, than the limits allow (a zip or tar bomb)."""


def download_archive(
    url: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download url into cache_dir/downloads, resuming a partial transfer, and return the file's path.

    Args:
        url: An http(s):// or file:// URL, or a plain path to a local archive.
        cache_dir: Root of the cache; the file goes to `cache_dir/downloads/<name from the URL>`.
        sha256: Expected hex digest; a mismatch raises ChecksumMismatchError.
        progress: Show a progress bar: on a terminal (None), always (True) or never (False).
        timeout: Seconds to wait to connect and for each read.
        chunk_size: Bytes per disk write and per read of a local source.

    Raises:
        DownloadError: The transfer failed; `transient` tells whether a retry can help.
        ChecksumMismatchError: The file does not have the expected sha256.
    """
    expected = _normalize_sha256(sha256)
    target = Path(cache_dir) / "downloads" / file_name(url)
    if _is_downloaded(target, expected):
        return target
    digest = download_file(
        url, target, sha256=expected, progress=progress, timeout=timeout, chunk_size=chunk_size, fix=_FIX
    )
    _write_json(_suffixed(target, ".json"), {"url": url, "bytes": target.stat().st_size, "sha256": digest})
    return target


def extract_archive(archive: Path, dest_dir: Path, *, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a .tgz, .tar.gz, .tar or .zip archive into dest_dir, once, and return dest_dir.

    The members' sizes and number are checked against `limits` from their headers, before their data is read.

    Raises:
        ArchiveTooLargeError: The members add up to more than limits.max_bytes, or are more than limits.max_members.
        UnsafeArchiveError: A member would be written outside dest_dir, or is a link in a zip file.
        FileExistsError: dest_dir holds files that no earlier extraction put there.
        ValueError: The suffix is not supported or the archive cannot be read.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    extract = _EXTRACTORS[_archive_kind(archive)]
    digest = _archive_sha256(archive)
    if _is_extracted(dest_dir, digest):
        return dest_dir
    _refuse_foreign_dir(dest_dir)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.partial-", dir=dest_dir.parent))
    try:
        extract(archive, staging, _Budget(archive, limits))
        _write_json(staging / _EXTRACTED_MARKER, {"archive": archive.name, "sha256": digest})
        _move_into_place(staging, dest_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_dir


def fetch_dataset(
    url: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> Path:
    """Download and extract the archive at url, within `limits`, and return the extracted folder.

    Runs sharing a cache take turns per archive: the second one waits for the first, then finds the archive complete
    and extracted, so it is transferred once and nobody reads a half-written `.part` file or staging folder.
    """
    target = Path(cache_dir) / "downloads" / file_name(url)
    _archive_kind(target)  # fail before a long download, not after it
    with download_lock(target):
        archive = download_archive(url, cache_dir, sha256=sha256, progress=progress)
        dest_dir = Path(cache_dir) / "extracted" / _archive_stem(archive)
        return extract_archive(archive, dest_dir, limits=limits)


def cached_archive_digest(url: str, cache_dir: Path) -> str | None:
    """Return the sha256 of url's archive when it is downloaded and extracted in cache_dir, else None.

    Reads only the cache (no network I/O), so callers can key their own caches on what is really on disk.
    """
    try:
        archive = Path(cache_dir) / "downloads" / file_name(url)
    except DownloadError:
        return None
    record = _read_json(_suffixed(archive, ".json"))
    if record is None or not archive.is_file() or record.get("bytes") != archive.stat().st_size:
        return None
    digest = str(record.get("sha256"))
    return digest if _is_extracted(Path(cache_dir) / "extracted" / _archive_stem(archive), digest) else None


def find_images_dir(root: Path) -> Path:
    """Return the folder of images inside an extracted dataset (Oxford-IIIT Pet: `oxford-iiit-pet/images`)."""
    root = Path(root)
    if (root / "images").is_dir():
        return root / "images"
    subdirs = _dataset_subdirs(root)
    # The pet archive also holds annotations/trimaps/*.png, which are masks, not photos: never descend there.
    with_images = [subdir / "images" for subdir in subdirs if (subdir / "images").is_dir()]
    if len(with_images) == 1:
        return with_images[0]
    if len(subdirs) == 1:
        return subdirs[0]
    return root


def resolve_data_source(
    *,
    data_url: str | None,
    data_dir: Path | None,
    cache_dir: Path,
    sha256: str | None = None,
    progress: bool | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> Path:
    """Return the images folder from either a local folder (used as is) or an archive URL to fetch within `limits`.

    Raises:
        ValueError: Neither or both of data_url and data_dir are given.
        FileNotFoundError: data_dir does not exist.
        NotADirectoryError: data_dir is not a folder.
    """
    if (data_url is None) == (data_dir is None):
        given = "both" if data_url is not None else "neither"
        raise ValueError(
            f"Give exactly one of data_url (--data-url, an archive to download) or data_dir "
            f"(--data-dir, a local folder of images); {given} was given."
        )
    if data_dir is not None:
        return find_images_dir(_existing_dir(Path(data_dir)))
    return find_images_dir(fetch_dataset(data_url, cache_dir, sha256=sha256, progress=progress, limits=limits))


def dataset_folders(images_dir: Path, *, data_dir: Path | None, cache_dir: Path) -> list[Path]:
    """The images folder and the folders above it that still belong to the dataset: up to the --data-dir folder, or to
    the archive's extraction folder (find_images_dir may have gone down to `images/` below a CSV that sits beside it).
    """
    images_dir = Path(images_dir)
    top = Path(data_dir).resolve() if data_dir else (Path(cache_dir) / "extracted").resolve()
    folders = [images_dir]
    for parent in images_dir.parents:
        if parent == top.parent or (data_dir is None and parent == top):
            break
        folders.append(parent)
    return folders


def resolve_labels_csv(spec: str, folders: list[Path], cache_dir: Path) -> Path:
    """Return the labels CSV on this machine: downloaded afresh from a URL (a fixed label is then seen at once; it is
    small), an absolute path as it is, a relative one in the first of `folders` that has it (`dataset_folders`: a
    CSV that came inside the archive, beside its images folder).

    Raises:
        MissingInputError: a path that is not a file.
        DownloadError: the URL cannot be fetched.
    """
    if "://" in spec:
        digest = hashlib.sha256(spec.encode()).hexdigest()[:16]  # one folder per URL: two URLs may share a name
        target = Path(cache_dir) / "labels" / digest / file_name(spec)
        with download_lock(target):
            download_file(spec, target, progress=False, fix="Check --labels-csv, or give the CSV's path instead.")
        return target
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [Path(folder) / path for folder in folders]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        where = "" if path.is_absolute() else f" (looked for in {', '.join(str(folder) for folder in folders)})"
        raise MissingInputError(f"--labels-csv {spec}: no such file{where}; give the CSV's path or URL.")
    return found


# Downloading.


def _normalize_sha256(sha256: str | None) -> str | None:
    """Return sha256 in lower case; reject anything but 64 hex digits before a download starts."""
    if sha256 is None:
        return None
    normalized = sha256.strip().lower()
    if not _SHA256_PATTERN.fullmatch(normalized):
        raise InputError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}.")
    return normalized


def _suffixed(path: Path, suffix: str) -> Path:
    """Return path with suffix appended to its full name (a.tgz -> a.tgz.json)."""
    return path.with_name(path.name + suffix)


def _is_downloaded(target: Path, expected: str | None) -> bool:
    """Say whether target is a finished download per its sidecar; raise if it has a different checksum."""
    record = _read_json(_suffixed(target, ".json"))
    if record is None or not target.is_file() or record.get("bytes") != target.stat().st_size:
        return False
    if expected is not None and record.get("sha256") != expected:
        raise ChecksumMismatchError(
            f"Checksum mismatch for {target}: expected sha256 {expected}, but the cached file has "
            f"{record.get('sha256')}.",
            path=target,
            expected=expected,
            actual=str(record.get("sha256")),
            fix=f"Delete {target} to download it again, or check --data-url and --sha256.",
        )
    return True


# Extracting.


def _archive_kind(archive: Path) -> str:
    """Return "tar" or "zip" from the archive's suffix."""
    for suffix, kind in _ARCHIVE_KINDS.items():
        if archive.name.lower().endswith(suffix):
            return kind
    raise InputError(f"Cannot extract {archive}: unsupported archive type; supported are {', '.join(_ARCHIVE_KINDS)}.")


def _archive_stem(archive: Path) -> str:
    """Return the archive's name without its archive suffix (oxford-iiit-pet.tgz -> oxford-iiit-pet)."""
    for suffix in _ARCHIVE_KINDS:
        if archive.name.lower().endswith(suffix):
            return archive.name[: -len(suffix)]
    return archive.stem


def _archive_sha256(archive: Path) -> str:
    """Return the archive's sha256, from its download sidecar when that still matches its size."""
    record = _read_json(_suffixed(archive, ".json"))
    if record is not None and record.get("bytes") == archive.stat().st_size and record.get("sha256"):
        return str(record["sha256"])  # skips re-reading an 800 MB archive on every run
    return file_sha256(archive)


def _is_extracted(dest_dir: Path, digest: str) -> bool:
    """Say whether dest_dir holds a complete extraction of the archive with this digest."""
    record = _read_json(dest_dir / _EXTRACTED_MARKER)
    return record is not None and record.get("sha256") == digest


def _refuse_foreign_dir(dest_dir: Path) -> None:
    """Raise if dest_dir has content but no marker: it is not ours to replace."""
    if dest_dir.is_dir() and not (dest_dir / _EXTRACTED_MARKER).exists() and any(dest_dir.iterdir()):
        raise FileExistsError(
            f"Cannot extract into {dest_dir}: it already holds files that no finished extraction put there. "
            "Delete it or choose another folder."
        )


def _move_into_place(staging: Path, dest_dir: Path) -> None:
    """Rename staging to dest_dir, replacing an older extraction."""
    if not dest_dir.exists():
        staging.rename(dest_dir)
        return
    # Directories cannot be swapped in one rename: move the old one aside first, then delete it.
    retired = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.old-", dir=dest_dir.parent))
    dest_dir.rename(retired / dest_dir.name)
    staging.rename(dest_dir)
    shutil.rmtree(retired, ignore_errors=True)


class _Budget:
    """What an archive may still extract: each member is counted, with its size, before its data is read."""

    def __init__(self, archive: Path, limits: ArchiveLimits):
        self.archive, self.limits = archive, limits
        self.members = self.bytes = 0

    def add(self, name: str, size: int) -> None:
        """Count one member; raise ArchiveTooLargeError when it crosses a limit."""
        self.members += 1
        self.bytes += size
        if self.members > self.limits.max_members:
            crossed = f"it holds more than {self.limits.max_members:,} members"
            option, setting = "--max-archive-members", "data.max_archive_members"
        elif self.bytes > self.limits.max_bytes:
            crossed = f"its files add up to more than {self.limits.max_bytes:,} bytes (member {name!r} crosses it)"
            option, setting = "--max-archive-bytes", "data.max_archive_bytes"
        else:
            return
        raise ArchiveTooLargeError(
            f"Refusing to extract {self.archive}: {crossed}, the limit against zip and tar bombs. If you trust it, "
            f"raise {option} (recipe: {setting})."
        )


def _extract_tar(archive: Path, dest_dir: Path, budget: _Budget) -> None:
    """Extract a tar archive with the "data" filter, which refuses members that escape dest_dir, within budget."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("Safe tar extraction needs Python 3.11.4 or newer (tarfile extraction filters).")

    def checked(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
        safe = _strict_data_filter(member, dest_path)
        # extractall reads the members one header at a time and calls the filter on each before it reads the data
        # (CPython 3.12 Lib/tarfile.py, TarFile.extractall and _get_extract_tarinfo): a member past a limit is never
        # written, nor are any after it.
        budget.add(member.name, _tar_member_bytes(member))
        return safe

    try:
        with tarfile.open(archive) as tar:  # mode "r:*" detects the compression
            tar.extractall(dest_dir, filter=checked)
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(
            f"Refusing to extract {archive}: member {error.tarinfo.name!r} is unsafe ({error}). {_UNSAFE_FIX}"
        ) from error
    except (
        tarfile.ReadError,
        gzip.BadGzipFile,
        zlib.error,
        EOFError,
    ) as error:  # a truncated or corrupt file
        raise InputError(
            f"Cannot read {archive} as a tar archive ({error}); delete it and download it again."
        ) from error


def _tar_member_bytes(member: tarfile.TarInfo) -> int:
    """How large extracting a tar member can make its file: its size, or for a sparse one the end of its last region.

    TarFile.makefile copies `size` bytes, or for a sparse member writes each (offset, size) region of its map and then
    truncates to `size` (CPython 3.12 Lib/tarfile.py): a map reaching past `size` would write that much first.
    """
    if member.sparse is None:
        return member.size
    return max([member.size, *(offset + size for offset, size in member.sparse)])


def _strict_data_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    """Apply tarfile's "data" filter, also refusing absolute names, which it silently makes relative."""
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest_path)


def _extract_zip(archive: Path, dest_dir: Path, budget: _Budget) -> None:
    """Extract a zip archive after checking every member, so an unsafe one, or too many bytes, stop it before any
    write."""
    try:
        with zipfile.ZipFile(archive) as zip_file:
            members = zip_file.infolist()
            for info in members:
                _check_zip_member(archive, info)
                budget.add(info.filename, info.file_size)
            # Extracting a member never writes more than the file_size of its ZipInfo: ZipExtFile starts `_left` at
            # it and cuts each decompressed chunk to `data[:self._left]` (CPython 3.12 Lib/zipfile/__init__.py,
            # ZipExtFile.__init__ and _read1); a stream that holds more fails its CRC check. So the sum above bounds
            # what is written. The ZipInfo objects are passed, not names, so each written member is the one checked
            # (a name the archive repeats would otherwise resolve to its last entry every time).
            zip_file.extractall(dest_dir, members=members)
    except zipfile.BadZipFile as error:
        raise InputError(
            f"Cannot read {archive} as a zip archive ({error}); delete it and download it again."
        ) from error


def _check_zip_member(archive: Path, info: zipfile.ZipInfo) -> None:
    """Raise UnsafeArchiveError for an absolute name, a `..` component or a symlink."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        problem = "has an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = "has a '..' component that could point outside the destination"
    elif stat.S_ISLNK(info.external_attr >> 16):  # Unix mode bits live in the high 16 bits (zip APPNOTE 4.4.15)
        problem = "is a symbolic link"
    else:
        return
    raise UnsafeArchiveError(f"Refusing to extract {archive}: member {info.filename!r} {problem}. {_UNSAFE_FIX}")


_EXTRACTORS: dict[str, Callable[[Path, Path, _Budget], None]] = {"tar": _extract_tar, "zip": _extract_zip}


# Folders and small files.


def _dataset_subdirs(root: Path) -> list[Path]:
    """Return root's top-level folders, leaving out hidden ones and macOS resource forks."""
    return sorted(
        child
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and child.name not in _IGNORED_DIR_NAMES
    )


def _existing_dir(path: Path) -> Path:
    """Return path if it is an existing folder, else raise an error that names it."""
    if not path.exists():
        raise MissingInputError(f"Data folder {path} does not exist; pass an existing folder with --data-dir.")
    if not path.is_dir():
        raise NotAFolderError(f"Data folder {path} is not a folder; pass a folder of images with --data-dir.")
    return path


def _read_json(path: Path) -> dict | None:
    """Return a JSON object from path, or None when it is missing or unreadable (treated as not done)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_json(path: Path, record: dict) -> None:
    """Write a JSON object atomically, so a reader never sees half a file."""
    temporary = _suffixed(path, ".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
