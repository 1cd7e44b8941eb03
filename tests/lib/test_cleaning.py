"""Tests for lib.data.cleaning: every failure gets its reason, conversions are kept, originals are untouched."""

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.data.cleaning import KEPT_COLUMNS, REASONS, CleaningResult, clean_images, write_cleaning_report
from lib.data.synthetic import BROKEN_FILES, ODD_MODES, make_pets_dataset, odd_mode_files

IMAGES_PER_BREED = 5
MAX_PIXELS = 1_000_000  # synthetic pictures are at most 320x320; the too-large one is 2000x2000
TOO_LARGE = "american_bulldog_901.jpg"
ROTATED = "american_bulldog_902.jpg"
A_DIRECTORY = "american_bulldog_903.jpg"
EXPECTED_REASONS = {**BROKEN_FILES, TOO_LARGE: "too_large", A_DIRECTORY: "unreadable"}


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    """Two breeds with broken and odd files, plus an oversized PNG, an EXIF-rotated JPEG and a directory."""
    images = make_pets_dataset(
        tmp_path_factory.mktemp("pets"),
        breeds=2,
        images_per_breed=IMAGES_PER_BREED,
        broken=True,
        odd_modes=True,
    )
    Image.new("1", (2000, 2000)).save(images / TOO_LARGE, "PNG")  # 4 M pixels, a few hundred bytes on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (40, 20), (200, 30, 30)).save(images / ROTATED, "JPEG", exif=exif)
    (images / A_DIRECTORY).mkdir()  # reading it fails with IsADirectoryError, whatever the user's rights
    return images


def _manifest(paths: list[Path], *, shuffle_seed: int | None = None) -> pd.DataFrame:
    """Build a manifest with an extra column and an index that does not start at 0."""
    if shuffle_seed is not None:
        paths = [paths[i] for i in np.random.default_rng(shuffle_seed).permutation(len(paths))]
    return pd.DataFrame(
        {
            "path": [str(path) for path in paths],
            "label": [path.name.rsplit("_", 1)[0] for path in paths],
            "source": "synthetic",
        },
        index=range(100, 100 + len(paths)),
    )


@pytest.fixture(scope="module")
def manifest(images_dir) -> pd.DataFrame:
    return _manifest(sorted(images_dir.iterdir()), shuffle_seed=0)


@pytest.fixture(scope="module")
def result(manifest) -> CleaningResult:
    return clean_images(manifest, max_pixels=MAX_PIXELS, progress=False)


def _names(frame: pd.DataFrame) -> list[str]:
    return [Path(path).name for path in frame["path"]]


def _row(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame.loc[[Path(path).name == name for path in frame["path"]]].iloc[0]


def test_each_broken_file_is_excluded_with_its_reason(result):
    assert dict(zip(_names(result.excluded), result.excluded["reason"], strict=True)) == EXPECTED_REASONS
    assert set(result.excluded["reason"]) <= set(REASONS)


def test_counts_give_totals_and_each_reason_present(result, manifest):
    assert result.counts() == {
        "kept": len(manifest) - 5,
        "excluded": 5,
        "empty": 1,
        "not_image": 1,
        "truncated": 1,
        "too_large": 1,
        "unreadable": 1,
    }


def test_details_carry_the_error_message(result):
    detail = dict(zip(_names(result.excluded), result.excluded["detail"], strict=True))
    assert "zero bytes" in detail["Abyssinian_9001.jpg"]
    assert detail["Abyssinian_9002.jpg"].startswith("cannot identify image file")
    assert "Abyssinian_9002.jpg" in detail["Abyssinian_9002.jpg"]
    assert "truncated" in detail["Abyssinian_9003.jpg"]
    assert all(part in detail[TOO_LARGE] for part in (TOO_LARGE, "2000x2000", str(MAX_PIXELS)))
    assert "Is a directory" in detail[A_DIRECTORY]


def test_odd_modes_are_kept_converted_with_their_original_mode(result):
    for name, mode in odd_mode_files(IMAGES_PER_BREED).items():
        row = _row(result.kept, name)
        assert row["mode"] == mode and bool(row["converted"]) is True
    assert sorted(set(result.kept["mode"])) == sorted({"RGB", *ODD_MODES})


def test_plain_rgb_jpegs_are_not_marked_converted_but_exif_rotated_ones_are(result):
    plain = _row(result.kept, "Abyssinian_1.jpg")
    assert plain["mode"] == "RGB" and bool(plain["converted"]) is False
    rotated = _row(result.kept, ROTATED)
    assert rotated["mode"] == "RGB" and bool(rotated["converted"]) is True
    assert (rotated["width"], rotated["height"]) == (20, 40)  # the upright size


def test_kept_sizes_match_the_files(result):
    for _, row in result.kept.iterrows():
        if Path(row["path"]).name != ROTATED:
            assert (row["width"], row["height"]) == Image.open(row["path"]).size


def test_sha256_is_the_digest_of_the_file_bytes(result):
    for _, row in result.kept.iterrows():
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()


def test_columns_dtypes_and_extra_input_columns(result):
    assert list(result.kept.columns) == ["path", "label", "source", *KEPT_COLUMNS]
    assert KEPT_COLUMNS == ("width", "height", "mode", "converted", "sha256")
    assert list(result.excluded.columns) == ["path", "label", "source", "reason", "detail"]
    assert result.kept["width"].dtype == "int64" and result.kept["converted"].dtype == bool
    assert set(result.kept["source"]) == {"synthetic"}
    assert list(result.kept.index) == list(range(len(result.kept)))


@pytest.mark.parametrize("workers", [1, 4])
def test_input_order_is_preserved_whatever_the_thread_count(images_dir, workers):
    manifest = _manifest(sorted(images_dir.iterdir()), shuffle_seed=workers)
    cleaned = clean_images(manifest, max_pixels=MAX_PIXELS, workers=workers, progress=False)
    in_order = [Path(path).name for path in manifest["path"]]
    assert _names(cleaned.kept) == [name for name in in_order if name not in EXPECTED_REASONS]
    assert _names(cleaned.excluded) == [name for name in in_order if name in EXPECTED_REASONS]


def test_results_do_not_depend_on_the_thread_count(manifest, result):
    single = clean_images(manifest, max_pixels=MAX_PIXELS, workers=1, progress=False)
    many = clean_images(manifest, max_pixels=MAX_PIXELS, workers=4, progress=False)
    pd.testing.assert_frame_equal(single.kept, many.kept)
    pd.testing.assert_frame_equal(single.excluded, many.excluded)
    pd.testing.assert_frame_equal(single.kept, result.kept)


def test_originals_are_not_modified_moved_or_deleted(images_dir, manifest):
    def snapshot() -> dict[str, tuple]:
        return {
            path.name: (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode)
            for path in sorted(images_dir.iterdir())
            if path.is_file()
        }

    before, listing = snapshot(), sorted(images_dir.iterdir())
    clean_images(manifest, max_pixels=MAX_PIXELS, workers=2, progress=False)
    assert snapshot() == before
    assert sorted(images_dir.iterdir()) == listing


def test_permission_denied_is_unreadable(tmp_path):
    path = tmp_path / "Bengal_1.jpg"
    Image.new("RGB", (8, 8)).save(path, "JPEG")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user (root?) can read a file with mode 000")
        excluded = clean_images(_manifest([path]), progress=False).excluded
        assert list(excluded["reason"]) == ["unreadable"] and "Permission denied" in excluded["detail"][0]
    finally:
        path.chmod(0o644)


def test_a_file_gone_since_listing_is_unreadable(tmp_path):
    excluded = clean_images(_manifest([tmp_path / "Bengal_7.jpg"]), progress=False).excluded
    assert list(excluded["reason"]) == ["unreadable"]


def test_pillows_own_limit_applies_by_default_and_its_warning_does_not_escape(tmp_path):
    path = tmp_path / "Bengal_2.jpg"
    Image.new("1", (10000, 9000)).save(path, "PNG")  # 90 M pixels: over Pillow's 89.5 M, about 11 kB on disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        excluded = clean_images(_manifest([path]), workers=2, progress=False).excluded
        filters_after = list(warnings.filters)
    assert list(excluded["reason"]) == ["too_large"]
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]
    assert filters_after == filters_before  # the "error" filter used while cleaning is removed again


def test_an_empty_manifest_gives_empty_frames_with_all_columns():
    empty = clean_images(_manifest([]), progress=False)
    assert empty.counts() == {"kept": 0, "excluded": 0}
    assert {"width", "height", "mode", "converted", "sha256"} <= set(empty.kept.columns)
    assert {"reason", "detail"} <= set(empty.excluded.columns)


def test_progress_bar_shows_only_when_asked(images_dir, capsys):
    manifest = _manifest(sorted(images_dir.glob("Abyssinian_[12].jpg")))
    clean_images(manifest, progress=False)
    assert capsys.readouterr().err == ""
    clean_images(manifest, progress=True)
    assert "verifying images" in capsys.readouterr().err


def test_report_json_and_excluded_csv_are_written(result, tmp_path):
    out_dir = tmp_path / "report"
    report_path = write_cleaning_report(result, out_dir)
    assert report_path == out_dir / "cleaning_report.json"
    report = json.loads(report_path.read_text())
    assert report["counts"] == result.counts()
    assert {Path(item["path"]).name: item["reason"] for item in report["excluded"]} == EXPECTED_REASONS
    assert all(item["detail"] and item["label"] for item in report["excluded"])
    csv = pd.read_csv(out_dir / "excluded.csv")
    assert list(csv["path"]) == list(result.excluded["path"])
    assert list(csv["reason"]) == list(result.excluded["reason"])
    write_cleaning_report(result, out_dir)  # rewriting replaces the files and leaves no temporary ones
    assert sorted(path.name for path in out_dir.iterdir()) == ["cleaning_report.json", "excluded.csv"]


def test_presize_cache_is_filled_while_cleaning_and_spares_a_second_decode(manifest, tmp_path):
    from lib.data.presize import PresizeCache

    cache = PresizeCache(tmp_path / "cache", 48)
    first = clean_images(manifest, max_pixels=MAX_PIXELS, progress=False, presize_cache=cache)
    second = clean_images(manifest, max_pixels=MAX_PIXELS, progress=False, presize_cache=cache)

    assert first.decoded == len(manifest) - 2  # all but the empty file and the directory, which cannot be read
    for _, row in first.kept.iterrows():
        with Image.open(cache.image_path(row["sha256"])) as presized:
            assert min(presized.size) == 48
    # Kept images come from the cache; only the broken ones are decoded again.
    assert second.decoded == len(EXPECTED_REASONS) - 2  # neither the empty file nor the directory is decoded
    pd.testing.assert_frame_equal(first.kept, second.kept)
    pd.testing.assert_frame_equal(first.excluded, second.excluded)


def test_a_full_disk_stops_cleaning_with_a_clear_error_and_leaves_no_partial_cache_file(
    images_dir, tmp_path, monkeypatch
):
    import errno

    from lib.data.presize import CacheWriteError, PresizeCache

    real_save = Image.Image.save

    def save_half_then_fail(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\xff\xd8 half a jpeg")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    manifest = _manifest([images_dir / "Abyssinian_1.jpg", images_dir / "Abyssinian_2.jpg"])
    cache = PresizeCache(tmp_path / "cache", 32)
    monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    with pytest.raises(CacheWriteError, match=r"No space left on device.*--cache-dir"):
        clean_images(manifest, progress=False, presize_cache=cache)
    assert [p for p in cache.folder.rglob("*") if p.is_file()] == []  # nothing half-written under any name

    monkeypatch.setattr(Image.Image, "save", real_save)  # space freed: the same call now fills the cache
    kept = clean_images(manifest, progress=False, presize_cache=cache).kept
    assert len(kept) == 2 and all(cache.lookup(digest) is not None for digest in kept["sha256"])


def test_no_bar_by_default_when_stderr_is_not_a_terminal_and_progress_reaches_the_callback(images_dir, capsys):
    manifest = _manifest(sorted(images_dir.glob("Abyssinian_[123].jpg")))
    reports = []
    clean_images(manifest, on_progress=lambda done, total: reports.append((done, total)))
    assert capsys.readouterr().err == ""  # captured stderr is no terminal: no bar, no carriage returns
    assert reports == [(1, 3), (2, 3), (3, 3)]
