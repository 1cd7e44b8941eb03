"""Split a manifest into training and validation sets the way fastai's RandomSplitter does."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pandas as pd
import torch

from lib.common.errors import InputError
from lib.recipe import DEFAULT_SEED, DEFAULT_VALID_PCT

# fastbook ch. 5: RandomSplitter(valid_pct=0.2, seed=42)
FIXED_SPLIT_COLUMN = "is_valid"  # fastai 2.8.12 fastai/data/transforms.py: ColSplitter(col='is_valid')
GROUP_COLUMN = "group"  # near-duplicate groups (lib/data/duplicates.py): a group never straddles a random split


@dataclass(frozen=True)
class SplitManifest:
    """Rows with a `split` ('train'/'valid') and a `target` column, the class vocabulary, and what was dropped."""

    manifest: pd.DataFrame
    vocab: tuple[str, ...]
    valid_only: pd.DataFrame

    def sizes(self) -> dict[str, int]:
        """Return the number of rows in each split."""
        counts = self.manifest["split"].value_counts()
        return {"train": int(counts.get("train", 0)), "valid": int(counts.get("valid", 0))}


def random_split(n: int, *, valid_pct: float = DEFAULT_VALID_PCT, seed: int | None = DEFAULT_SEED):
    """Return (train_indices, valid_indices) of a seeded permutation of range(n).

    Validation is the first int(valid_pct * n) items of torch.randperm(n), as in fastai's RandomSplitter. A private
    generator seeded like torch.manual_seed(seed) gives the same permutation without touching global RNG state.
    """
    if n < 2:
        raise InputError(f"Cannot split {n} item(s) into training and validation sets: at least 2 are needed.")
    permutation = _permutation(n, valid_pct, seed)
    cut = int(valid_pct * n)
    return permutation[cut:], permutation[:cut]


def grouped_split(
    groups: list[int], *, valid_pct: float = DEFAULT_VALID_PCT, seed: int | None = DEFAULT_SEED
) -> tuple[list[int], list[int]]:
    """Return (train_indices, valid_indices) of items labelled with groups, every group on one side.

    The items are taken in `random_split`'s permutation; the first item of a group seen places the whole group:
    in validation while it still fits under int(valid_pct * n) items, else in training. So validation falls short of
    that target by less than the size of any group left out of it (singletons fill it to the target exactly), and
    with every group a singleton the split is `random_split`'s, item for item.
    """
    if len(set(groups)) < 2:
        raise InputError(
            f"Cannot split {len(groups)} item(s) in {len(set(groups))} near-duplicate group(s) into training and "
            "validation sets: at least 2 groups are needed (lower --duplicate-distance, or --no-find-duplicates)."
        )
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    target = int(valid_pct * len(groups))
    train: list[int] = []
    valid: list[int] = []
    for index in _permutation(len(groups), valid_pct, seed):
        group = members.pop(groups[index], None)
        if group is None:  # placed with an earlier member
            continue
        side = valid if len(valid) + len(group) <= target else train
        side.extend([index, *(member for member in group if member != index)])
    return train, valid


def _permutation(n: int, valid_pct: float, seed: int | None) -> list[int]:
    if not 0 < valid_pct < 1:
        raise ValueError(f"valid_pct must be between 0 and 1 (exclusive), got {valid_pct}: e.g. --valid-pct 0.2.")
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    return torch.randperm(n, generator=generator).tolist()


def split_manifest(
    manifest: pd.DataFrame, *, valid_pct: float = DEFAULT_VALID_PCT, seed: int | None = DEFAULT_SEED
) -> SplitManifest:
    """Add split and target columns; build the vocabulary from the training split.

    A manifest with an `is_valid` column (a CSV's valid column, split folders) keeps the split it gives, as fastai's
    ColSplitter and GrandparentSplitter; any other is split at random: by `grouped_split` when a `group` column holds
    a group of two or more near-duplicates, else by `random_split` (then exactly as fastai's RandomSplitter).

    Validation rows whose label never occurs in training cannot be scored by a model that lacks the class: they are
    removed from the manifest and returned in `valid_only`, which the label gate refuses (lib/data/label_gate.py).
    """
    if FIXED_SPLIT_COLUMN in manifest.columns:
        split = manifest[FIXED_SPLIT_COLUMN].map({True: "valid", False: "train"}).reset_index(drop=True)
    else:
        grouped = GROUP_COLUMN in manifest.columns and manifest[GROUP_COLUMN].duplicated().any()
        if grouped:
            groups = manifest[GROUP_COLUMN].astype("int64").tolist()
            train_idx, valid_idx = grouped_split(groups, valid_pct=valid_pct, seed=seed)
        else:
            train_idx, valid_idx = random_split(len(manifest), valid_pct=valid_pct, seed=seed)
        split = pd.Series("train", index=range(len(manifest)))
        split.iloc[valid_idx] = "valid"
    result = manifest.reset_index(drop=True).assign(split=split.to_numpy())
    # fastai Categorize: sorted unique training labels, Python string order (upper-case cat breeds first).
    vocab = tuple(sorted(set(result.loc[result["split"] == "train", "label"])))
    known = result["label"].isin(vocab)
    valid_only = result[~known].reset_index(drop=True)
    kept = result[known].reset_index(drop=True)
    kept["target"] = kept["label"].map({label: i for i, label in enumerate(vocab)}).astype("int64")
    return SplitManifest(manifest=kept, vocab=vocab, valid_only=valid_only)
