"""Tests for lib.data.duplicates and the group-aware split: planted near-duplicates are grouped, flagged and kept on
one side of the split; without groups the split is fastai's RandomSplitter's."""

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from lib.data import duplicates
from lib.data.cleaning import clean_images
from lib.data.images import open_rgb
from lib.data.labelling import label_images
from lib.data.splitting import GROUP_COLUMN, grouped_split, random_split, split_manifest
from lib.data.summary import duplicates_line, plot_duplicate_groups
from lib.data.synthetic import duplicate_files, make_pets_dataset
from lib.recipe import DEFAULT_DUPLICATE_DISTANCE, DataSettings

BREEDS, PER_BREED = 3, 12


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Synthetic pets with planted duplicates, cleaned with the hash memo, grouped at the default distance."""
    root = tmp_path_factory.mktemp("dups")
    images = make_pets_dataset(root, breeds=BREEDS, images_per_breed=PER_BREED, duplicates=True)
    manifest = label_images(images, DataSettings(labels="regex")).manifest
    memo = duplicates.PerceptualHashes(root / duplicates.HASHES_FILE)
    kept = clean_images(manifest, hashes=memo, progress=False).kept
    hashes = duplicates.hashes_for(kept, duplicates.PerceptualHashes(root / duplicates.HASHES_FILE))
    grouped = duplicates.find_groups(kept, hashes, DEFAULT_DUPLICATE_DISTANCE)
    return {"root": root, "images": images, "kept": kept, "hashes": hashes, "grouped": grouped}


def _group_of(grouped: pd.DataFrame, name: str) -> int:
    return int(grouped.loc[grouped["path"].map(lambda path: Path(path).name) == name, "group"].iloc[0])


def test_hash_is_stable_under_re_encoding_and_changes_with_the_picture(planted):
    original = open_rgb(planted["images"] / "Abyssinian_1.jpg")
    again = duplicates.perceptual_hash(original)
    assert again == duplicates.perceptual_hash(original.copy())
    smaller = original.resize((original.width // 2, original.height // 2))
    assert duplicates.hamming(again, duplicates.perceptual_hash(smaller)) <= 4
    # Inverting the grey levels flips the sign of every frequency but the mean: most bits change.
    assert duplicates.hamming(again, duplicates.perceptual_hash(ImageOps.invert(original))) >= 48


def test_every_planted_duplicate_joins_its_original(planted):
    grouped = planted["grouped"]
    for name, (original, kind) in duplicate_files(BREEDS).items():
        assert _group_of(grouped, name) == _group_of(grouped, original), kind
        row = grouped[grouped["path"].str.endswith("/" + name)].iloc[0]
        assert row["exact"] == (kind == "exact")
        assert row["conflicting"] == (kind == "relabelled")  # the relabelled copy's group has two labels


def _leader_oracle(hashes: list[int], max_distance: int) -> list[int]:
    """Groups by the rule, item by item over all pairs: each image no group holds leads one of the later free ones
    within max_distance of it."""
    leader = [-1] * len(hashes)
    for i, value in enumerate(hashes):
        if leader[i] < 0:
            leader[i] = i
            for j in range(i + 1, len(hashes)):
                if leader[j] < 0 and duplicates.hamming(value, hashes[j]) <= max_distance:
                    leader[j] = i
    return leader


def test_pairs_and_groups_match_a_brute_force_over_all_pairs(planted, monkeypatch):
    monkeypatch.setattr(duplicates, "_BLOCK_ROWS", 7)  # blocks that do not divide the count
    hashes = [int(value) for value in planted["hashes"]]
    expected = [
        (i, j)
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if duplicates.hamming(hashes[i], hashes[j]) <= DEFAULT_DUPLICATE_DISTANCE
    ]
    firsts, seconds = duplicates.near_pairs(planted["hashes"], DEFAULT_DUPLICATE_DISTANCE)
    assert list(zip(firsts.tolist(), seconds.tolist(), strict=True)) == expected  # in order: groups need it
    grouped = planted["grouped"]
    assert (
        grouped["group"].tolist()
        == pd.factorize(np.array(_leader_oracle(hashes, DEFAULT_DUPLICATE_DISTANCE)))[0].tolist()
    )
    assert (grouped["distance"] <= DEFAULT_DUPLICATE_DISTANCE).all()
    groups = grouped["group"].tolist()
    across = {i for i, j in expected if groups[i] != groups[j]} | {j for i, j in expected if groups[i] != groups[j]}
    assert set(np.flatnonzero(grouped["near_other_group"])) == across


def test_near_duplicates_do_not_chain_into_one_group():
    manifest = pd.DataFrame({"path": list("abcd"), "label": ["x", "x", "y", "z"], "sha256": list("1234")})
    # a-b 3 bits, b-c 3 bits (a-c 6), d far from all: at distance 3, c is too far from a to join a's group
    hashes = np.array([0, 0b111, 0b111111, (1 << 64) - 1], dtype=np.uint64)
    grouped = duplicates.find_groups(manifest, hashes, 3)
    assert grouped["group"].tolist() == [0, 0, 1, 2]
    assert grouped["distance"].tolist() == [0, 3, 0, 0]
    assert grouped["conflicting"].tolist() == [False, False, False, False]
    assert grouped["near_other_group"].tolist() == [False, True, True, False]  # b and c may land apart
    assert duplicates.choose_rows(grouped, exclude_conflicting=False).counts()["near_other_group"] == 2
    # at 6 bits c is near a too, and the three are one group
    assert duplicates.find_groups(manifest, hashes, 6)["group"].tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="between 0 and 64"):
        duplicates.find_groups(manifest, hashes, 65)


@pytest.mark.parametrize("seed", [0, 1, 42, 7])
def test_no_group_straddles_the_split_and_valid_stays_near_its_target(planted, seed):
    report = duplicates.choose_rows(planted["grouped"], exclude_conflicting=False)
    split = split_manifest(report.used, valid_pct=0.2, seed=seed)
    sides = split.manifest.groupby(GROUP_COLUMN)["split"].nunique()
    assert (sides == 1).all(), sides[sides > 1]
    target = int(0.2 * len(report.used))
    largest = int(report.used[GROUP_COLUMN].value_counts().max())
    assert largest > 1
    # valid_only (labels only in validation) is empty here, so the valid count is what the split chose
    assert target - largest < split.sizes()["valid"] <= target


def test_exact_copy_is_used_once_and_conflicting_groups_are_left_out_when_asked(planted):
    names = {kind: name for name, (_, kind) in duplicate_files(BREEDS).items()}
    kept_all = duplicates.choose_rows(planted["grouped"], exclude_conflicting=False)
    used = set(kept_all.used["path"].map(lambda path: Path(path).name))
    assert names["exact"] not in used and "Abyssinian_1.jpg" in used
    assert names["relabelled"] in used
    assert kept_all.counts()["exact_copies"] == 1

    strict = duplicates.choose_rows(planted["grouped"], exclude_conflicting=True)
    left = strict.table[~strict.table["used"]]
    conflicting_group = _group_of(planted["grouped"], names["relabelled"])
    assert set(left.loc[left["reason"] == duplicates.REASON_CONFLICT, "group"]) >= {conflicting_group}
    assert not strict.used["conflicting"].any()
    assert strict.counts()["left_out"] == len(planted["grouped"]) - len(strict.used)


def test_without_groups_the_split_is_randomsplitters():
    labels = ["pug", "beagle"] * 50
    manifest = pd.DataFrame({"path": [f"/x/{i}.jpg" for i in range(100)], "label": labels})
    singletons = manifest.assign(group=range(100))
    plain = split_manifest(manifest, valid_pct=0.2, seed=42).manifest
    with_column = split_manifest(singletons, valid_pct=0.2, seed=42).manifest
    assert with_column["split"].tolist() == plain["split"].tolist()
    _, valid = random_split(100, valid_pct=0.2, seed=42)
    assert sorted(with_column.index[with_column["split"] == "valid"]) == sorted(valid)
    assert grouped_split(list(range(100)), valid_pct=0.2, seed=42) == random_split(100, valid_pct=0.2, seed=42)


def test_a_grouped_split_moves_only_what_its_groups_need():
    # Pairing items 0-1, 2-3, ..., 18-19 of 100: the others keep the side fastai's RandomSplitter gives them unless
    # validation had to take a singleton in place of a pair that no longer fitted.
    groups = [index // 2 if index < 20 else index for index in range(100)]
    train, valid = grouped_split(groups, valid_pct=0.2, seed=42)
    _, fastai_valid = random_split(100, valid_pct=0.2, seed=42)
    assert len(valid) == 20 and all((2 * pair in valid) == (2 * pair + 1 in valid) for pair in range(10))
    moved = set(valid) ^ set(fastai_valid)
    assert len(moved) <= 2 * 10 + 2  # at most each pair's partner, and one singleton each way at the edge


def test_grouped_split_is_seeded_and_refuses_a_single_group():
    groups = [0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8]
    assert grouped_split(groups, seed=3) == grouped_split(groups, seed=3)
    train, valid = grouped_split(groups, seed=3)
    assert sorted(train + valid) == list(range(len(groups)))
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_split([5, 5, 5], seed=0)


def test_hash_memo_spares_decoding_the_originals(planted, tmp_path):
    memo_file = planted["root"] / duplicates.HASHES_FILE
    assert memo_file.is_file()
    # Copies of the kept rows pointing at files that do not exist: only the memo can answer.
    gone = planted["kept"].assign(path=[str(tmp_path / f"gone-{i}.jpg") for i in range(len(planted["kept"]))])
    again = duplicates.hashes_for(gone, duplicates.PerceptualHashes(memo_file))
    assert again.tolist() == planted["hashes"].tolist()


def test_reports_name_the_groups_and_draw_them(planted, tmp_path):
    report = duplicates.choose_rows(planted["grouped"], exclude_conflicting=False)
    table = pd.read_csv(duplicates.write_table(report, tmp_path))
    assert {"group", "path", "label", "distance", "exact", "conflicting", "used", "reason"} <= set(table.columns)
    assert (table.groupby("group").size() > 1).all()
    sheet = plot_duplicate_groups(report.table, tmp_path / duplicates.DUPLICATES_PNG)
    with Image.open(sheet) as png:
        assert png.format == "PNG" and png.width > 100
    counts = {**report.counts(), "distance": 10, "excluded_conflicting": False}
    line = duplicates_line(counts)
    assert f"{counts['duplicate_groups']} groups holding {counts['images_in_groups']} images" in line
    assert "1 exact copies used once" in line
    assert plot_duplicate_groups(report.table.iloc[:0], tmp_path / duplicates.DUPLICATES_PNG) is None
    assert not (tmp_path / duplicates.DUPLICATES_PNG).exists()
