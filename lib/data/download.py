"""Get the dataset: download an archive (resumable, checksummed), extract it safely, find the images folder.

The stages are idempotent: a finished download is recognised by its sidecar `<name>.json`, a finished
extraction by the `.extracted.json` marker inside it, and neither becomes visible before it is complete
(a `.part` file and a temporary sibling folder are renamed into place at the end).
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
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx
from filelock import FileLock
from tqdm.auto import tqdm

# fastai URLs.PETS, the archive fastbook chapter 5 downloads with untar_data.
PETS_URL = "https://s3.amazonaws.com/fast-ai-imageclas/oxford-iiit-pet.tgz"

_HTTP_SCHEMES = ("http", "https")
_ACCEPTED_SOURCES = "http://, https://, file:// or a path to an archive file"
_ARCHIVE_KINDS = {".tar.gz": "tar", ".tgz": "tar", ".tar": "tar", ".zip": "zip"}
_EXTRACTED_MARKER = ".extracted.json"
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Folders that are not part of a dataset: hidden ones and the resource forks macOS adds to zip files.
_IGNORED_DIR_NAMES = ("__MACOSX",)


class DownloadError(RuntimeError):
    """A download failed; `transient` says whether trying again later can succeed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ChecksumMismatchError(DownloadError):
    """A file's sha256 differs from the expected one; retrying the same download cannot fix it."""

    def __init__(self, message: str, *, path: Path | None = None, expected: str = "", actual: str = "") -> None:
        super().__init__(message, transient=False)
        self.path = path
        self.expected = expected
        self.actual = actual


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the destination folder or is a link."""


REDACTED = "<redacted>"


def redact_url(url: str | None) -> str | None:
    """Return the URL without what may be a secret: the password of its user info and its whole query string.

    Signed URLs (S3, GCS, Azure SAS) carry their credentials in the query, and `https://user:token@host/` in the user
    info. What stays (scheme, user, host, path) still says which archive a run used.
    """
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, host = netloc.rsplit("@", 1)
        user = user_info.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in user_info else f"{user}@{host}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def download_archive(
    url: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download url into cache_dir/downloads, resuming a partial transfer, and return the file's path.

    Args:
        url: An http(s):// or file:// URL, or a plain path to a local archive.
        cache_dir: Root of the cache; the file goes to `cache_dir/downloads/<name from the URL>`.
        sha256: Expected hex digest; a mismatch raises ChecksumMismatchError.
        progress: Show a progress bar.
        timeout: Seconds to wait to connect and for each read.
        chunk_size: Bytes per disk write and per read of a local source.

    Raises:
        DownloadError: The transfer failed; `transient` tells whether a retry can help.
        ChecksumMismatchError: The file does not have the expected sha256.
    """
    expected = _normalize_sha256(sha256)
    local_source = _local_source(url)
    target = Path(cache_dir) / "downloads" / _file_name(url, local_source)
    if _is_downloaded(target, expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = _suffixed(target, ".part")
    if local_source is None:
        _download_http(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
    else:
        _copy_local(local_source, part, progress=progress, chunk_size=chunk_size)
    return _finish_download(part, target, url=url, expected=expected)


def extract_archive(archive: Path, dest_dir: Path) -> Path:
    """Extract a .tgz, .tar.gz, .tar or .zip archive into dest_dir, once, and return dest_dir.

    Raises:
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
        extract(archive, staging)
        _write_json(staging / _EXTRACTED_MARKER, {"archive": archive.name, "sha256": digest})
        _move_into_place(staging, dest_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_dir


def fetch_dataset(url: str, cache_dir: Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """Download and extract the archive at url and return the extracted folder.

    Runs sharing a cache take turns per archive: the second one waits for the first, then finds the archive complete
    and extracted, so it is transferred once and nobody reads a half-written `.part` file or staging folder.
    """
    name = _file_name(url, _local_source(url))
    _archive_kind(Path(name))  # fail before a long download, not after it
    lock = Path(cache_dir) / "downloads" / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        archive = download_archive(url, cache_dir, sha256=sha256, progress=progress)
        return extract_archive(archive, Path(cache_dir) / "extracted" / _archive_stem(archive))


def cached_archive_digest(url: str, cache_dir: Path) -> str | None:
    """Return the sha256 of url's archive when it is downloaded and extracted in cache_dir, else None.

    Reads only the cache (no network I/O), so callers can key their own caches on what is really on disk.
    """
    try:
        archive = Path(cache_dir) / "downloads" / _file_name(url, _local_source(url))
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
    progress: bool = True,
) -> Path:
    """Return the images folder from either a local folder (used as is) or an archive URL to fetch.

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
    return find_images_dir(fetch_dataset(data_url, cache_dir, sha256=sha256, progress=progress))


# Sources and names.


def _local_source(url: str) -> Path | None:
    """Return the local file a file:// URL or plain path names, or None for an http(s) URL."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in _HTTP_SCHEMES:
        return None
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(f"Cannot read {redact_url(url)}: only local file:// URLs are supported (no host).")
        return Path(url2pathname(parsed.path))
    if scheme == "" or len(scheme) == 1:  # one letter is a Windows drive, as in C:\data\pets.tgz
        return Path(url).expanduser()
    raise DownloadError(f"Unsupported URL scheme {scheme!r} in {redact_url(url)}; use {_ACCEPTED_SOURCES}.")


def _file_name(url: str, local_source: Path | None) -> str:
    """Return the archive's file name: the last component of the URL's path, without the query."""
    name = local_source.name if local_source is not None else PurePosixPath(unquote(urlparse(url).path)).name
    if name in ("", ".", ".."):
        raise DownloadError(
            f"Cannot tell the archive's file name from {redact_url(url)}; the URL must end in a file name."
        )
    return name


def _normalize_sha256(sha256: str | None) -> str | None:
    """Return sha256 in lower case; reject anything but 64 hex digits before a download starts."""
    if sha256 is None:
        return None
    normalized = sha256.strip().lower()
    if not _SHA256_PATTERN.fullmatch(normalized):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}.")
    return normalized


def _suffixed(path: Path, suffix: str) -> Path:
    """Return path with suffix appended to its full name (a.tgz -> a.tgz.part)."""
    return path.with_name(path.name + suffix)


# Downloading.


def _is_downloaded(target: Path, expected: str | None) -> bool:
    """Say whether target is a finished download per its sidecar; raise if it has a different checksum."""
    record = _read_json(_suffixed(target, ".json"))
    if record is None or not target.is_file() or record.get("bytes") != target.stat().st_size:
        return False
    if expected is not None and record.get("sha256") != expected:
        raise ChecksumMismatchError(
            f"Checksum mismatch for {target}: expected sha256 {expected}, but the cached file has "
            f"{record.get('sha256')}. Delete {target} to download it again, "
            "or check --data-url and --sha256.",
            path=target,
            expected=expected,
            actual=str(record.get("sha256")),
        )
    return True


def _download_http(url: str, part: Path, *, progress: bool, timeout: float, chunk_size: int) -> None:
    """Stream url into part, asking the server for only the bytes that part does not hold yet."""
    offset = part.stat().st_size if part.exists() else 0
    # Identity encoding keeps the stored bytes equal to the served ones, which Range offsets count.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
            if response.status_code == httpx.codes.REQUESTED_RANGE_NOT_SATISFIABLE:
                _accept_complete_part(url, part, response, offset)
                return
            _raise_for_status(url, response)
            _write_body(url, response, part, offset=offset, progress=progress, chunk_size=chunk_size)
    except httpx.TransportError as error:
        raise DownloadError(f"Could not download {redact_url(url)}: {_describe(error)}", transient=True) from error
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise DownloadError(f"Could not download {redact_url(url)}: {_describe(error)}") from error


def _raise_for_status(url: str, response: httpx.Response) -> None:
    """Raise a DownloadError for any answer other than 200 or 206."""
    status = response.status_code
    if status in (httpx.codes.OK, httpx.codes.PARTIAL_CONTENT):
        return
    reason = f"HTTP {status} {response.reason_phrase}".strip()
    # Server errors, 408 Request Timeout and 429 Too Many Requests say "try later"; other 4xx will not change.
    if status >= 500 or status in (httpx.codes.REQUEST_TIMEOUT, httpx.codes.TOO_MANY_REQUESTS):
        raise DownloadError(f"Could not download {redact_url(url)}: the server answered {reason}.", transient=True)
    raise DownloadError(
        f"Could not download {redact_url(url)}: the server answered {reason}. "
        "Check --data-url, or use --data-dir to point at a folder of images you already have."
    )


def _accept_complete_part(url: str, part: Path, response: httpx.Response, offset: int) -> None:
    """Accept a 416 answer when part holds the whole file; otherwise drop part so a retry starts over."""
    if _content_range(response)[2] == offset:
        return  # a crash between the last byte and the rename left a complete .part
    part.unlink()
    raise DownloadError(
        f"Could not resume {redact_url(url)}: the server has no bytes from offset {offset} (HTTP 416). The partial "
        f"file {part} was deleted; try again to download from the start.",
        transient=True,
    )


def _write_body(
    url: str, response: httpx.Response, part: Path, *, offset: int, progress: bool, chunk_size: int
) -> None:
    """Append a 206 body to part, or replace part with a 200 body, raising if the body ends early."""
    if response.status_code == httpx.codes.PARTIAL_CONTENT:
        _check_resume_start(url, response, part, offset)
    else:
        offset = 0  # the server ignored Range and sends the whole file
    length = _content_length(response)
    total = None if length is None else offset + length
    received = 0
    # Unchunked reads: chunked ones hold back up to chunk_size bytes, which a cut-off would throw away.
    with (
        part.open("ab" if offset else "wb", buffering=chunk_size) as file,
        _progress_bar(part, total=total, initial=offset, enabled=progress) as bar,
    ):
        try:
            for data in response.iter_raw():
                file.write(data)
                received += len(data)
                bar.update(len(data))
        except httpx.TransportError as error:
            raise _cut_off_error(url, part, offset + received, total, error) from error
    if length is not None and received < length:
        raise _cut_off_error(url, part, offset + received, total, None)


def _check_resume_start(url: str, response: httpx.Response, part: Path, offset: int) -> None:
    """Raise, dropping part, if a 206 answer does not start where part ends."""
    start = _content_range(response)[0]
    if start == offset:
        return
    part.unlink()
    raise DownloadError(
        f"Could not resume {redact_url(url)}: asked for bytes from {offset}, the server sent them from {start}. "
        f"The partial file {part} was deleted; try again to download from the start.",
        transient=True,
    )


def _cut_off_error(url: str, part: Path, received: int, total: int | None, error: Exception | None) -> DownloadError:
    """Build the transient error for a transfer that ended early, keeping part for the next call."""
    cause = f" ({_describe(error)})" if error is not None else ""
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"Download of {redact_url(url)} was cut off after {received}{of_total} bytes{cause}. "
        f"The partial file {part} is kept; call again to resume from it.",
        transient=True,
    )


def _content_length(response: httpx.Response) -> int | None:
    """Return the body's length from Content-Length, or None when the server did not say."""
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _content_range(response: httpx.Response) -> tuple[int | None, int | None, int | None]:
    """Return (start, end, total) from a Content-Range header such as `bytes 100-199/200` or `bytes */200`."""
    match = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if match is None:
        return None, None, None
    start, end, total = (int(group) if group and group.isdigit() else None for group in match.groups())
    return start, end, total


def _describe(error: Exception) -> str:
    """Name an exception and its message, e.g. `ConnectError: [Errno 111] Connection refused`."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _copy_local(source: Path, part: Path, *, progress: bool, chunk_size: int) -> None:
    """Copy a local archive into part."""
    if not source.is_file():
        raise DownloadError(f"Cannot copy {source}: it does not exist or is not a file.")
    with (
        source.open("rb") as reader,
        part.open("wb") as writer,
        _progress_bar(part, total=source.stat().st_size, initial=0, enabled=progress) as bar,
    ):
        while chunk := reader.read(chunk_size):
            writer.write(chunk)
            bar.update(len(chunk))


def _progress_bar(part: Path, *, total: int | None, initial: int, enabled: bool) -> tqdm:
    """Return a byte-counting progress bar named after the file being written."""
    name = part.name.removesuffix(".part")
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=not enabled,
    )


def _finish_download(part: Path, target: Path, *, url: str, expected: str | None) -> Path:
    """Verify part, rename it to target and record the sidecar; a bad checksum deletes part."""
    actual = _sha256(part)
    if expected is not None and actual != expected:
        part.unlink()
        raise ChecksumMismatchError(
            f"Checksum mismatch for {target.name} downloaded from {redact_url(url)}: expected sha256 {expected}, "
            f"got {actual}. The download was discarded; check --data-url, or pass the right --sha256.",
            path=target,
            expected=expected,
            actual=actual,
        )
    part.replace(target)  # the rename is what makes the archive visible, so a partial one never is
    _write_json(_suffixed(target, ".json"), {"url": url, "bytes": target.stat().st_size, "sha256": actual})
    return target


# Extracting.


def _archive_kind(archive: Path) -> str:
    """Return "tar" or "zip" from the archive's suffix."""
    for suffix, kind in _ARCHIVE_KINDS.items():
        if archive.name.lower().endswith(suffix):
            return kind
    raise ValueError(f"Cannot extract {archive}: unsupported archive type; supported are {', '.join(_ARCHIVE_KINDS)}.")


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
    return _sha256(archive)


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


def _extract_tar(archive: Path, dest_dir: Path) -> None:
    """Extract a tar archive with the "data" filter, which refuses members that escape dest_dir."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("Safe tar extraction needs Python 3.11.4 or newer (tarfile extraction filters).")
    try:
        with tarfile.open(archive) as tar:  # mode "r:*" detects the compression
            tar.extractall(dest_dir, filter=_strict_data_filter)
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(
            f"Refusing to extract {archive}: member {error.tarinfo.name!r} is unsafe ({error})."
        ) from error
    except (
        tarfile.ReadError,
        gzip.BadGzipFile,
        zlib.error,
        EOFError,
    ) as error:  # a truncated or corrupt file
        raise ValueError(
            f"Cannot read {archive} as a tar archive ({error}); delete it and download it again."
        ) from error


def _strict_data_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    """Apply tarfile's "data" filter, also refusing absolute names, which it silently makes relative."""
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest_path)


def _extract_zip(archive: Path, dest_dir: Path) -> None:
    """Extract a zip archive after checking every member, so an unsafe one stops it before any write."""
    try:
        with zipfile.ZipFile(archive) as zip_file:
            for info in zip_file.infolist():
                _check_zip_member(archive, info)
            zip_file.extractall(dest_dir)
    except zipfile.BadZipFile as error:
        raise ValueError(
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
    raise UnsafeArchiveError(f"Refusing to extract {archive}: member {info.filename!r} {problem}.")


_EXTRACTORS: dict[str, Callable[[Path, Path], None]] = {"tar": _extract_tar, "zip": _extract_zip}


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
        raise FileNotFoundError(f"Data folder {path} does not exist; pass an existing folder with --data-dir.")
    if not path.is_dir():
        raise NotADirectoryError(f"Data folder {path} is not a folder; pass a folder of images with --data-dir.")
    return path


def _sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


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
