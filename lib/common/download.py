"""Fetch one file over HTTP(S) or from a local path: resumable, timed out, checksummed, never half visible.

Both stages download through `download_file`: the data stage its archive, the training stage torchvision's
checkpoints. A transfer is written to `<target>.part`, continued with an HTTP Range request after a cut-off, checked
against a sha256 (or the leading digits of one) and only then renamed to `<target>`.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse, urlsplit
from urllib.request import url2pathname

import httpx
from filelock import FileLock

from lib.common.errors import InputError, UserError
from lib.common.progress import progress_bar

REDACTED = "<redacted>"
_PART_SUFFIX = ".part"

_HTTP_SCHEMES = ("http", "https")
_ACCEPTED_SOURCES = "http://, https://, file:// or a path to a file"
_SHA256_PREFIX_PATTERN = re.compile(r"[0-9a-f]{1,64}")
_SHA256_LENGTH = 64


class DownloadError(UserError, RuntimeError):
    """A download failed: `reason` says what happened, `fix` what to do about it, `transient` whether retrying can help.

    The message is the reason followed by the fix, so a caller that gives its own advice can reuse just the reason.
    """

    def __init__(self, reason: str, *, transient: bool = False, fix: str = "") -> None:
        super().__init__(f"{reason} {fix}" if fix else reason)
        self.reason = reason
        self.fix = fix
        self.transient = transient


class ChecksumMismatchError(DownloadError):
    """A file's sha256 differs from the expected one; retrying the same download cannot fix it."""

    def __init__(
        self, reason: str, *, path: Path | None = None, expected: str = "", actual: str = "", fix: str = ""
    ) -> None:
        super().__init__(reason, transient=False, fix=fix)
        self.path = path
        self.expected = expected
        self.actual = actual


def redact_url(url: str | None) -> str | None:
    """Return the URL without what may be a secret: the password of its user info and its whole query string.

    Signed URLs (S3, GCS, Azure SAS) carry their credentials in the query, and `https://user:token@host/` in the user
    info. What stays (scheme, user, host, path) still says which file was fetched.
    """
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, host = netloc.rsplit("@", 1)
        user = user_info.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in user_info else f"{user}@{host}"
    query = f"?{REDACTED}" if parts.query else ""
    # Rebuilt by hand: urlunsplit drops the empty authority of sqlite:////abs/path.db and prints sqlite://abs/...
    scheme = f"{parts.scheme}:" if parts.scheme else ""
    authority = f"//{netloc}" if url[len(scheme) :].startswith("//") else ""
    return f"{scheme}{authority}{parts.path}{query}"


def file_name(url: str) -> str:
    """Return the file name a URL or path ends in, without the query (…/oxford-iiit-pet.tgz?x=1 -> oxford-iiit-pet.tgz).

    Raises:
        DownloadError: The scheme is not supported, or the URL does not end in a file name.
    """
    local_source = _local_source(url)
    name = local_source.name if local_source is not None else PurePosixPath(unquote(urlparse(url).path)).name
    if name in ("", ".", ".."):
        raise DownloadError(f"Cannot tell the file name from {redact_url(url)}; the URL must end in a file name.")
    return name


def download_lock(target: Path) -> FileLock:
    """Return the lock that makes processes and threads downloading the same target take turns.

    Hold it around "is target there yet? if not, download_file": the second caller then waits, finds the file and
    reads no half-written `.part` file. The lock file is `.<target name>.lock` beside target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(target.with_name(f".{target.name}.lock"))


def download_file(
    url: str,
    target: Path,
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    fix: str = "",
) -> str:
    """Download url to target, resuming from `<target>.part`, and return the file's sha256 hex digest.

    It always transfers: deciding whether target is already good is the caller's (see download_lock).

    Args:
        url: An http(s):// or file:// URL, or a plain path to a local file.
        target: Final path; the `.part` file beside it is renamed onto it only once complete and verified.
        sha256: Expected hex digest, or its first digits: torchvision names checkpoints with a sha256 prefix
            (resnet50-11ad3fa6.pth) and torch.hub's check_hash compares only that prefix (torch/hub.py).
        progress: Show a progress bar: on a terminal (None), always (True) or never (False).
        timeout: Seconds to wait to connect and for each read (torch.hub's download_url_to_file has none).
        chunk_size: Bytes per disk write and per read of a local source.
        fix: What the user can do when the download fails, appended to every error's message.

    Raises:
        DownloadError: The transfer failed; `transient` tells whether a retry can help. A cut-off keeps the `.part`
            file for the next call to resume from.
        ChecksumMismatchError: The file's sha256 is not the expected one; the `.part` file is deleted.
        ValueError: sha256 is not 1 to 64 hexadecimal digits (checked before any request).
    """
    expected = _normalize_sha256(sha256)
    target = Path(target)
    transfer = _Transfer(
        url=url,
        part=target.with_name(target.name + _PART_SUFFIX),
        progress=progress,
        timeout=timeout,
        chunk_size=chunk_size,
        fix=fix,
    )
    local_source = _local_source(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    if local_source is None:
        _download_http(transfer)
    else:
        _copy_local(local_source, transfer)
    actual = file_sha256(transfer.part)
    if expected is not None and not actual.startswith(expected):
        transfer.part.unlink()
        promised = f"sha256 {expected}" if len(expected) == _SHA256_LENGTH else f"a sha256 starting with {expected}"
        raise ChecksumMismatchError(
            f"Checksum mismatch for {target.name} downloaded from {redact_url(url)}: expected {promised}, "
            f"got {actual}. The download was discarded.",
            path=target,
            expected=expected,
            actual=actual,
            fix=fix,
        )
    transfer.part.replace(target)  # the rename is what makes the file visible, so a partial one never is
    return actual


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@dataclass(frozen=True)
class _Transfer:
    """One call's download: where it comes from, where it goes, and how errors end."""

    url: str
    part: Path
    progress: bool | None
    timeout: float
    chunk_size: int
    fix: str

    def error(self, reason: str, *, transient: bool = False) -> DownloadError:
        """Return a DownloadError that ends with the caller's fix."""
        return DownloadError(reason, transient=transient, fix=self.fix)


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


def _normalize_sha256(sha256: str | None) -> str | None:
    """Return the expected digest (or prefix) in lower case; reject anything but 1 to 64 hex digits."""
    if sha256 is None:
        return None
    normalized = sha256.strip().lower()
    if not _SHA256_PREFIX_PATTERN.fullmatch(normalized):
        raise InputError(f"An expected sha256 must be 1 to 64 hexadecimal digits, got {sha256!r}.")
    return normalized


def _download_http(transfer: _Transfer) -> None:
    """Stream the URL into the part file, asking the server for only the bytes that it does not hold yet."""
    url, part = transfer.url, transfer.part
    offset = part.stat().st_size if part.exists() else 0
    # Identity encoding keeps the stored bytes equal to the served ones, which Range offsets count.
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        with httpx.stream("GET", url, headers=headers, timeout=transfer.timeout, follow_redirects=True) as response:
            if response.status_code == httpx.codes.REQUESTED_RANGE_NOT_SATISFIABLE:
                _accept_complete_part(transfer, response, offset)
                return
            _raise_for_status(transfer, response)
            _write_body(transfer, response, offset)
    except httpx.TransportError as error:
        raise transfer.error(f"Could not download {redact_url(url)}: {_describe(error)}.", transient=True) from error
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise transfer.error(f"Could not download {redact_url(url)}: {_describe(error)}.") from error


def _raise_for_status(transfer: _Transfer, response: httpx.Response) -> None:
    """Raise a DownloadError for any answer other than 200 or 206."""
    status = response.status_code
    if status in (httpx.codes.OK, httpx.codes.PARTIAL_CONTENT):
        return
    answer = f"HTTP {status} {response.reason_phrase}".strip()
    # Server errors, 408 Request Timeout and 429 Too Many Requests say "try later"; other 4xx will not change.
    transient = status >= 500 or status in (httpx.codes.REQUEST_TIMEOUT, httpx.codes.TOO_MANY_REQUESTS)
    raise transfer.error(
        f"Could not download {redact_url(transfer.url)}: the server answered {answer}.", transient=transient
    )


def _accept_complete_part(transfer: _Transfer, response: httpx.Response, offset: int) -> None:
    """Accept a 416 answer when the part file holds the whole file; otherwise drop it so a retry starts over."""
    if _content_range(response)[2] == offset:
        return  # a crash between the last byte and the rename left a complete .part
    transfer.part.unlink()
    raise transfer.error(
        f"Could not resume {redact_url(transfer.url)}: the server has no bytes from offset {offset} (HTTP 416). "
        f"The partial file {transfer.part} was deleted; the next download starts from the beginning.",
        transient=True,
    )


def _write_body(transfer: _Transfer, response: httpx.Response, offset: int) -> None:
    """Append a 206 body to the part file, or replace it with a 200 body, raising if the body ends early."""
    if response.status_code == httpx.codes.PARTIAL_CONTENT:
        _check_resume_start(transfer, response, offset)
    else:
        offset = 0  # the server ignored Range and sends the whole file
    length = _content_length(response)
    total = None if length is None else offset + length
    received = 0
    # Unchunked reads: chunked ones hold back up to chunk_size bytes, which a cut-off would throw away.
    with (
        transfer.part.open("ab" if offset else "wb", buffering=transfer.chunk_size) as file,
        _progress_bar(transfer, total=total, initial=offset) as bar,
    ):
        try:
            for data in response.iter_raw():
                file.write(data)
                received += len(data)
                bar.update(len(data))
        except httpx.TransportError as error:
            raise _cut_off_error(transfer, offset + received, total, error) from error
    if length is not None and received < length:
        raise _cut_off_error(transfer, offset + received, total, None)


def _check_resume_start(transfer: _Transfer, response: httpx.Response, offset: int) -> None:
    """Raise, dropping the part file, if a 206 answer does not start where the part file ends."""
    start = _content_range(response)[0]
    if start == offset:
        return
    transfer.part.unlink()
    raise transfer.error(
        f"Could not resume {redact_url(transfer.url)}: asked for bytes from {offset}, the server sent them from "
        f"{start}. The partial file {transfer.part} was deleted; the next download starts from the beginning.",
        transient=True,
    )


def _cut_off_error(transfer: _Transfer, received: int, total: int | None, error: Exception | None) -> DownloadError:
    """Build the transient error for a transfer that ended early, keeping the part file for the next call."""
    cause = f" ({_describe(error)})" if error is not None else ""
    of_total = f" of {total}" if total is not None else ""
    return transfer.error(
        f"Download of {redact_url(transfer.url)} was cut off after {received}{of_total} bytes{cause}. "
        f"The partial file {transfer.part} is kept; the next download resumes from it.",
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


def _copy_local(source: Path, transfer: _Transfer) -> None:
    """Copy a local file into the part file."""
    if not source.is_file():
        raise transfer.error(f"Cannot copy {source}: it does not exist or is not a file.")
    with (
        source.open("rb") as reader,
        transfer.part.open("wb") as writer,
        _progress_bar(transfer, total=source.stat().st_size, initial=0) as bar,
    ):
        while chunk := reader.read(transfer.chunk_size):
            writer.write(chunk)
            bar.update(len(chunk))


def _progress_bar(transfer: _Transfer, *, total: int | None, initial: int):
    """Return a byte-counting progress bar named after the file being written."""
    return progress_bar(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=transfer.part.name.removesuffix(_PART_SUFFIX),
        show=transfer.progress,
    )
