"""Remembered file digests: a file whose size and modification time have not changed is not read and hashed again.

With the digest, the facts decoding found (size, mode) are remembered, so a warm check reads no file at all.

git's index decides the same way whether a working-tree file must be re-read (its stat data). A warm re-run of the
data stage then stats each original instead of reading and hashing it; a file rewritten in place gets a new
modification time, so its digest is computed again. The memo is a speed-up only: losing it (or an entry, when two
runs save it at once) costs one re-hash, never a wrong answer for an unchanged stat.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from lib.common.files import write_text_atomically

if TYPE_CHECKING:
    import pandas as pd

DIGESTS_FILE = "file-digests-v1.json"

Stamp = tuple[int, int]  # (size in bytes, modification time in ns)


def stamp_of(path: str | Path) -> Stamp:
    """Return the (size, mtime_ns) pair that says whether a file changed."""
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


class FileDigests:
    """sha256 digests (and decoded facts) of files, by absolute path, with the stamp they had when hashed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: dict[str, list] = self._read()  # path -> [size, mtime_ns, sha256, facts or None]
        self._lock = threading.Lock()  # the cleaning stage hashes files from several threads
        self.changed = False

    def _read(self) -> dict[str, list]:
        try:
            rows = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: start afresh (it is only a memo)
            return {}
        if not isinstance(rows, dict):
            return {}
        return {name: row for name, row in rows.items() if isinstance(row, list) and len(row) == 4}

    def get(self, path: str | Path, stamp: Stamp) -> tuple[str, dict | None] | None:
        """Return (digest, facts) remembered for path if the file still has this stamp, else None."""
        known = self._known.get(os.path.abspath(path))
        if known is None or (known[0], known[1]) != stamp:
            return None
        return known[2], known[3]

    def remember(self, path: str | Path, stamp: Stamp, sha256: str, facts: dict | None = None) -> None:
        """Remember what was found in the bytes of a file that had this stamp before it was read."""
        with self._lock:
            self._known[os.path.abspath(path)] = [*stamp, sha256, facts]
            self.changed = True

    def save(self) -> None:
        """Write the memo atomically, if anything was added."""
        if self.changed:
            write_text_atomically(self.path, json.dumps(self._known))
            self.changed = False


def dataset_version(manifest: pd.DataFrame) -> str:
    """Return the hex sha256 of a split manifest's content: each image's own digest with its label and split.

    The same images, labelled and split alike, give the same version wherever they sit on disk and whatever their
    names (MLflow's dataset digest hashes the paths too, so a copy in another cache would look like other data).
    """
    rows = sorted(zip(manifest["sha256"], manifest["label"], manifest["split"], strict=True))
    return hashlib.sha256("".join(f"{digest} {label} {split}\n" for digest, label, split in rows).encode()).hexdigest()
