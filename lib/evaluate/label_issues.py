"""Out-of-fold label issues: K folds over a split manifest, their held-out probabilities, confident learning.

The training stage trains on a manifest's `train` rows and validates on its `valid` rows, so a fold is a manifest
that marks one fold `valid` and the others `train`. Trained on each in turn, K baseline models give every image a
predicted probability from a model that never saw it; cleanlab ranks the labels those probabilities contradict
(Northcutt et al., "Confident Learning", JAIR 2021; cleanlab 2.9 `cleanlab.filter.find_label_issues`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.common.errors import InputError
from lib.data.splitting import GROUP_COLUMN

FOLD_COLUMN = "fold"  # in the returned fold manifests: the held-out fold each row belongs to (1..K)


def fold_manifests(manifest: pd.DataFrame, folds: int, seed: int | None) -> list[pd.DataFrame]:
    """Return K manifests over every row of `manifest` (both splits), the k-th holding out fold k as `valid`.

    The folds are stratified by `target`, so each holds about 1/K of every class and each training side has every
    class; near-duplicates (a `group` column with a group of two or more, lib/data/duplicates.py) stay in one fold,
    as they stay on one side of the split. Rows keep their order and every other column, `target` included, with a
    `fold` column (1..K) added. Refused, naming --folds, when a class has fewer images than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if folds < 2:
        raise InputError(f"--folds {folds}: out-of-fold review needs at least 2 folds (cleanlab's default is 5).")
    rows = manifest.reset_index(drop=True)
    counts = rows["target"].value_counts()
    if counts.min() < folds:
        target = counts.idxmin()
        name = rows.loc[rows["target"] == target, "label"].iloc[0] if "label" in rows.columns else f"target {target}"
        raise InputError(
            f"--folds {folds} needs at least {folds} images per class, but {name} has {int(counts.min())}: lower "
            f"--folds to {max(int(counts.min()), 2)} or add images of that class."
        )
    targets = rows["target"].to_numpy()
    # sklearn seeds its shuffle with a 32-bit integer; a run without a seed draws one, as the random split does.
    random_state = None if seed is None else seed % 2**32
    if GROUP_COLUMN in rows.columns and rows[GROUP_COLUMN].duplicated().any():
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=random_state)
        held_out = [valid for _, valid in splitter.split(rows, targets, groups=rows[GROUP_COLUMN].to_numpy())]
    else:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
        held_out = [valid for _, valid in splitter.split(rows, targets)]
    fold_of = np.zeros(len(rows), dtype=np.int64)
    for number, valid in enumerate(held_out, start=1):
        fold_of[valid] = number
    result = []
    for number in range(1, folds + 1):
        split = np.where(fold_of == number, "valid", "train")
        result.append(rows.assign(split=split, **{FOLD_COLUMN: fold_of}))
    return result


def out_of_fold_probabilities(
    folds: Sequence[pd.DataFrame],
    probabilities: Sequence[np.ndarray],
    targets: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Assemble the N x C held-out probabilities of every row from each fold's validation predictions.

    `probabilities[k]` holds fold k's `valid` rows in manifest order (as `validation_predictions` returns them) and
    `targets[k]`, when given, the targets those predictions were scored against, checked against the fold's rows.
    Raises ValueError when the folds do not hold every row out exactly once or a fold's predictions do not match it.
    """
    if len(folds) != len(probabilities) or (targets is not None and len(targets) != len(folds)):
        raise ValueError(
            f"Got {len(folds)} folds but {len(probabilities)} sets of probabilities"
            + ("" if targets is None else f" and {len(targets)} of targets")
            + ": pass one per fold, in fold order."
        )
    count = len(folds[0])
    classes = probabilities[0].shape[1] if len(probabilities) and np.ndim(probabilities[0]) == 2 else 0
    result = np.full((count, classes), np.nan, dtype=np.float64)
    seen = np.zeros(count, dtype=np.int64)
    for number, (fold, fold_probabilities) in enumerate(zip(folds, probabilities, strict=True), start=1):
        held_out = np.flatnonzero(fold["split"].to_numpy() == "valid")
        fold_probabilities = np.asarray(fold_probabilities, dtype=np.float64)
        if len(fold) != count or fold_probabilities.shape != (len(held_out), classes):
            raise ValueError(
                f"Fold {number} has {len(fold)} rows, {len(held_out)} held out, but probabilities of shape "
                f"{fold_probabilities.shape}: expected {count} rows and ({len(held_out)}, {classes}), the predictions "
                "of that fold's validation rows."
            )
        if targets is not None and not np.array_equal(np.asarray(targets[number - 1]), fold["target"].iloc[held_out]):
            raise ValueError(
                f"Fold {number}'s predictions were scored against other targets than its validation rows': predict "
                "each fold's own manifest."
            )
        result[held_out] = fold_probabilities
        seen[held_out] += 1
    if (seen != 1).any():
        bad = int(np.flatnonzero(seen != 1)[0])
        raise ValueError(
            f"Row {bad} is held out by {int(seen[bad])} folds, not exactly one: pass the folds fold_manifests returned."
        )
    return result


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank the labels out-of-sample probabilities contradict, by confident learning (cleanlab 2.9).

    Returns (label_quality, is_issue, order): each row's self-confidence (its probability of the given label, low
    for a likely error: `cleanlab.rank.get_label_quality_scores(method="self_confidence")`), whether
    `cleanlab.filter.find_label_issues` (its default prune_by_noise_rate) flags it, and the rows to review first to
    last: the flagged ones worst first (cleanlab's self-confidence ranking), then the others by rising self-confidence.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or labels.shape != (len(probabilities),):
        raise ValueError(
            f"Expected labels N and probabilities N x C, got shapes {labels.shape} and {probabilities.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise ValueError(f"Labels must lie in [0, {probabilities.shape[1]}), got {labels.min()} to {labels.max()}.")
    label_quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    # n_jobs=1: cleanlab would otherwise start a multiprocessing pool, from a Prefect worker thread, for a job that
    # takes milliseconds at 7,390 images.
    flagged = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    is_issue = np.zeros(len(labels), dtype=bool)
    is_issue[flagged] = True
    rest = np.flatnonzero(~is_issue)
    rest = rest[np.argsort(label_quality[rest], kind="stable")]
    order = np.concatenate([np.asarray(flagged, dtype=np.int64), rest])
    return label_quality, is_issue, order
