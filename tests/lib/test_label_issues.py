"""Tests for lib.evaluate.label_issues: the folds, their assembled held-out probabilities, cleanlab's ranking."""

import numpy as np
import pandas as pd
import pytest

from lib.common.errors import InputError
from lib.evaluate.label_issues import FOLD_COLUMN, fold_manifests, out_of_fold_probabilities, rank_label_issues


def manifest(per_class: dict[str, int], *, valid_every: int = 5, groups: list[int] | None = None) -> pd.DataFrame:
    """A split manifest of `per_class` images per label, every `valid_every`-th row in validation."""
    labels = [label for label, count in per_class.items() for _ in range(count)]
    vocab = sorted(per_class)
    rows = pd.DataFrame(
        {
            "path": [f"/pets/{label}_{number}.jpg" for number, label in enumerate(labels)],
            "label": labels,
            "split": ["valid" if number % valid_every == 0 else "train" for number in range(len(labels))],
            "target": [vocab.index(label) for label in labels],
        }
    )
    if groups is not None:
        rows["group"] = groups
    return rows


def test_every_row_of_both_splits_is_held_out_exactly_once_stratified_and_nothing_else_changes():
    rows = manifest({"Bengal": 20, "beagle": 15, "pug": 10})
    folds = fold_manifests(rows, 5, seed=3)

    assert len(folds) == 5
    held = np.stack([(fold["split"] == "valid").to_numpy() for fold in folds])
    assert (held.sum(axis=0) == 1).all()  # train rows and valid rows of the original split alike
    assert set(np.unique(np.concatenate([fold["split"] for fold in folds]))) == {"train", "valid"}
    for number, fold in enumerate(folds, start=1):
        assert fold.drop(columns=["split", FOLD_COLUMN]).equals(rows.drop(columns=["split"]))  # target unchanged
        assert (fold.loc[fold["split"] == "valid", FOLD_COLUMN] == number).all()
        # stratified: each class is 1/5 of its images in every held-out fold (20, 15, 10 divide by 5)
        held_out = fold.loc[fold["split"] == "valid", "label"].value_counts().to_dict()
        assert held_out == {"Bengal": 4, "beagle": 3, "pug": 2}
        assert set(fold.loc[fold["split"] == "train", "target"]) == {0, 1, 2}  # every class is trained on
    # seeded: the same folds again, other folds for another seed
    again = fold_manifests(rows, 5, seed=3)
    assert all(a.equals(b) for a, b in zip(folds, again, strict=True))
    other = fold_manifests(rows, 5, seed=4)
    assert not all(a["split"].equals(b["split"]) for a, b in zip(folds, other, strict=True))


def test_near_duplicate_groups_stay_in_one_fold():
    groups = list(range(40))
    groups[1] = groups[2] = groups[3] = 0  # rows 0..3 are one group of four near-duplicates
    groups[10] = 9
    rows = manifest({"Bengal": 20, "beagle": 20}, groups=groups)
    for fold in fold_manifests(rows, 4, seed=0):
        held = fold["split"] == "valid"
        assert held.iloc[[0, 1, 2, 3]].nunique() == 1 and held.iloc[[9, 10]].nunique() == 1


def test_a_class_with_fewer_images_than_folds_is_refused_naming_folds():
    with pytest.raises(InputError, match=r"^--folds 5 needs at least 5 images per class, but pug has 4: lower --folds"):
        fold_manifests(manifest({"Bengal": 20, "pug": 4}), 5, seed=0)
    assert len(fold_manifests(manifest({"Bengal": 20, "pug": 4}), 4, seed=0)) == 4


def test_held_out_probabilities_are_put_back_in_manifest_order():
    rows = manifest({"Bengal": 6, "pug": 6})
    folds = fold_manifests(rows, 3, seed=1)
    # each row's "prediction" encodes its own index, so a misplaced row shows
    expected = np.stack([np.arange(12) / 100, 1 - np.arange(12) / 100], axis=1)
    per_fold = [expected[(fold["split"] == "valid").to_numpy()] for fold in folds]
    targets = [fold.loc[fold["split"] == "valid", "target"].to_numpy() for fold in folds]

    assert np.array_equal(out_of_fold_probabilities(folds, per_fold, targets), expected)
    with pytest.raises(ValueError, match="Fold 2 has 12 rows, 4 held out, but probabilities of shape"):
        out_of_fold_probabilities(folds, [per_fold[0], per_fold[1][:3], per_fold[2]])
    with pytest.raises(ValueError, match="Fold 1's predictions were scored against other targets"):
        out_of_fold_probabilities(folds, per_fold, [1 - targets[0], targets[1], targets[2]])
    with pytest.raises(ValueError, match=r"Row \d+ is held out by [02] folds, not exactly one"):
        out_of_fold_probabilities([folds[0], folds[0], folds[2]], [per_fold[0], per_fold[0], per_fold[2]])


def test_self_confidence_is_the_probability_of_the_given_label_and_confident_contradictions_come_first():
    # 3 classes, 30 rows confidently right; rows 30..32 confidently predicted as another class than their label
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 11)
    probabilities = np.full((33, 3), 0.05)
    probabilities[np.arange(33), labels] = 0.9
    probabilities[:30] += rng.uniform(0, 0.02, size=(30, 3))
    probabilities[[10, 21, 32]] = [[0.05, 0.9, 0.05], [0.02, 0.08, 0.9], [0.85, 0.1, 0.05]]  # labels 0, 1, 2
    probabilities /= probabilities.sum(axis=1, keepdims=True)

    label_quality, is_issue, order = rank_label_issues(labels, probabilities)

    assert label_quality == pytest.approx(probabilities[np.arange(33), labels])  # closed form: p[label]
    assert np.flatnonzero(is_issue).tolist() == [10, 21, 32]
    # the flagged rows first, lowest p[label] first
    flagged = order[:3].tolist()
    assert flagged == sorted([10, 21, 32], key=lambda row: label_quality[row])
    assert sorted(order.tolist()) == list(range(33))  # every row once
    rest = label_quality[order[3:]]
    assert (np.diff(rest) >= 0).all()  # the others by rising self-confidence


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="Expected labels N and probabilities N x C"):
        rank_label_issues(np.array([0, 1]), np.ones((3, 2)) / 2)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 2\)"):
        rank_label_issues(np.array([0, 2]), np.ones((2, 2)) / 2)
