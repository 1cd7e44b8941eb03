"""The label sanity gate: labels that cannot train an honest classifier are refused before anything trains.

Each refusal is one `LabelGateError` line naming what is wrong and the fix. Run twice by the data stage: on the
labelled images before any is decoded (`check_labels`), and on the split after cleaning (`check_split`), since
cleaning can empty a class and a split can put a class in validation alone.
"""

from __future__ import annotations

import pandas as pd

from lib.common.errors import InputError
from lib.data.labelling import MISSING_FILE, NO_MATCH, NOT_IN_CLASS_FOLDER, OUTSIDE_SPLIT_FOLDERS, LabelledImages
from lib.data.splitting import SplitManifest
from lib.recipe import DataSettings

MIN_CLASSES = 2
MIN_IMAGES_PER_CLASS = 2  # one to train on and one to validate: a class of one can only be memorised or missed
# Most labels occurring once means the labels are a unique part of each name (a camera counter, a date), not a class.
MOSTLY_UNIQUE = 0.5
MAX_LISTED = 20  # missing files listed in a refusal: enough to see the pattern
MAX_EXAMPLES = 5
SMALL_CLASS_FIX = "add images of those classes, or remove them"

UNLABELLED_REASONS = {
    NO_MATCH: "do not match the label pattern",
    NOT_IN_CLASS_FOLDER: "are not in a class folder",
    OUTSIDE_SPLIT_FOLDERS: "are outside the training and validation folders",
    MISSING_FILE: "are named by the CSV but missing",
}


class LabelGateError(InputError):
    """Labels that would train a classifier nobody should trust; the run is refused before it trains."""


def check_labels(labelled: LabelledImages, settings: DataSettings) -> None:
    """Refuse the labelled images when too many got no label, or their labels cannot make a classifier."""
    _refuse_unlabelled(labelled, settings)
    labels = labelled.manifest["label"]
    fix = source_fix(labelled, settings)
    if labelled.source == "regex":
        _refuse_folder_spanning_labels(labels, fix)
    _refuse_too_few_classes(labels, fix)
    _refuse_unique_labels(labels, fix)
    _refuse_small_classes(labels, labelled.manifest["path"], SMALL_CLASS_FIX)


def check_split(split: SplitManifest, *, fixed: bool) -> None:
    """Refuse a split with an empty side, or with a class found only in validation.

    `fixed`: the data fixed the split (a CSV's valid column, split folders) rather than the seeded random split.
    """
    sizes = split.sizes()
    everything = pd.concat([split.manifest, split.valid_only], ignore_index=True)
    how = "the data's own split" if fixed else "the random split"
    if fixed:
        empty_fix = ("mark fewer images as validation", "mark some images as validation")
    else:
        empty_fix = ("add images, or lower --valid-pct", "add images, or raise --valid-pct")
    if not split.valid_only.empty:
        counts = split.valid_only["label"].value_counts()
        listed = ", ".join(f"{label!r} ({count})" for label, count in counts.head(MAX_EXAMPLES).items())
        fix = (
            "add training images of them, or remove them from validation"
            if fixed
            else "add images of them, or change --seed or --valid-pct"
        )
        raise LabelGateError(
            f"{_classes(len(counts))} images only in validation after {how}: {listed}. A model cannot learn a "
            f"class it never trains on: {fix}."
        )
    for side, fix in zip(("train", "valid"), empty_fix, strict=True):
        if sizes[side] == 0:
            raise LabelGateError(f"{_sentence(how)} leaves no {side} images (of {len(everything)}): {fix}.")
    _refuse_too_few_classes(everything["label"], "add images of other classes")
    _refuse_small_classes(everything["label"], everything["path"], SMALL_CLASS_FIX)


def source_fix(labelled: LabelledImages, settings: DataSettings) -> str:
    """What to change when a source's labels are refused: for a regex, class folders are the likely way out."""
    if labelled.source == "regex":
        if labelled.in_class_folders:
            return "the images sit in one folder per class: pass --labels folder"
        return "fix --label-pattern (its first group is the label), or choose another --labels"
    return {
        "folder": "put each class's images in a folder of its own under the data root",
        "csv": f"fix the CSV's {settings.label_col} column (or --label-col)",
        "split-folders": "give each class a folder of its own inside the training and validation folders",
    }[labelled.source]


def _refuse_unlabelled(labelled: LabelledImages, settings: DataSettings) -> None:
    unlabelled, candidates = labelled.labelling_share
    if unlabelled <= settings.max_unlabelled * candidates:
        return
    raise LabelGateError(
        f"{describe_unlabelled(labelled)}, more than --max-unlabelled {settings.max_unlabelled:g} allows: "
        f"{_unlabelled_reasons(labelled)}. {_sentence(source_fix(labelled, settings))}, or raise --max-unlabelled to "
        "leave them out."
    )


def describe_unlabelled(labelled: LabelledImages) -> str:
    """`3 of 120 images (2%) got no label`: the share the gate bounds."""
    unlabelled, candidates = labelled.labelling_share
    what = "CSV rows" if labelled.source == "csv" else "images"
    return f"{unlabelled} of {candidates} {what} ({unlabelled / candidates:.0%}) got no label"


def unlabelled_warning(labelled: LabelledImages, settings: DataSettings, listed_in: str) -> str | None:
    """The warning for images left without a label within --max-unlabelled, naming them by reason; None if none."""
    if labelled.unlabelled.empty:
        return None
    return (
        f"{describe_unlabelled(labelled)} and are left out (within --max-unlabelled {settings.max_unlabelled:g}): "
        f"{_unlabelled_reasons(labelled)}; all are listed in {listed_in}"
    )


def _unlabelled_reasons(labelled: LabelledImages) -> str:
    """Each reason's count and examples: missing CSV files the first MAX_LISTED, the others MAX_EXAMPLES."""
    parts = []
    for reason, rows in labelled.unlabelled.groupby("reason", sort=False):
        limit = MAX_LISTED if reason == MISSING_FILE else MAX_EXAMPLES
        named = ", ".join(_short(path, labelled) for path in rows["path"].head(limit))
        more = f", and {len(rows) - limit} more" if len(rows) > limit else ""
        parts.append(f"{len(rows)} {UNLABELLED_REASONS[reason]} ({named}{more})")
    return "; ".join(parts)


def _refuse_folder_spanning_labels(labels: pd.Series, fix: str) -> None:
    """A regex whose group runs across folders (`(.+)_\\d+.jpg$` on `cats/IMG_0001.jpg` gives `cats/IMG`) has found
    the classes in the folder names by accident: the part of the file name it captured tells nothing apart."""
    with_folders = labels[labels.str.contains("/", regex=False)]
    if with_folders.empty or with_folders.str.rsplit("/", n=1).str[-1].nunique() > 1 or labels.nunique() < 2:
        return
    examples = ", ".join(repr(label) for label in sorted(set(labels))[:3])
    raise LabelGateError(
        f"The label pattern's group spans folders: the labels ({examples}, ...) differ only in their folders, and the "
        f"file-name part tells nothing apart. {_sentence(fix)}, or make the group stop at '/', e.g. "
        "'([^/]+)_\\d+.jpg$'."
    )


def _refuse_too_few_classes(labels: pd.Series, fix: str) -> None:
    classes = sorted(set(labels))
    if len(classes) < MIN_CLASSES:
        named = f" ({classes[0]!r})" if classes else ""
        raise LabelGateError(
            f"The labels give {len(classes)} class{named} for {len(labels)} images: a classifier needs at least "
            f"{MIN_CLASSES}. {_sentence(fix)}."
        )


def _refuse_unique_labels(labels: pd.Series, fix: str) -> None:
    counts = labels.value_counts()
    singles = counts[counts == 1]
    if len(counts) > MIN_CLASSES and len(singles) > MOSTLY_UNIQUE * len(counts):
        examples = ", ".join(repr(label) for label in sorted(singles.index)[:3])
        raise LabelGateError(
            f"{len(singles)} of {len(counts)} labels occur once ({examples}, ...): the labels are a unique part of "
            f"each name (a camera counter, a date), not classes. {_sentence(fix)}."
        )


def _refuse_small_classes(labels: pd.Series, paths: pd.Series, fix: str) -> None:
    counts = labels.value_counts()
    small = counts[counts < MIN_IMAGES_PER_CLASS].sort_index()
    if small.empty:
        return
    named = ", ".join(
        f"{label!r} ({count}: {', '.join(paths[labels == label].head(2).map(lambda p: str(p).rsplit('/', 1)[-1]))})"
        for label, count in small.head(MAX_EXAMPLES).items()
    )
    more = f" and {len(small) - MAX_EXAMPLES} more" if len(small) > MAX_EXAMPLES else ""
    raise LabelGateError(
        f"{_classes(len(small))} fewer than {MIN_IMAGES_PER_CLASS} images: {named}{more}; each class needs one to "
        f"train on and one to validate. {_sentence(fix)}."
    )


def _short(path: str, labelled: LabelledImages) -> str:
    """A path as the user knows it: under the data root when it is there (a missing CSV file: as the CSV wrote it)."""
    return path.removeprefix(f"{labelled.root}/")


def _classes(count: int) -> str:
    return "1 class has" if count == 1 else f"{count} classes have"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
