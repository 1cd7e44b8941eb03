"""Tests for lib/data/source.py and the downloader it shares with the weights (lib/common/download.py).

They run against a real HTTP server on 127.0.0.1, with archives made by the tests.
"""

import gzip
import hashlib
import io
import json
import pickle
import random
import shutil
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from lib.common.download import ChecksumMismatchError, DownloadError, download_file, file_name, redact_url
from lib.data.source import (
    ArchiveLimits,
    ArchiveTooLargeError,
    UnsafeArchiveError,
    cached_archive_digest,
    download_archive,
    extract_archive,
    fetch_dataset,
    find_images_dir,
    resolve_data_source,
)
from lib.recipe import Recipe
from tests.support.http_server import refused_port, serve_directory, silent_port

# Random bytes do not compress, so "cut off halfway" means halfway through the .tgz too.
_RANDOM = random.Random(5)
PET_FILES = {
    "oxford-iiit-pet/images/Abyssinian_1.jpg": _RANDOM.randbytes(30_000),
    "oxford-iiit-pet/images/yorkshire_terrier_2.jpg": _RANDOM.randbytes(30_000),
    "oxford-iiit-pet/annotations/trimaps/Abyssinian_1.png": _RANDOM.randbytes(2_000),
    "oxford-iiit-pet/annotations/list.txt": b"Abyssinian_1 1 1 1\n",
}


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    """Write a (gzipped, for .tgz) tar archive holding files."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".tgz") else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    """Write a zip archive holding files."""
    with zipfile.ZipFile(path, "w") as zip_file:
        for name, data in files.items():
            zip_file.writestr(name, data)
    return path


def tree(root: Path) -> dict[str, bytes]:
    """Return {relative path: bytes} for every file under root, leaving out the extraction marker."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.name != ".extracted.json"
    }


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def pets_archive(tmp_path: Path) -> Path:
    served = tmp_path / "served"
    served.mkdir()
    return make_tar(served / "oxford-iiit-pet.tgz", PET_FILES)


@pytest.fixture
def server(pets_archive: Path):
    with serve_directory(pets_archive.parent) as running:
        yield running


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# Downloading over HTTP.


@pytest.mark.parametrize("progress", [False, True])
def test_http_download_is_extracted_and_recorded(server, pets_archive, cache_dir, progress):
    extracted = fetch_dataset(server.url(pets_archive.name), cache_dir, progress=progress)

    assert extracted == cache_dir / "extracted" / "oxford-iiit-pet"
    assert tree(extracted) == PET_FILES
    archive = cache_dir / "downloads" / "oxford-iiit-pet.tgz"
    assert archive.read_bytes() == pets_archive.read_bytes()
    sidecar = json.loads((cache_dir / "downloads" / "oxford-iiit-pet.tgz.json").read_text())
    assert sidecar == {
        "url": server.url(pets_archive.name),
        "bytes": pets_archive.stat().st_size,
        "sha256": sha256_of(pets_archive.read_bytes()),
    }
    assert not (cache_dir / "downloads" / "oxford-iiit-pet.tgz.part").exists()


def test_second_call_does_no_network_io(server, pets_archive, cache_dir):
    url = server.url(pets_archive.name)
    first = download_archive(url, cache_dir, progress=False)
    requests_after_first = server.requests

    second = download_archive(url, cache_dir, sha256=sha256_of(pets_archive.read_bytes()), progress=False)
    fetch_dataset(url, cache_dir, progress=False)

    assert requests_after_first == 1
    assert server.requests == requests_after_first
    assert second == first


def test_interrupted_transfer_keeps_part_and_resumes_with_range(server, pets_archive, cache_dir):
    source = pets_archive.read_bytes()
    half = len(source) // 2
    server.cut_after = half  # the first response only
    part = cache_dir / "downloads" / "oxford-iiit-pet.tgz.part"

    with pytest.raises(DownloadError, match="resume") as caught:
        download_archive(server.url(pets_archive.name), cache_dir, progress=False)

    assert caught.value.transient is True
    assert part.read_bytes() == source[:half]
    assert not (cache_dir / "downloads" / "oxford-iiit-pet.tgz").exists()

    archive = download_archive(server.url(pets_archive.name), cache_dir, progress=False)

    assert server.range_headers == [None, f"bytes={half}-"]
    assert archive.read_bytes() == source
    assert not part.exists()


def test_resume_survives_a_server_that_ignores_range(server, pets_archive, cache_dir):
    server.cut_after = 1000
    with pytest.raises(DownloadError):
        download_archive(server.url(pets_archive.name), cache_dir, progress=False)
    server.ignore_range = True

    archive = download_archive(server.url(pets_archive.name), cache_dir, progress=False)

    assert server.range_headers == [None, "bytes=1000-"]
    assert archive.read_bytes() == pets_archive.read_bytes()


def test_repeated_cut_offs_make_progress_until_complete(server, pets_archive, cache_dir):
    size = pets_archive.stat().st_size
    server.cut_after, server.cut_every_request = size // 3 + 1, True
    url = server.url(pets_archive.name)

    for _ in range(2):
        with pytest.raises(DownloadError) as caught:
            download_archive(url, cache_dir, progress=False)
        assert caught.value.transient

    archive = download_archive(url, cache_dir, progress=False)

    assert archive.read_bytes() == pets_archive.read_bytes()
    assert server.requests == 3


def test_complete_part_left_by_a_crash_is_finished_without_refetching(server, pets_archive, cache_dir):
    part = cache_dir / "downloads" / "oxford-iiit-pet.tgz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(pets_archive.read_bytes())

    archive = download_archive(server.url(pets_archive.name), cache_dir, progress=False)

    assert server.range_headers == [f"bytes={pets_archive.stat().st_size}-"]  # answered 416
    assert archive.read_bytes() == pets_archive.read_bytes()


# Checksums.


def test_checksum_mismatch_discards_the_download(server, pets_archive, cache_dir):
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError) as caught:
        download_archive(server.url(pets_archive.name), cache_dir, sha256=wrong, progress=False)

    message = str(caught.value)
    assert caught.value.transient is False
    assert wrong in message and sha256_of(pets_archive.read_bytes()) in message
    assert "oxford-iiit-pet.tgz" in message and "--sha256" in message
    assert list((cache_dir / "downloads").iterdir()) == []


def test_correct_checksum_passes_in_any_case(server, pets_archive, cache_dir):
    digest = sha256_of(pets_archive.read_bytes())

    archive = download_archive(server.url(pets_archive.name), cache_dir, sha256=digest.upper(), progress=False)

    assert archive.read_bytes() == pets_archive.read_bytes()


def test_cached_file_with_another_checksum_raises_without_downloading(server, pets_archive, cache_dir):
    download_archive(server.url(pets_archive.name), cache_dir, progress=False)

    with pytest.raises(ChecksumMismatchError, match="Delete"):
        download_archive(server.url(pets_archive.name), cache_dir, sha256="a" * 64, progress=False)

    assert server.requests == 1


def test_malformed_checksum_is_rejected_before_any_request(server, pets_archive, cache_dir):
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download_archive(server.url(pets_archive.name), cache_dir, sha256="abc", progress=False)

    assert server.requests == 0


# Failures and their `transient` flag.


def test_404_is_permanent_and_names_url_and_status(server, cache_dir):
    url = server.url("missing.tgz")

    with pytest.raises(DownloadError) as caught:
        download_archive(url, cache_dir, progress=False)

    assert caught.value.transient is False
    assert url in str(caught.value) and "404" in str(caught.value) and "--data-dir" in str(caught.value)
    assert not (cache_dir / "downloads" / "missing.tgz.part").exists()


def test_server_error_is_transient(server, pets_archive, cache_dir):
    server.force_status = 503

    with pytest.raises(DownloadError, match="503") as caught:
        download_archive(server.url(pets_archive.name), cache_dir, progress=False)

    assert caught.value.transient is True


def test_connection_refused_is_transient(cache_dir):
    with refused_port() as port, pytest.raises(DownloadError) as caught:
        download_archive(f"http://127.0.0.1:{port}/pets.tgz", cache_dir, progress=False)

    assert caught.value.transient is True
    assert f"127.0.0.1:{port}/pets.tgz" in str(caught.value)


def test_read_timeout_is_transient(cache_dir):
    with silent_port() as port, pytest.raises(DownloadError, match="Timeout") as caught:
        download_archive(f"http://127.0.0.1:{port}/pets.tgz", cache_dir, progress=False, timeout=0.2)

    assert caught.value.transient is True


def test_unsupported_scheme_names_url_and_accepted_schemes(cache_dir):
    with pytest.raises(DownloadError) as caught:
        download_archive("ftp://example.org/pets.tgz", cache_dir, progress=False)

    assert caught.value.transient is False
    assert "ftp://example.org/pets.tgz" in str(caught.value) and "https://" in str(caught.value)


def test_download_errors_survive_pickling():
    # Prefect serialises a failed task's exception; the retry decision needs `transient` afterwards.
    error = pickle.loads(pickle.dumps(DownloadError("cut off.", transient=True, fix="Run again.")))
    mismatch = pickle.loads(pickle.dumps(ChecksumMismatchError("bad", path=Path("a.tgz"), expected="e", actual="a")))

    assert error.transient is True and str(error) == "cut off. Run again."
    assert error.reason == "cut off." and error.fix == "Run again."
    assert mismatch.transient is False and mismatch.expected == "e" and mismatch.path == Path("a.tgz")


def test_download_file_checks_a_sha256_prefix_and_rejects_a_malformed_one_before_any_request(server, pets_archive):
    digest = sha256_of(pets_archive.read_bytes())
    target = pets_archive.parent.parent / "fetched" / "pets.tgz"

    with pytest.raises(ValueError, match="1 to 64 hexadecimal"):
        download_file(server.url(pets_archive.name), target, sha256="not-hex", progress=False)
    assert server.requests == 0

    assert download_file(server.url(pets_archive.name), target, sha256=digest[:8].upper(), progress=False) == digest
    assert target.read_bytes() == pets_archive.read_bytes()
    assert sorted(path.name for path in target.parent.iterdir()) == ["pets.tgz"]  # no .part, no sidecar


def test_file_name_is_the_last_path_component_without_the_query():
    assert file_name("https://download.pytorch.org/models/resnet18-f37072fd.pth?sig=x") == "resnet18-f37072fd.pth"
    assert file_name("file:///data/oxford-iiit-pet.tgz") == "oxford-iiit-pet.tgz"
    assert file_name("/data/pets%20v2.tgz") == "pets%20v2.tgz"  # a plain path is taken as written
    assert file_name("https://host.example/a%20b.tgz") == "a b.tgz"
    with pytest.raises(DownloadError, match="must end in a file name"):
        file_name("https://host.example/")


# Local sources.


@pytest.mark.parametrize("as_url", [True, False], ids=["file-url", "plain-path"])
def test_local_archive_is_copied(pets_archive, cache_dir, as_url):
    source = pets_archive.as_uri() if as_url else str(pets_archive)

    archive = download_archive(source, cache_dir, progress=False)

    assert archive == cache_dir / "downloads" / "oxford-iiit-pet.tgz"
    assert archive.read_bytes() == pets_archive.read_bytes()
    assert json.loads((archive.parent / "oxford-iiit-pet.tgz.json").read_text())["url"] == source


def test_missing_local_archive_is_a_permanent_error(tmp_path, cache_dir):
    with pytest.raises(DownloadError, match="does not exist") as caught:
        download_archive((tmp_path / "nope.tgz").as_uri(), cache_dir, progress=False)

    assert caught.value.transient is False


# Extraction.


def _link_member(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _unsafe_tar_members(outside: Path) -> dict[str, tarfile.TarInfo]:
    return {
        "dot-dot": tarfile.TarInfo("../evil"),
        "absolute": tarfile.TarInfo(str(outside / "evil")),
        "symlink-out": _link_member("link", str(outside)),
        "relative-symlink-out": _link_member("data/link", "../../outside"),
    }


@pytest.mark.parametrize("case", ["dot-dot", "absolute", "symlink-out", "relative-symlink-out"])
def test_unsafe_tar_is_refused_and_writes_nothing_outside(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    member = _unsafe_tar_members(outside)[case]
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(member, io.BytesIO(b"") if member.isfile() else None)
    before = sorted(tmp_path.rglob("*"))
    dest = tmp_path / "out" / "bad"

    with pytest.raises(UnsafeArchiveError) as caught:
        extract_archive(archive, dest)

    assert "bad.tar" in str(caught.value) and member.name in str(caught.value)
    assert sorted(tmp_path.rglob("*")) == sorted([*before, tmp_path / "out"])  # only the empty parent is new
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "ok/../../evil", "link"])
def test_unsafe_zip_is_refused_before_extracting_anything(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zip_file:
        zip_file.writestr("fine.txt", b"written before the bad member if checks came late")
        info = zipfile.ZipInfo(name)
        if name == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zip_file.writestr(info, b"/etc/passwd" if name == "link" else b"evil")
    dest = tmp_path / "out" / "bad"

    with pytest.raises(UnsafeArchiveError) as caught:
        extract_archive(archive, dest)

    assert "bad.zip" in str(caught.value) and name in str(caught.value)
    assert not dest.exists() and not (tmp_path / "evil").exists()


def test_zip_is_extracted(tmp_path):
    archive = make_zip(tmp_path / "pets.zip", PET_FILES)

    dest = extract_archive(archive, tmp_path / "out")

    assert tree(dest) == PET_FILES


def test_plain_tar_is_extracted(tmp_path):
    archive = make_tar(tmp_path / "pets.tar", PET_FILES)

    assert tree(extract_archive(archive, tmp_path / "out")) == PET_FILES


def test_unknown_suffix_lists_supported_ones(tmp_path):
    archive = tmp_path / "pets.rar"
    archive.write_bytes(b"not an archive")

    with pytest.raises(ValueError, match=r"\.tgz.*\.zip"):
        extract_archive(archive, tmp_path / "out")


def test_unknown_suffix_fails_before_downloading(server, cache_dir):
    with pytest.raises(ValueError, match="pets.rar"):
        fetch_dataset(server.url("pets.rar"), cache_dir, progress=False)

    assert server.requests == 0


def test_second_extraction_is_a_no_op(tmp_path):
    archive = make_tar(tmp_path / "pets.tgz", PET_FILES)
    dest = extract_archive(archive, tmp_path / "out")
    (dest / "oxford-iiit-pet" / "annotations" / "list.txt").unlink()

    assert extract_archive(archive, tmp_path / "out") == dest

    assert not (dest / "oxford-iiit-pet" / "annotations" / "list.txt").exists()
    assert json.loads((dest / ".extracted.json").read_text())["sha256"] == sha256_of(archive.read_bytes())


def test_truncated_archive_leaves_no_half_extracted_folder(tmp_path):
    whole = make_tar(tmp_path / "whole.tgz", PET_FILES).read_bytes()
    truncated = tmp_path / "pets.tgz"
    truncated.write_bytes(whole[: len(whole) * 3 // 4])  # the first members extract, then the stream ends
    dest = tmp_path / "out" / "pets"

    with pytest.raises(ValueError, match="Cannot read"):
        extract_archive(truncated, dest)

    assert list((tmp_path / "out").iterdir()) == []
    truncated.write_bytes(whole)
    assert tree(extract_archive(truncated, dest)) == PET_FILES


def test_a_different_archive_replaces_an_earlier_extraction(tmp_path):
    archive = make_tar(tmp_path / "pets.tgz", {"a.txt": b"old"})
    dest = extract_archive(archive, tmp_path / "out")
    make_tar(archive, {"b.txt": b"new"})

    extract_archive(archive, dest)

    assert tree(dest) == {"b.txt": b"new"}
    assert sorted(path.name for path in (tmp_path / "out").parent.iterdir()) == ["out", "pets.tgz"]


def test_folder_not_made_by_an_extraction_is_not_overwritten(tmp_path):
    archive = make_tar(tmp_path / "pets.tgz", {"a.txt": b"x"})
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep")

    with pytest.raises(FileExistsError, match="mine"):
        extract_archive(archive, dest)

    assert (dest / "precious.txt").read_text() == "keep"


# Limits: zip and tar bombs.
GIB = 1 << 30


def zeros_tgz(path: Path, name: str, size: int, *, chunk: int = 1 << 20) -> Path:
    """A .tgz holding one member of `size` zero bytes, written without ever holding or writing `size` bytes.

    A gzip file may be several gzip members back to back, read as one stream (RFC 1952 section 2.2; Python's gzip
    module reads them all), so the member's data is one compressed chunk of zeros (about 1 kB per MiB) repeated.
    """
    assert size % chunk == 0
    info = tarfile.TarInfo(name)
    info.size = size
    zeros = gzip.compress(bytes(chunk))
    with path.open("wb") as out:
        out.write(gzip.compress(info.tobuf()))
        for _ in range(size // chunk):
            out.write(zeros)
        out.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE)))  # the end-of-archive blocks
    return path


def assert_refused_leaving_nothing(archive: Path, dest: Path, match: str, **limits) -> str:
    with pytest.raises(ArchiveTooLargeError, match=match) as caught:
        extract_archive(archive, dest, **limits)
    message = str(caught.value)
    assert "\n" not in message and archive.name in message
    assert list(dest.parent.iterdir()) == []  # no staging folder, no partial destination
    return message


def test_a_tar_bomb_is_refused_from_its_header_before_its_data_is_read(tmp_path):
    bomb = zeros_tgz(tmp_path / "bomb.tgz", "zeros.bin", 2 * GIB)
    assert bomb.stat().st_size < 3_000_000
    with tarfile.open(bomb) as tar:  # a real archive: its member says 2 GiB
        assert tar.next().size == 2 * GIB
    (tmp_path / "out").mkdir()

    started = time.monotonic()
    message = assert_refused_leaving_nothing(
        bomb,
        tmp_path / "out" / "bomb",
        r"more than 1,073,741,824 bytes \(member 'zeros.bin'",
        limits=ArchiveLimits(max_bytes=GIB),
    )

    assert time.monotonic() - started < 10  # extracting it takes ~25 s: the header alone decided
    assert message.endswith("raise --max-archive-bytes (recipe: data.max_archive_bytes).")


@pytest.mark.parametrize("name", ["big.tgz", "big.zip"])
def test_members_adding_up_past_the_byte_limit_are_refused(tmp_path, name):
    files = {"a.bin": bytes(600_000), "b.bin": bytes(600_000)}
    archive = (make_zip if name.endswith(".zip") else make_tar)(tmp_path / name, files)
    (tmp_path / "out").mkdir()

    assert_refused_leaving_nothing(
        archive,
        tmp_path / "out" / "big",
        r"more than 1,000,000 bytes \(member 'b.bin'",
        limits=ArchiveLimits(max_bytes=1_000_000),
    )


@pytest.mark.parametrize("name", ["many.tar", "many.zip"])
def test_an_archive_with_more_members_than_the_limit_is_refused(tmp_path, name):
    files = {f"images/cat_{index}.jpg": b"x" for index in range(21)}
    archive = (make_zip if name.endswith(".zip") else make_tar)(tmp_path / name, files)
    (tmp_path / "out").mkdir()

    message = assert_refused_leaving_nothing(
        archive, tmp_path / "out" / "many", "more than 20 members", limits=ArchiveLimits(max_members=20)
    )

    assert message.endswith("raise --max-archive-members (recipe: data.max_archive_members).")


@pytest.mark.parametrize("name", ["pets.tgz", "pets.zip"])
def test_an_archive_exactly_at_both_limits_is_extracted(tmp_path, name):
    archive = (make_zip if name.endswith(".zip") else make_tar)(tmp_path / name, PET_FILES)
    total = sum(len(data) for data in PET_FILES.values())

    dest = extract_archive(archive, tmp_path / "out", limits=ArchiveLimits(total, len(PET_FILES)))

    assert tree(dest) == PET_FILES


def test_the_recipe_limits_reach_the_extraction_through_resolve_data_source(tmp_path, cache_dir):
    archive = make_tar(tmp_path / "pets.tgz", PET_FILES)
    data = Recipe().updated({"max_archive_members": len(PET_FILES) - 1}).data

    with pytest.raises(ArchiveTooLargeError, match=f"more than {len(PET_FILES) - 1} members"):
        limits = ArchiveLimits(data.max_archive_bytes, data.max_archive_members)
        resolve_data_source(data_url=str(archive), data_dir=None, cache_dir=cache_dir, limits=limits)

    assert list((cache_dir / "extracted").iterdir()) == []


# Finding the images.


def _touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def test_find_images_dir_picks_images_not_trimaps_in_the_pet_layout(tmp_path):
    _touch(tmp_path, *PET_FILES)

    assert find_images_dir(tmp_path) == tmp_path / "oxford-iiit-pet" / "images"


def test_find_images_dir_alternatives(tmp_path):
    direct = _touch(tmp_path / "direct", "images/a.jpg", "annotations/a.png")
    single = _touch(tmp_path / "single", "photos/a.jpg", ".hidden/x", "__MACOSX/photos/._a.jpg")
    several = _touch(tmp_path / "several", "cats/a.jpg", "dogs/b.jpg")

    assert find_images_dir(direct) == direct / "images"
    assert find_images_dir(single) == single / "photos"
    assert find_images_dir(several) == several


def test_resolve_data_dir_is_used_as_is(tmp_path, cache_dir):
    flat = _touch(tmp_path / "flat", "Abyssinian_1.jpg", "beagle_2.jpg")
    pets = _touch(tmp_path / "pets", *PET_FILES)

    assert resolve_data_source(data_url=None, data_dir=flat, cache_dir=cache_dir) == flat
    assert resolve_data_source(data_url=None, data_dir=pets, cache_dir=cache_dir) == pets / "oxford-iiit-pet" / "images"
    assert not cache_dir.exists()


def test_resolve_data_url_downloads_and_finds_images(server, pets_archive, cache_dir):
    images = resolve_data_source(
        data_url=server.url(pets_archive.name), data_dir=None, cache_dir=cache_dir, progress=False
    )

    assert images == cache_dir / "extracted" / "oxford-iiit-pet" / "oxford-iiit-pet" / "images"
    assert sorted(path.name for path in images.iterdir()) == ["Abyssinian_1.jpg", "yorkshire_terrier_2.jpg"]


@pytest.mark.parametrize("both", [True, False], ids=["both", "neither"])
def test_resolve_needs_exactly_one_source(tmp_path, cache_dir, both):
    with pytest.raises(ValueError, match="data_url.*data_dir"):
        resolve_data_source(
            data_url="http://127.0.0.1:9/pets.tgz" if both else None,
            data_dir=tmp_path if both else None,
            cache_dir=cache_dir,
        )


def test_resolve_missing_or_non_folder_data_dir_names_the_path(tmp_path, cache_dir):
    missing = tmp_path / "no-such-folder"
    a_file = _touch(tmp_path, "a.jpg") / "a.jpg"

    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        resolve_data_source(data_url=None, data_dir=missing, cache_dir=cache_dir)
    with pytest.raises(NotADirectoryError, match="a.jpg"):
        resolve_data_source(data_url=None, data_dir=a_file, cache_dir=cache_dir)


def test_cached_archive_digest_reads_only_the_cache(tmp_path):
    (tmp_path / "src").mkdir()
    archive = make_tar(tmp_path / "src" / "pets.tgz", PET_FILES)
    url = archive.as_uri()
    cache = tmp_path / "cache"
    assert cached_archive_digest(url, cache) is None

    fetch_dataset(url, cache, progress=False)
    assert cached_archive_digest(url, cache) == hashlib.sha256(archive.read_bytes()).hexdigest()

    shutil.rmtree(cache / "extracted")  # a deleted extraction is not a cache hit
    assert cached_archive_digest(url, cache) is None
    assert cached_archive_digest("ftp://host/x.tgz", cache) is None


def test_urls_are_redacted_of_passwords_and_query_strings_before_they_are_logged():
    assert redact_url("https://s3.amazonaws.com/b/pets.tgz?X-Amz-Signature=abc&X-Amz-Credential=k") == (
        "https://s3.amazonaws.com/b/pets.tgz?<redacted>"
    )
    assert redact_url("https://me:tok3n@host.example/pets.tgz") == "https://me:<redacted>@host.example/pets.tgz"
    assert redact_url("https://me@host.example/pets.tgz#x") == "https://me@host.example/pets.tgz"
    assert redact_url("file:///data/pets.tgz") == "file:///data/pets.tgz" and redact_url(None) is None
    # An absolute sqlite path keeps its four slashes (urlunsplit would print sqlite://tmp/...).
    assert redact_url("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert redact_url("sqlite:///mlflow.db?mode=ro") == "sqlite:///mlflow.db?<redacted>"
    assert redact_url("/data/pets.tgz") == "/data/pets.tgz"


def test_two_runs_sharing_a_cache_fetch_the_archive_once_and_both_see_it_whole(server, pets_archive, cache_dir):
    from concurrent.futures import ThreadPoolExecutor

    server.delay_seconds = 0.5  # both runs ask while the first transfer is still pending
    url = server.url(pets_archive.name)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: fetch_dataset(url, cache_dir, progress=False), range(2)))
    assert results[0] == results[1]
    assert server.requests == 1  # the second waited for the first, then found the archive complete
    assert tree(results[0]) == PET_FILES
    assert not list((cache_dir / "downloads").glob("*.part"))


def test_download_errors_never_print_a_token_from_the_url(server, cache_dir):
    url = server.url("missing.tgz") + "?X-Amz-Signature=s3cr3t"

    with pytest.raises(DownloadError) as caught:
        download_archive(url, cache_dir, progress=False)

    assert "s3cr3t" not in str(caught.value) and server.url("missing.tgz") + "?<redacted>" in str(caught.value)
