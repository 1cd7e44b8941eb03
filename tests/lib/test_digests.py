"""Tests for lib.data.digests and the warm path of cleaning it enables: unchanged files are not read again."""

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest

from lib.data import cleaning
from lib.data.cleaning import clean_images
from lib.data.digests import FileDigests, dataset_version, stamp_of
from lib.data.presize import PresizeCache
from lib.data.synthetic import make_pets_dataset


def test_a_digest_is_returned_only_while_the_file_keeps_its_stamp(tmp_path):
    picture = tmp_path / "a.jpg"
    picture.write_bytes(b"first")
    memo = FileDigests(tmp_path / "memo.json")
    memo.remember(picture, stamp_of(picture), "d1", {"width": 1})
    assert memo.get(picture, stamp_of(picture)) == ("d1", {"width": 1})

    picture.write_bytes(b"second, longer")  # rewritten in place: new size and mtime
    assert memo.get(picture, stamp_of(picture)) is None


def test_the_memo_survives_a_reload_and_ignores_a_corrupt_file(tmp_path):
    picture = tmp_path / "a.jpg"
    picture.write_bytes(b"bytes")
    memo = FileDigests(tmp_path / "memo.json")
    memo.remember(picture, stamp_of(picture), "d1")
    memo.save()
    assert FileDigests(tmp_path / "memo.json").get(picture, stamp_of(picture)) == ("d1", None)

    (tmp_path / "memo.json").write_text("{not json")
    assert FileDigests(tmp_path / "memo.json").get(picture, stamp_of(picture)) is None


@pytest.fixture
def pets(tmp_path):
    images = make_pets_dataset(tmp_path / "pets", breeds=2, images_per_breed=4, min_side=40, max_side=64)
    paths = sorted(str(path) for path in images.iterdir())
    manifest = pd.DataFrame({"path": paths, "label": [Path(p).name.rsplit("_", 1)[0] for p in paths]})
    return manifest, PresizeCache(tmp_path / "cache", 32), FileDigests(tmp_path / "cache" / "memo.json")


def _count_reads(monkeypatch) -> list[str]:
    reads = []
    real = Path.read_bytes

    def counting(self):
        reads.append(str(self))
        return real(self)

    monkeypatch.setattr(cleaning.Path, "read_bytes", counting)
    return reads


def test_a_warm_clean_reads_no_unchanged_file_and_gives_the_cold_result(pets, monkeypatch):
    manifest, cache, digests = pets
    cold = clean_images(manifest, progress=False, presize_cache=cache, digests=digests)
    reads = _count_reads(monkeypatch)
    warm = clean_images(
        manifest, progress=False, presize_cache=cache, digests=FileDigests(digests.path)
    )  # a later run: the memo comes from disk
    assert reads == []
    pd.testing.assert_frame_equal(warm.kept, cold.kept)
    assert warm.decoded == 0


def test_a_file_changed_in_place_is_read_and_hashed_again(pets, monkeypatch):
    manifest, cache, digests = pets
    clean_images(manifest, progress=False, presize_cache=cache, digests=digests)
    changed = Path(manifest["path"].iloc[0])
    other = Path(manifest["path"].iloc[1]).read_bytes()
    changed.write_bytes(other)
    os.utime(changed, ns=(1, 1))  # a different stamp, whatever the clock's resolution
    reads = _count_reads(monkeypatch)
    warm = clean_images(manifest, progress=False, presize_cache=cache, digests=FileDigests(digests.path))
    assert reads == [str(changed)]
    assert warm.kept["sha256"].iloc[0] == hashlib.sha256(other).hexdigest()


def test_without_the_cache_entry_the_memo_alone_does_not_settle_a_file(pets, monkeypatch):
    manifest, cache, digests = pets
    clean_images(manifest, progress=False, presize_cache=cache, digests=digests)
    gone = manifest["path"].iloc[0]
    os.remove(cache.image_path(hashlib.sha256(Path(gone).read_bytes()).hexdigest()))
    reads = _count_reads(monkeypatch)
    warm = clean_images(manifest, progress=False, presize_cache=cache, digests=FileDigests(digests.path))
    assert reads == [gone] and warm.decoded == 1  # decoded and presized again


def test_the_data_version_follows_the_content_labels_and_split_not_where_the_files_are():
    manifest = pd.DataFrame(
        {"path": ["/a/cat_1.jpg", "/a/dog_1.jpg"], "sha256": ["aa", "bb"], "label": ["cat", "dog"],
         "split": ["train", "valid"]}
    )  # fmt: skip
    version = dataset_version(manifest)
    moved = manifest.assign(path=["/elsewhere/x.jpg", "/elsewhere/y.jpg"]).iloc[::-1]  # another cache, another order
    assert dataset_version(moved) == version and len(version) == 64
    assert dataset_version(manifest.assign(split=["valid", "train"])) != version
    assert dataset_version(manifest.assign(label=["dog", "cat"])) != version
    assert dataset_version(manifest.assign(sha256=["aa", "cc"])) != version
