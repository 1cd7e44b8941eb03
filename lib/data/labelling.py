"""Find the images under a data root and label each one: from a regex, its class folder, a CSV, or split folders.

The layouts are the ones people bring (lib/recipe.py `LABEL_SOURCES`):
- `regex`: fastbook ch. 5's RegexLabeller, searched in the path relative to the root (for images at the root, the
  file name, as the book's `using_attr(RegexLabeller(pat), 'name')`);
- `folder`: the first-level folder is the class, as torchvision's `ImageFolder` (fastai's `parent_label` when the
  images sit directly in it);
- `csv`: a file column and a label column, and optionally a boolean column that fixes the split (fastai's
  `ColReader` and `ColSplitter`, Kaggle's `train.csv`);
- `split-folders`: `train/<class>/` and `valid/<class>/` (or `val`, `validation`), fastai's `GrandparentSplitter`;
  a `test/` folder is counted and left out.
`auto` picks one from the layout (`choose_source`). Whatever labelled them, the images come back as one manifest;
nothing is decoded here (lib/data/cleaning.py does that), and what was left out is returned with its reason.
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import pandas as pd

from lib.common.download import redact_url
from lib.common.errors import InputError, MissingInputError, NotAFolderError
from lib.data.labels_csv import read_labels_csv
from lib.recipe import DataSettings

# Why an entry under the root is never decoded: it is hidden (a dot name, or inside a dot folder), a macOS resource
# fork (`._name` files and `__MACOSX` folders that Finder adds to zip files), or its extension is not an image's.
HIDDEN, RESOURCE_FORK, NOT_IMAGE = "hidden", "resource_fork", "not_image"
RESOURCE_FORK_FOLDERS = ("__MACOSX",)
# Why an image got no label; each counts towards the data.max_unlabelled share.
NO_MATCH, NOT_IN_CLASS_FOLDER, OUTSIDE_SPLIT_FOLDERS, MISSING_FILE = (
    "no_match", "not_in_class_folder", "outside_split_folders", "missing_file",
)  # fmt: skip
# Why a labelled or listed image is left out without counting against the labels: it is a test image, or a CSV
# source does not name it (a CSV's rows are its dataset, as fastai's ColReader reads only them).
TEST_FOLDER, NOT_IN_CSV = "test_folder", "not_in_csv"
COLUMNS = ("path", "reason")
MAX_EXAMPLES = 5


class NoImagesError(MissingInputError):
    """Raised when a data folder holds no image files."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames field by field has no single truth value
class LabelledImages:
    """The labelled images and everything under the root that was left out, with why.

    Attributes:
        manifest: one row per labelled image: path (absolute), label, bytes, mtime_ns, and is_valid (bool) where
            the source fixes the split (a CSV's valid column, split folders).
        root: the data root, resolved.
        source: the source that labelled them, one of LABEL_SOURCES.
        why: how it was chosen (`--labels folder`, or what `auto` saw).
        unlabelled: images (or a CSV's rows) that got no label: path, reason. Their share is what the label gate
            bounds (lib/data/label_gate.py).
        left_out: images left out on purpose: path, reason (TEST_FOLDER, NOT_IN_CSV).
        skipped: entries never decoded: path, reason (HIDDEN, RESOURCE_FORK, NOT_IMAGE); a hidden folder is one entry.
        in_class_folders: every image sits in a first-level folder of the root (the layout `folder` reads).
        notes: what the user should know that is not an error (e.g. a CSV's repeated rows, dropped).
    """

    manifest: pd.DataFrame
    root: Path
    source: str
    why: str
    unlabelled: pd.DataFrame
    left_out: pd.DataFrame
    skipped: pd.DataFrame
    in_class_folders: bool
    notes: tuple[str, ...] = ()

    @property
    def labelling_share(self) -> tuple[int, int]:
        """(unlabelled, candidates): how many of the images (or CSV rows) a label was looked for got none."""
        return len(self.unlabelled), len(self.unlabelled) + len(self.manifest)

    def describe(self, settings: DataSettings) -> str:
        """One line saying which source labelled the images and why: what `pets train` prints and MLflow records."""
        how = {
            "regex": f"regex {settings.label_pattern!r} over each image's path under the data root",
            "folder": "class folders (each image's first-level folder)",
            "csv": f"the CSV {redact_url(settings.labels_csv)} (columns {settings.fname_col}, {settings.label_col})",
            "split-folders": f"split folders ({settings.train_folder}/ and a validation folder, holding class folders)",
        }[self.source]
        return f"Labels from {how}: {self.why}"

    def labeller(self, settings: DataSettings) -> str:
        """The label function as the data summary's sample trace names it."""
        return {
            "regex": f"regex({settings.label_pattern!r})",
            "folder": "class_folder",
            "csv": f"csv_label({settings.label_col!r})",
            "split-folders": "split_folder_class",
        }[self.source]


@dataclass(frozen=True)
class Listing:
    """The image files under a root, sorted by path, and the entries skipped without being read."""

    root: Path
    images: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @cached_property  # read by auto's layout check and by the labeller: computed once
    def relative(self) -> list[PurePosixPath]:
        """Each image's path under the root, with forward slashes on every OS (what a regex or a CSV names)."""
        start = len(str(self.root)) + 1
        return [PurePosixPath(str(path)[start:].replace(os.sep, "/")) for path in self.images]


def image_extensions() -> frozenset[str]:
    """Return every extension the OS mime database maps to an image type, as fastai's `image_extensions`."""
    mimetypes.init()
    from_mime = {ext.lower() for ext, mime in mimetypes.types_map.items() if mime.startswith("image/")}
    # A minimal mime database must still find the common formats.
    return frozenset(from_mime | {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})


def list_images(root: Path) -> Listing:
    """List image files under root recursively, sorted by path; hidden entries, resource forks and other files are
    skipped and reported, never opened.

    fastai's `get_image_files` returns os.walk order; sorting makes the manifest, and so the split, independent of
    the filesystem. Extensions are compared in lower case (`.JPG`, `.Jpeg`).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotAFolderError(f"Data folder {root} does not exist or is not a folder: pass an existing --data-dir.")
    extensions = image_extensions()
    found, skipped = [], []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(subfolders):
            reason = RESOURCE_FORK if name in RESOURCE_FORK_FOLDERS else HIDDEN if name.startswith(".") else None
            if reason:  # one entry for the whole folder: it is never walked
                skipped.append((os.path.join(folder, name), reason))
            else:
                kept.append(name)
        subfolders[:] = kept
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith("._"):
                skipped.append((path, RESOURCE_FORK))
            elif name.startswith("."):
                skipped.append((path, HIDDEN))
            elif os.path.splitext(name)[1].lower() not in extensions:
                skipped.append((path, NOT_IMAGE))
            else:
                found.append(path)
    # Sorted by path components, as sorting Path objects does, but without building 7000 Paths to compare.
    ordered = sorted(found, key=lambda name: name.split(os.sep))
    return Listing(root=root, images=[Path(name) for name in ordered], skipped=sorted(skipped))


NO_IMAGES_FIX = {  # by the option that chose the images
    "--data-dir": "Point --data-dir at the folder that holds the images.",
    "--data-url": "Check that --data-url names an archive of images, or pass --data-dir with a folder of images.",
}


def label_images(
    root: Path, settings: DataSettings | None = None, *, csv_path: Path | None = None, option: str = "--data-dir"
) -> LabelledImages:
    """Label every image under root with the settings' label source (`auto` chooses one from the layout).

    Args:
        root: the data root, searched recursively for images.
        settings: the recipe's data settings: the source, its pattern, CSV columns and split-folder names (default:
            the recipe's defaults, `auto`).
        csv_path: the labels CSV on this machine (data.labels_csv downloaded or found), for the csv source.
        option: the option that chose the images (a key of NO_IMAGES_FIX): the fix NoImagesError suggests.

    Raises:
        NoImagesError: root holds no image files.
        InputError: the settings ask for a source the data cannot give (no CSV, no split folders, a bad CSV).
    """
    settings = settings or DataSettings()
    # Resolved once here rather than per file: the paths found below it are then absolute and canonical already.
    listing = list_images(Path(root).resolve())
    if not listing.images:
        raise NoImagesError(
            f"No image files found under {root} (searched recursively for {', '.join(sorted(image_extensions())[:8])}"
            f", ...). {NO_IMAGES_FIX[option]}"
        )
    source, why = choose_source(listing, settings)
    labels = _LABELLERS[source](listing, settings, csv_path)
    return LabelledImages(
        manifest=_manifest(labels),
        root=listing.root,
        source=source,
        why=why,
        unlabelled=_table(labels.unlabelled),
        left_out=_table(labels.left_out),
        skipped=_table(listing.skipped),
        in_class_folders=in_class_folders(listing),
        notes=labels.notes,
    )


def in_class_folders(listing: Listing) -> bool:
    """Whether every image sits directly in a first-level folder (`cats/1.jpg`; not `1.jpg`, `a/b/1.jpg`)."""
    return all(len(path.parts) == 2 for path in listing.relative)


def choose_source(listing: Listing, settings: DataSettings) -> tuple[str, str]:
    """Return the label source to use and why: the one asked for, or what `auto` makes of the layout.

    `auto` takes a CSV when one is named (naming it is asking for it), else split folders when the root holds a
    training and a validation folder, else class folders when every image sits in a first-level folder, else the
    regex (so the Oxford-IIIT Pet images, all in one folder, are labelled as the book labels them).
    """
    if settings.labels != "auto":
        return settings.labels, f"--labels {settings.labels}"
    if settings.labels_csv:
        return "csv", "auto: --labels-csv names a CSV"
    folders = split_folders(listing.root, settings)
    if folders is not None:
        return "split-folders", f"auto: the data root holds {folders.train}/ and {folders.valid}/"
    if in_class_folders(listing):
        return "folder", "auto: every image sits in a first-level folder"
    return "regex", "auto: the images are not all in first-level folders"


@dataclass(frozen=True)
class SplitFolders:
    """The names, as on disk, of the split folders under a root (the recipe's names are matched case-insensitively)."""

    train: str
    valid: str
    test: str | None


def split_folders(root: Path, settings: DataSettings) -> SplitFolders | None:
    """Find the training and validation folders under root, or None when either is missing.

    Raises:
        InputError: more than one recognised validation folder (`val/` and `valid/`): which one is meant is unclear.
    """
    folders = {child.name.lower(): child.name for child in Path(root).iterdir() if child.is_dir()}
    train = folders.get(settings.train_folder.lower())
    valid = [folders[name.lower()] for name in settings.valid_folders if name.lower() in folders]
    if train is None or not valid:
        return None
    if len(valid) > 1:
        raise InputError(
            f"The data root {root} holds {' and '.join(f'{name}/' for name in valid)}: keep one validation folder, or "
            f"name the one to use with --valid-folders {valid[0]}."
        )
    return SplitFolders(train=train, valid=valid[0], test=folders.get(settings.test_folder.lower()))


@dataclass(frozen=True)
class _Labels:
    """What one source made of a listing."""

    labelled: list[tuple[Path, str]]
    unlabelled: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    is_valid: list[bool] | None = None
    notes: tuple[str, ...] = ()


def _by_regex(listing: Listing, settings: DataSettings, csv_path: Path | None) -> _Labels:
    pattern = re.compile(settings.label_pattern)  # the recipe checked it compiles and has a group
    labelled, unlabelled = [], []
    for path, relative in zip(listing.images, listing.relative, strict=True):
        match = pattern.search(str(relative))
        label = match.group(1) if match else None
        if label:
            labelled.append((path, label))
        else:
            unlabelled.append((str(path), NO_MATCH))
    return _Labels(labelled=labelled, unlabelled=unlabelled)


def _by_folder(listing: Listing, settings: DataSettings, csv_path: Path | None) -> _Labels:
    labelled, unlabelled = [], []
    for path, relative in zip(listing.images, listing.relative, strict=True):
        if len(relative.parts) >= 2:
            labelled.append((path, relative.parts[0]))
        else:
            unlabelled.append((str(path), NOT_IN_CLASS_FOLDER))
    return _Labels(labelled=labelled, unlabelled=unlabelled)


def _by_split_folders(listing: Listing, settings: DataSettings, csv_path: Path | None) -> _Labels:
    folders = split_folders(listing.root, settings)
    if folders is None:
        raise InputError(
            f"--labels split-folders: the data root {listing.root} has no {settings.train_folder}/ folder beside one "
            f"of {', '.join(f'{name}/' for name in settings.valid_folders)}. Name yours with --train-folder and "
            "--valid-folders, or choose another --labels."
        )
    splits = {folders.train: False, folders.valid: True}
    labelled, unlabelled, left_out, is_valid = [], [], [], []
    for path, relative in zip(listing.images, listing.relative, strict=True):
        top = relative.parts[0]
        if top == folders.test:
            left_out.append((str(path), TEST_FOLDER))
        elif top not in splits or len(relative.parts) < 2:  # another folder, or an image at the root
            unlabelled.append((str(path), OUTSIDE_SPLIT_FOLDERS))
        elif len(relative.parts) < 3:  # train/1.jpg: no class folder
            unlabelled.append((str(path), NOT_IN_CLASS_FOLDER))
        else:
            labelled.append((path, relative.parts[1]))
            is_valid.append(splits[top])
    return _Labels(labelled=labelled, unlabelled=unlabelled, left_out=left_out, is_valid=is_valid)


def _by_csv(listing: Listing, settings: DataSettings, csv_path: Path | None) -> _Labels:
    if csv_path is None:
        raise InputError("--labels csv needs the CSV of file names and labels: pass --labels-csv FILE (or a URL).")
    rows = read_labels_csv(
        csv_path, fname_col=settings.fname_col, label_col=settings.label_col, valid_col=settings.valid_col
    )
    table = rows.table
    images = {str(path): path for path in listing.images}
    by_name = _unique_names(listing.images)
    labelled, unlabelled, is_valid, used = [], [], [], {}
    fixed = "is_valid" in table.columns
    for index, (fname, label, row) in enumerate(zip(table["fname"], table["label"], table["row"], strict=True)):
        path = _csv_file((Path(csv_path).resolve().parent, listing.root), fname, images, by_name)
        if path is None:
            unlabelled.append((fname, MISSING_FILE))
            continue
        if str(path) in used:  # two spellings of one file: `a.jpg` and `images/a.jpg`
            first_row, first_label = used[str(path)]
            if first_label != label:
                raise InputError(
                    f"{csv_path}: rows {first_row} and {row} both name {path.relative_to(listing.root)}, labelled "
                    f"{first_label} and {label}; keep one."
                )
            continue
        used[str(path)] = (row, label)
        labelled.append((path, label))
        if fixed:
            is_valid.append(bool(table["is_valid"].iat[index]))
    left_out = [(str(path), NOT_IN_CSV) for path in listing.images if str(path) not in used]
    notes = (f"{csv_path}: {rows.duplicates} repeated rows dropped",) if rows.duplicates else ()
    return _Labels(labelled, unlabelled, left_out, is_valid if fixed else None, notes)


def _csv_file(
    folders: tuple[Path, ...], fname: str, images: dict[str, Path], by_name: dict[str, Path | None]
) -> Path | None:
    """The listed image a CSV's file name means: its path under the CSV's folder or the data root (or an absolute
    path), else the one image with that file name anywhere under the root (Kaggle's CSVs name files without their
    folder)."""
    if os.path.isabs(fname):
        candidates = [os.path.normpath(fname)]
    else:
        candidates = [os.path.normpath(Path(folder) / PurePosixPath(fname)) for folder in folders]
    for candidate in candidates:
        if candidate in images:
            return images[candidate]
    for candidate in candidates:
        if Path(candidate).is_file():  # named by the CSV though not an image by its extension: cleaning reports it
            return Path(candidate)
    return by_name.get(PurePosixPath(fname).name)


def _unique_names(paths: list[Path]) -> dict[str, Path | None]:
    """File name -> the image with that name, for names only one image under the root has."""
    counts = Counter(path.name for path in paths)
    return {path.name: path for path in paths if counts[path.name] == 1}


_LABELLERS = {"regex": _by_regex, "folder": _by_folder, "csv": _by_csv, "split-folders": _by_split_folders}


def _manifest(labels: _Labels) -> pd.DataFrame:
    """One row per labelled image; size and mtime make the manifest change when a file does (caches key on it)."""
    stats = [path.stat() for path, _ in labels.labelled]
    manifest = pd.DataFrame(
        {
            "path": [str(path) for path, _ in labels.labelled],
            "label": [label for _, label in labels.labelled],
            "bytes": pd.Series([stat.st_size for stat in stats], dtype="int64"),
            "mtime_ns": pd.Series([stat.st_mtime_ns for stat in stats], dtype="int64"),
        }
    )
    if labels.is_valid is not None:
        manifest["is_valid"] = pd.Series(labels.is_valid, dtype=bool)
    return manifest


def _table(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))
