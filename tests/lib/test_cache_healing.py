"""The presize cache heals itself: a damaged entry is rebuilt from its original, with one warning naming it.

Every case damages real files of a real cache, then runs the next stage (cleaning, presizing or a loader epoch) and
compares the rebuilt entry byte for byte with one a fresh cache holds.
"""

import errno
import hashlib
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from lib.common.errors import UserError
from lib.data.cleaning import clean_images
from lib.data.digests import FileDigests
from lib.data.loading import make_loader
from lib.data.presize import CacheWriteError, DamagedCacheError, PresizeCache, presize_images
from lib.train.trainer import check_presize
from tests.support.images import write_image

SIZE = 32
LOGGER = "lib.data.presize"
SIZES = [(60, 40), (40, 70), (50, 50), (80, 33), (33, 45), (64, 48)]


@pytest.fixture
def pets(tmp_path) -> pd.DataFrame:
    """Six small originals with their digests, targets and splits."""
    paths = [write_image(tmp_path / "src" / f"pug_{i}.jpg", s, (35 * i, 20, 90)) for i, s in enumerate(SIZES)]
    return pd.DataFrame(
        {
            "path": [str(path) for path in paths],
            "label": "pug",
            "sha256": [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths],
            "target": [i % 2 for i in range(len(paths))],
            "split": ["valid" if i % 3 == 0 else "train" for i in range(len(paths))],
        }
    )


def _entry_files(cache: PresizeCache, digest: str) -> tuple[bytes, bytes]:
    image = cache.image_path(digest)
    return image.read_bytes(), image.with_suffix(".json").read_bytes()


@pytest.fixture
def fresh(tmp_path, pets) -> dict[str, tuple[bytes, bytes]]:
    """The .jpg and .json bytes of every entry of a cache built from scratch, the reference for rebuilt entries."""
    presize_images(pets, tmp_path / "fresh", presize=SIZE, workers=1, progress=False)
    cache = PresizeCache(tmp_path / "fresh", SIZE)
    return {digest: _entry_files(cache, digest) for digest in pets["sha256"]}


@pytest.fixture
def warm(tmp_path, pets) -> PresizeCache:
    """A cache filled the way a run fills it: cleaning presizes (remembering digests), then the presize stage."""
    cache = PresizeCache(tmp_path / "cache", SIZE)
    clean_images(pets, presize_cache=cache, digests=_digests(tmp_path), workers=2, progress=False)
    assert presize_images(pets, tmp_path / "cache", presize=SIZE, progress=False).written == 0
    return cache


def _digests(tmp_path: Path) -> FileDigests:
    return FileDigests(tmp_path / "cache" / "file-digests.json")


def _presized(manifest: pd.DataFrame, cache: PresizeCache) -> pd.DataFrame:
    return manifest.assign(presized_path=[cache.image_path_str(digest) for digest in manifest["sha256"]])


def _eight_bytes(cache, digests):
    cache.image_path(digests[0]).write_bytes(b"\xff\xd8\xff\xe0\x00\x10JF")  # a JPEG header, then nothing
    return digests[:1]


def _truncated(cache, digests):
    for digest in digests[1:4]:
        image = cache.image_path(digest)
        assert image.stat().st_size > 300
        os.truncate(image, 300)
    return digests[1:4]


def _not_json(cache, digests):
    cache.image_path(digests[2]).with_suffix(".json").write_text('{"width": 64, "hei')
    return digests[2:3]


def _old_record(cache, digests):  # what a cache written before records held the .jpg's size and digest looks like
    cache.image_path(digests[3]).with_suffix(".json").write_text(
        '{"width": 60, "height": 40, "mode": "RGB", "converted": false}'
    )
    return digests[3:4]


def _wrong_type(cache, digests):
    record = cache.image_path(digests[4]).with_suffix(".json")
    record.write_text(record.read_text().replace('"width":', '"width":"', 1).replace(',"height"', '","height"', 1))
    return digests[4:5]


def _jpg_deleted(cache, digests):
    cache.image_path(digests[5]).unlink()
    return digests[5:6]


def _empty_jpg_without_record(cache, digests):  # what a full disk once left
    cache.image_path(digests[1]).write_bytes(b"")
    cache.image_path(digests[1]).with_suffix(".json").unlink()
    return digests[1:2]


DAMAGES = {
    "one jpg overwritten with 8 bytes": _eight_bytes,
    "three jpgs truncated to 300 bytes": _truncated,
    "a json that is not JSON": _not_json,
    "a json without the jpg's size and digest": _old_record,
    "a json with a string for a number": _wrong_type,
    "a jpg deleted, its json left": _jpg_deleted,
    "a 0-byte jpg without its json": _empty_jpg_without_record,
}


def _clean(manifest, cache, tmp_path):
    result = clean_images(manifest, presize_cache=cache, digests=_digests(tmp_path), workers=2, progress=False)
    assert len(result.kept) == len(manifest) and result.excluded.empty


def _presize(manifest, cache, tmp_path):
    result = presize_images(manifest, cache.folder.parent, presize=SIZE, workers=2, progress=False)
    assert result.manifest["presized_path"].tolist() == _presized(manifest, cache)["presized_path"].tolist()


def _load(manifest, cache, tmp_path):
    images, _ = next(iter(make_loader(_presized(manifest, cache), size=SIZE, train=False, batch_size=99, workers=0)))
    assert images.shape == (len(manifest), 3, SIZE, SIZE)


STAGES = {"cleaning": _clean, "presizing": _presize, "a loader epoch": _load}


def _warned(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


def _assert_one_warning_each(caplog, cache, damaged):
    messages = _warned(caplog)
    assert len(messages) == len(damaged), messages
    for digest in damaged:  # each message is one line naming its entry, and each entry is named once
        assert sum(cache.image_path_str(digest) in message for message in messages) == 1, messages
    assert all("\n" not in message and "rebuilding it from its original" in message for message in messages)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("damage", DAMAGES)
def test_the_next_stage_rebuilds_each_damaged_entry_as_fresh_with_one_warning(
    damage, stage, pets, fresh, warm, tmp_path, caplog
):
    damaged = DAMAGES[damage](warm, pets["sha256"].tolist())
    caplog.set_level(logging.WARNING, logger=LOGGER)

    STAGES[stage](pets, warm, tmp_path)

    _assert_one_warning_each(caplog, warm, damaged)
    assert {digest: _entry_files(warm, digest) for digest in pets["sha256"]} == fresh
    caplog.clear()
    STAGES[stage](pets, warm, tmp_path)  # healed: the run after says nothing
    assert _warned(caplog) == []


def test_a_same_size_corruption_is_caught_by_its_digest_when_training_reads_it(pets, fresh, warm, caplog):
    digest = pets["sha256"].iloc[0]
    image = warm.image_path(digest)
    data = bytearray(image.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # the size its record says, the pixels zeroed
    image.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger=LOGGER)

    _load(pets, warm, None)

    _assert_one_warning_each(caplog, warm, [digest])
    assert "sha256" in _warned(caplog)[0]
    assert _entry_files(warm, digest) == fresh[digest]


def test_a_training_epoch_with_workers_over_a_damaged_entry_gives_the_batches_of_a_fresh_cache(
    pets, fresh, warm, tmp_path
):
    train = pets[pets["split"] == "train"]
    damaged = _eight_bytes(warm, train["sha256"].tolist())
    settings = {"size": SIZE, "train": True, "batch_size": 2, "seed": 3}

    healed = list(make_loader(_presized(train, warm), workers=2, **settings))  # the rebuild runs in a worker process
    reference = list(make_loader(_presized(train, PresizeCache(tmp_path / "fresh", SIZE)), workers=0, **settings))

    assert len(healed) == len(train) // 2
    for (images, targets), (expected_images, expected_targets) in zip(healed, reference, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)
    assert _entry_files(warm, damaged[0]) == fresh[damaged[0]]


def test_the_training_stage_size_check_heals_a_damaged_first_entry(pets, fresh, warm, caplog):
    damaged = _eight_bytes(warm, pets["sha256"].tolist())
    caplog.set_level(logging.WARNING, logger=LOGGER)

    check_presize(_presized(pets, warm), SIZE)

    _assert_one_warning_each(caplog, warm, damaged)
    assert _entry_files(warm, damaged[0]) == fresh[damaged[0]]


@pytest.mark.parametrize("stage", ["presizing", "a loader epoch"])
def test_a_damaged_entry_whose_original_is_gone_fails_in_one_line_naming_both(stage, pets, warm, tmp_path):
    damaged = _eight_bytes(warm, pets["sha256"].tolist())[0]
    original = pets.loc[pets["sha256"] == damaged, "path"].iloc[0]
    os.unlink(original)

    with pytest.raises(DamagedCacheError) as raised:
        STAGES[stage](pets, warm, tmp_path)

    message = str(raised.value)
    assert isinstance(raised.value, UserError) and "\n" not in message
    assert warm.image_path_str(damaged) in message and original in message
    assert "restore the original" in message and f"delete the cache folder {warm.folder}" in message


def test_a_damaged_entry_whose_original_changed_is_not_rebuilt_from_other_bytes(pets, warm, tmp_path):
    damaged = _eight_bytes(warm, pets["sha256"].tolist())[0]
    original = Path(pets.loc[pets["sha256"] == damaged, "path"].iloc[0])
    write_image(original, (70, 50), (0, 0, 0))  # another picture under the same name

    with pytest.raises(DamagedCacheError, match=r"has changed since it was cleaned.*re-run the data stage"):
        _load(pets, warm, tmp_path)
    assert warm.image_path(damaged).stat().st_size == 8  # nothing stored under the old content's address


def _fail_fsync_of(part: str):
    """An os.fsync that reports a full disk, as the kernel does at write-back, for files whose name holds part."""
    real_fsync = os.fsync

    def fsync(descriptor):
        if part in os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(descriptor)

    return fsync


def _save_half_then_fail(self, fp, *args, **kwargs):
    Path(fp).write_bytes(b"\xff\xd8 half a jpeg")  # what a full disk leaves behind
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["the jpeg save", "the jpeg's fsync", "the record's fsync"])
def test_a_full_disk_while_presizing_leaves_no_entry_and_no_temporary_file(
    failing, pets, fresh, warm, tmp_path, monkeypatch
):
    digests = pets["sha256"].tolist()
    for digest in digests[1:]:  # only the damaged entry is left to write
        os.unlink(warm.image_path(digest))
        os.unlink(warm.image_path(digest).with_suffix(".json"))
    _eight_bytes(warm, digests)
    with monkeypatch.context() as patch:
        if failing == "the jpeg save":
            patch.setattr(Image.Image, "save", _save_half_then_fail)
        else:
            patch.setattr(os, "fsync", _fail_fsync_of(".jpg." if failing == "the jpeg's fsync" else ".json."))
        with pytest.raises(CacheWriteError, match=r"No space left on device.*--cache-dir"):
            presize_images(pets, tmp_path / "cache", presize=SIZE, workers=1, progress=False)

    assert [path for path in warm.folder.rglob("*") if path.is_file()] == []  # no entry, whole or half, no temp

    presize_images(pets, tmp_path / "cache", presize=SIZE, workers=1, progress=False)  # space freed
    assert {digest: _entry_files(warm, digest) for digest in digests} == fresh
