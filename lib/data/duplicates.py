"""Near-duplicate images: a perceptual hash per image, groups of images whose hashes are close, and what to use.

The hash is the DCT perceptual hash (pHash) that the imagehash and imagededup libraries compute: the picture in
grayscale, shrunk to 32x32, a 2-D DCT-II, and one bit per coefficient of the 8x8 lowest frequencies, set where the
coefficient is above their median (imagehash 4.3 `phash(hash_size=8, highfreq_factor=4)`; imagededup 0.3
`imagededup/methods/hashing.py` PHash). Two images whose 64-bit hashes differ in at most `max_distance` bits are
near-duplicates (imagededup's `find_duplicates(max_distance_threshold=10)` by default). Groups are not chained:
in manifest order, an image no group holds yet starts one, and every later image within the distance of it that no
group holds joins it, so each member lies within the distance of its group's first image. Near-duplicates of
near-duplicates would otherwise chain: on generated pets at distance 10, components of the near-pair graph joined
6,728 of 7,400 images into 57 groups across breeds, which left no groups to fill the validation set with. imagededup
likewise lists each image's own duplicates without joining the lists. A near pair whose images joined two different
groups is counted (`pairs_between_groups`): only such a pair can straddle the split.

Cleaning computes each hash while it decodes the image anyway (lib/data/cleaning.py) and remembers it by the sha256 of
the file's bytes in a memo beside the presize cache, so a warm run decodes nothing; an image the memo lacks is decoded
once more here. Within a group, files with the same bytes are exact copies: only the first is used. A group whose
members carry different labels is label noise (one picture cannot be two breeds): it is reported, and by a setting
left out.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lib.common.files import write_text_atomically
from lib.data.images import open_rgb

HASHES_FILE = "perceptual-hashes-v1.json"  # bump the version when the hash changes: old values are then never read
HASH_BITS = 64
_SIDE = 32  # imagehash phash: hash_size 8 x highfreq_factor 4
_KEPT = 8  # the 8x8 lowest frequencies: 64 bits
_BLOCK_ROWS = 1024  # rows of the all-pairs distance matrix computed at once: 1024 x 7390 uint8 is ~7.6 MB
# what find_groups adds to a manifest besides `group`: for the reports, not for the split
REPORT_COLUMNS = ("group_size", "distance", "exact", "conflicting", "near_other_group")
DUPLICATES_CSV = "duplicates.csv"
DUPLICATES_PNG = "duplicates.png"
REASON_EXACT = "exact copy"
REASON_CONFLICT = "conflicting labels"


def _dct_matrix(size: int) -> np.ndarray:
    """The DCT-II matrix, unnormalised as scipy.fftpack.dct's default (which imagehash uses): `M @ X @ M.T` is the
    2-D transform of a square image up to one constant factor, which no comparison with the median changes."""
    k = np.arange(size)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * size))


_DCT = _dct_matrix(_SIDE)[:_KEPT]  # only the rows of the kept frequencies are ever needed


def perceptual_hash(image: Image.Image) -> int:
    """Return the 64-bit DCT perceptual hash of a picture, as an int (bit 63 is the DC coefficient's)."""
    # LANCZOS as imagehash (its ANTIALIAS), but in another order: the colour picture is shrunk first, then made grey
    # (both are linear, so the order changes only rounding), and reducing_gap=2 first shrinks by a whole factor. On
    # 100 synthetic pets of 300-600 px that costs 0.34 ms a picture against 1.13 ms for imagehash 4.3.2's order (grey
    # at full size, then LANCZOS), and the hashes differ from its phash in 1.0 bit on average (at most 6): small
    # beside a 10-bit threshold.
    small = image.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0).convert("L")
    low = _DCT @ np.asarray(small, dtype=np.float64) @ _DCT.T
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Return how many of the 64 bits of two hashes differ."""
    return (a ^ b).bit_count()


class PerceptualHashes:
    """Perceptual hashes by the sha256 of the file they were computed from, kept in one JSON file.

    A memo only: losing it (or an entry, when two runs save at once) costs decoding the image again, never a wrong hash.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: dict[str, str] = self._read()
        self._lock = threading.Lock()  # cleaning hashes from several threads
        self.changed = False

    def _read(self) -> dict[str, str]:
        try:
            rows = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: start afresh
            return {}
        return {k: v for k, v in rows.items() if isinstance(v, str)} if isinstance(rows, dict) else {}

    def get(self, sha256: str) -> int | None:
        """Return the remembered hash of the file with this digest, or None."""
        known = self._known.get(sha256)
        return None if known is None else int(known, 16)

    def remember(self, sha256: str, value: int) -> None:
        """Remember the hash of the file with this digest."""
        with self._lock:
            self._known[sha256] = f"{value:016x}"
            self.changed = True

    def save(self) -> None:
        """Write the memo atomically, if anything was added."""
        if self.changed:
            write_text_atomically(self.path, json.dumps(self._known))
            self.changed = False


def hashes_for(manifest: pd.DataFrame, memo: PerceptualHashes) -> np.ndarray:
    """Return the hash of each row (needs `path` and `sha256`), from the memo or by decoding the original."""
    values = []
    for path, sha256 in zip(manifest["path"], manifest["sha256"], strict=True):
        value = memo.get(sha256)
        if value is None:
            value = perceptual_hash(open_rgb(path))
            memo.remember(sha256, value)
        values.append(value)
    memo.save()
    return np.array(values, dtype=np.uint64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the index pairs (i < j) of hashes at most max_distance bits apart, ordered by i, then j.

    Each block of rows is compared with the rows from its own first one on: the pairs below the diagonal are the same
    pairs again, so half the all-pairs matrix is never computed.
    """
    firsts, seconds = [np.array([], dtype=np.int64)], [np.array([], dtype=np.int64)]
    for start in range(0, len(hashes), _BLOCK_ROWS):
        block = hashes[start : start + _BLOCK_ROWS]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, start:])
        rows, columns = np.nonzero(distances <= max_distance)
        rows, columns = rows + start, columns + start
        later = columns > rows  # each pair once, and no image with itself
        firsts.append(rows[later])
        seconds.append(columns[later])
    return np.concatenate(firsts), np.concatenate(seconds)


def _leaders(count: int, firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Return for each item the index of its group's first item: the first item no group holds yet leads a group of
    itself and of every later item near it that no group holds (pairs as near_pairs returns them, i < j)."""
    leader = np.full(count, -1, dtype=np.int64)
    starts = np.searchsorted(firsts, np.arange(count + 1))  # pairs of item i: firsts[starts[i]:starts[i + 1]]
    for item in range(count):
        if leader[item] >= 0:
            continue
        near = seconds[starts[item] : starts[item + 1]]
        leader[item] = item
        leader[near[leader[near] < 0]] = item
    return leader


def find_groups(manifest: pd.DataFrame, hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    """Return the manifest (renumbered from 0) with each row's near-duplicate group.

    Added columns: `group` (0, 1, ... by first member in manifest order; singletons get one too), `group_size`,
    `distance` (bits from the group's first member), `exact` (the same bytes, by sha256, as an earlier row: a copy),
    `conflicting` (the group's members carry more than one label) and `near_other_group` (the image is also within
    the distance of an image of another group: the two may land on both sides of the split).
    """
    if not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"max_distance must be between 0 and {HASH_BITS} bits, got {max_distance}: e.g. 10.")
    result = manifest.reset_index(drop=True)
    pairs = near_pairs(hashes, max_distance)
    firsts = _leaders(len(result), *pairs)
    result["group"] = pd.factorize(firsts)[0]  # numbered in order of first appearance
    result["group_size"] = result.groupby("group")["group"].transform("size")
    result["distance"] = np.bitwise_count(hashes ^ hashes[firsts]).astype("int64")
    result["exact"] = result.duplicated("sha256", keep="first")
    result["conflicting"] = result.groupby("group")["label"].transform("nunique") > 1
    groups = result["group"].to_numpy()
    across = groups[pairs[0]] != groups[pairs[1]]
    near_other = np.zeros(len(result), dtype=bool)
    near_other[pairs[0][across]] = near_other[pairs[1][across]] = True
    result["near_other_group"] = near_other
    return result


@dataclass(frozen=True)
class DuplicateReport:
    """The rows to use (with their groups) and every row of a group of two or more, with whether it is used."""

    used: pd.DataFrame
    table: pd.DataFrame  # group, path, label, distance, exact, conflicting, used, reason
    near_other_group: int  # images also near an image of another group

    def counts(self) -> dict[str, int]:
        """Groups of two or more images, the images in them, groups with conflicting labels, rows left out, images
        near one of another group."""
        groups = self.table.drop_duplicates("group")
        return {
            "near_other_group": self.near_other_group,
            "duplicate_groups": len(groups),
            "images_in_groups": len(self.table),
            "conflicting_groups": int(groups["conflicting"].sum()),
            "exact_copies": int(self.table["exact"].sum()),
            "left_out": int((~self.table["used"]).sum()),
        }


def choose_rows(grouped: pd.DataFrame, *, exclude_conflicting: bool) -> DuplicateReport:
    """Leave out exact copies (the first of the same bytes is used) and, if asked, groups with conflicting labels."""
    reason = pd.Series("", index=grouped.index)
    reason[grouped["exact"]] = REASON_EXACT
    if exclude_conflicting:
        reason[grouped["conflicting"]] = REASON_CONFLICT
    used = reason == ""
    in_groups = grouped["group_size"] > 1
    table = grouped.loc[in_groups, ["group", "path", "label", "distance", "exact", "conflicting"]].assign(
        used=used[in_groups], reason=reason[in_groups]
    )
    table = table.sort_values(["group", "distance"], kind="stable").reset_index(drop=True)
    return DuplicateReport(
        used=grouped[used].reset_index(drop=True), table=table, near_other_group=int(grouped["near_other_group"].sum())
    )


def write_table(report: DuplicateReport, out_dir: Path) -> Path:
    """Write duplicates.csv (every image of a group of two or more) and return its path."""
    return write_text_atomically(Path(out_dir) / DUPLICATES_CSV, report.table.to_csv(index=False))


def memo_path(cache_dir: Path) -> Path:
    """Where the perceptual hashes of a cache folder's images are remembered."""
    return Path(os.fspath(cache_dir)) / HASHES_FILE
