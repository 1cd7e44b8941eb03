import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.data.images import ImageFacts
from lib.data.pictures import presized_shape
from lib.data.presize import PresizeCache, presize_file, presize_images
from tests.support.images import write_image


@pytest.mark.parametrize(
    ("size", "presize", "expected"),
    [
        ((500, 375), 460, (613, 460)),
        ((375, 500), 460, (460, 613)),
        ((200, 100), 460, (920, 460)),
        ((460, 460), 460, (460, 460)),
    ],
)
def test_short_side_becomes_the_presize_and_aspect_is_kept(size, presize, expected):
    assert presized_shape(*size, presize) == expected


def _manifest(paths):
    return pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
        }
    )


@pytest.fixture
def originals(tmp_path):
    sizes = [(300, 200), (120, 180), (256, 256), (90, 60)]
    return [write_image(tmp_path / "src" / f"pug_{i}.jpg", size, (40 * i, 10, 200)) for i, size in enumerate(sizes, 1)]


def test_presize_writes_short_side_images_into_content_addressed_cache(tmp_path, originals):
    manifest = _manifest(originals)
    result = presize_images(manifest, tmp_path / "cache", presize=64, workers=2, progress=False)

    assert (result.cache_hits, result.written) == (0, len(originals))
    for (_, row), original in zip(result.manifest.iterrows(), originals, strict=True):
        assert row["presized_path"] == str(PresizeCache(tmp_path / "cache", 64).image_path(row["sha256"]))
        with Image.open(row["presized_path"]) as cached, Image.open(original) as source:
            assert min(cached.size) == 64
            assert cached.size == presized_shape(*source.size, 64)
            # a bilinear resize keeps a flat colour: red channel near the source's
            red_cached = np.asarray(cached)[..., 0].mean()
            assert abs(red_cached - np.asarray(source)[..., 0].mean()) < 4


def test_second_run_hits_the_cache_without_decoding_the_originals(tmp_path, originals):
    manifest = _manifest(originals)
    reports = []
    first = presize_images(manifest, tmp_path / "cache", presize=64, on_progress=lambda *r: reports.append(r))
    mtimes = [os.stat(p).st_mtime_ns for p in first.manifest["presized_path"]]
    for original in originals:  # nothing left to decode: a re-decode would fail
        original.unlink()
    assert reports == [(done, len(originals)) for done in range(1, len(originals) + 1)]

    second = presize_images(manifest, tmp_path / "cache", presize=64, on_progress=lambda *r: reports.append(r))

    assert (second.cache_hits, second.written) == (len(originals), 0)
    assert [os.stat(p).st_mtime_ns for p in second.manifest["presized_path"]] == mtimes
    assert len(reports) == len(originals)  # nothing to presize: nothing reported


def test_identical_content_shares_one_entry_and_presizes_do_not_mix(tmp_path, originals):
    copy = tmp_path / "src" / "beagle_1.jpg"
    copy.write_bytes(originals[0].read_bytes())
    manifest = _manifest([originals[0], copy])

    result = presize_images(manifest, tmp_path / "cache", presize=32, progress=False)
    other = presize_images(manifest, tmp_path / "cache", presize=48, progress=False)

    assert result.written == 1 and result.manifest["presized_path"].nunique() == 1
    assert other.written == 1 and set(other.manifest["presized_path"]).isdisjoint(result.manifest["presized_path"])


def test_cache_entries_record_the_original_facts_and_need_both_files(tmp_path, originals):
    cache = PresizeCache(tmp_path / "cache", 64)
    digest = hashlib.sha256(originals[0].read_bytes()).hexdigest()
    assert cache.lookup(digest) is None

    presize_file(originals[0], digest, cache)

    assert cache.lookup(digest) == ImageFacts(width=300, height=200, mode="RGB", converted=False)
    cache.image_path(digest).unlink()  # half an entry is no entry
    assert cache.lookup(digest) is None


def test_writes_are_atomic_and_a_failed_decode_leaves_nothing(tmp_path, originals):
    broken = tmp_path / "src" / "pug_99.jpg"
    broken.write_bytes(originals[0].read_bytes()[:200])  # truncated JPEG
    cache = PresizeCache(tmp_path / "cache", 64)

    with pytest.raises(OSError):
        presize_file(broken, "ab" * 32, cache)

    assert cache.lookup("ab" * 32) is None and not (tmp_path / "cache").exists()

    target = presize_file(originals[0], "cd" * 32, cache)
    leftovers = sorted(p.name for p in target.parent.iterdir())
    assert leftovers == sorted([target.name, target.with_suffix(".json").name])  # no temporary file left behind


def test_presize_must_be_positive(tmp_path, originals):
    with pytest.raises(ValueError, match="presize"):
        presize_images(_manifest(originals), tmp_path, presize=0, progress=False)
