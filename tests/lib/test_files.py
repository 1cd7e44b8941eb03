"""Tests for lib.common.files: an atomic write reaches the disk before its name does, or leaves the old file."""

import errno
import os

import pytest

from lib.common.files import write_text_atomically


def test_a_write_error_reported_at_fsync_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = write_text_atomically(tmp_path / "record.json", "old")
    synced = []

    def full_disk_fsync(descriptor):  # what a full disk reports when the kernel writes delayed data back
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(target, "new")

    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["record.json"]
    assert len(synced) == 1 and os.path.basename(synced[0]).startswith(".record.json.")  # the temporary, not the target
