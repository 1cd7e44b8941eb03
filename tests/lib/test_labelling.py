import re
from pathlib import Path

import pandas as pd
import pytest

from lib.common.errors import InputError
from lib.data.labelling import (
    HIDDEN,
    MISSING_FILE,
    NO_MATCH,
    NOT_IMAGE,
    NOT_IN_CLASS_FOLDER,
    NOT_IN_CSV,
    OUTSIDE_SPLIT_FOLDERS,
    RESOURCE_FORK,
    TEST_FOLDER,
    NoImagesError,
    label_images,
    list_images,
)
from lib.data.splitting import split_manifest
from lib.recipe import DEFAULT_LABEL_PATTERN, DataSettings
from tests.support.images import write_image


def _images(root, names):
    for name in names:
        write_image(root / name, (8, 8))


def _labels(labelled):
    """{path under the root: label} of a LabelledImages."""
    start = len(str(labelled.root)) + 1
    return {
        path[start:]: label for path, label in zip(labelled.manifest["path"], labelled.manifest["label"], strict=True)
    }


def _reasons(frame, root):
    return {
        str(path).removeprefix(f"{root}/"): reason for path, reason in zip(frame["path"], frame["reason"], strict=True)
    }


def test_book_pattern_labels_cats_and_dogs_greedily_from_the_file_name():
    pattern = re.compile(DEFAULT_LABEL_PATTERN)
    assert pattern.search("Abyssinian_1.jpg").group(1) == "Abyssinian"
    # (.+) is greedy: everything before the last _<digits> is the label
    assert pattern.search("american_pit_bull_terrier_12.jpg").group(1) == "american_pit_bull_terrier"
    assert pattern.search("beagle_1.png") is None


def test_listing_is_sorted_recursive_and_reports_what_it_skips(tmp_path):
    names = ["pug_3.jpg", "b/beagle_2.jpg", "a/Bengal_9.jpeg", "pug_10.JPG", "z/deep/boxer_1.png", "w/x.WEBP"]
    _images(tmp_path, reversed(names))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._pug_3.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    _images(tmp_path, [".hidden_1.jpg", ".cache/pug_99.jpg", "__MACOSX/._pug_3.jpg"])

    listing = list_images(tmp_path)

    assert listing.images == sorted(tmp_path / n for n in names)
    assert _reasons(pd.DataFrame(listing.skipped, columns=["path", "reason"]), tmp_path) == {
        ".cache": HIDDEN,  # a hidden folder is one entry, never walked
        ".hidden_1.jpg": HIDDEN,
        "._pug_3.jpg": RESOURCE_FORK,
        "__MACOSX": RESOURCE_FORK,
        "notes.txt": NOT_IMAGE,
    }


def test_flat_folder_is_labelled_by_the_books_regex_with_sizes_and_mtimes(tmp_path):
    _images(tmp_path, ["Abyssinian_2.jpg", "Abyssinian_1.jpg", "beagle_1.jpg"])

    labelled = label_images(tmp_path)

    assert labelled.source == "regex" and labelled.why.startswith("auto:")
    assert list(labelled.manifest["label"]) == ["Abyssinian", "Abyssinian", "beagle"]
    assert list(labelled.manifest["path"]) == sorted(
        str(tmp_path / n) for n in ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "beagle_1.jpg"]
    )
    assert list(labelled.manifest["bytes"]) == [
        (tmp_path / n).stat().st_size for n in ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "beagle_1.jpg"]
    ]
    assert labelled.manifest["mtime_ns"].gt(0).all()
    assert "is_valid" not in labelled.manifest.columns  # the split stays random


def test_regex_searches_the_path_under_the_root_and_reports_what_it_misses(tmp_path):
    _images(tmp_path, ["cats/indoor/tabby_1.jpg", "dogs/outdoor/pug_2.jpg", "dogs/IMG0001.jpg"])
    settings = DataSettings(labels="regex", label_pattern=r"^([^/]+)/")

    labelled = label_images(tmp_path, settings)

    assert _labels(labelled) == {
        "cats/indoor/tabby_1.jpg": "cats",
        "dogs/IMG0001.jpg": "dogs",
        "dogs/outdoor/pug_2.jpg": "dogs",
    }
    missed = label_images(tmp_path, DataSettings(labels="regex", label_pattern=r"/(\w+)_\d+\.jpg$"))
    assert _labels(missed) == {"cats/indoor/tabby_1.jpg": "tabby", "dogs/outdoor/pug_2.jpg": "pug"}
    assert _reasons(missed.unlabelled, tmp_path) == {"dogs/IMG0001.jpg": NO_MATCH}
    assert missed.labelling_share == (1, 3)


def test_class_folders_are_found_by_auto_whatever_the_names(tmp_path):
    names = ["cats/IMG_0001.jpg", "cats/café noir 2.JPG", "dogs/IMG_0003.jpeg", "dogs/x.png", "dogs/y.webp"]
    _images(tmp_path, names)

    labelled = label_images(tmp_path)

    assert labelled.source == "folder" and labelled.in_class_folders
    assert labelled.why == "auto: every image sits in a first-level folder"
    assert _labels(labelled) == {name: name.split("/")[0] for name in names}


def test_folder_source_labels_nested_images_by_their_first_level_folder(tmp_path):
    _images(tmp_path, ["cats/a/1.jpg", "cats/b/2.jpg", "dogs/3.jpg", "loose.jpg"])

    auto = label_images(tmp_path)  # not every image sits in a first-level folder: the regex
    labelled = label_images(tmp_path, DataSettings(labels="folder"))

    assert auto.source == "regex" and not auto.in_class_folders
    assert _labels(labelled) == {"cats/a/1.jpg": "cats", "cats/b/2.jpg": "cats", "dogs/3.jpg": "dogs"}
    assert _reasons(labelled.unlabelled, tmp_path) == {"loose.jpg": NOT_IN_CLASS_FOLDER}


@pytest.mark.parametrize("valid_name", ["valid", "val", "validation", "Val"])
def test_split_folders_fix_the_split_and_leave_the_test_folder_out(tmp_path, valid_name):
    _images(tmp_path, ["train/cats/1.jpg", "train/dogs/2.jpg", f"{valid_name}/cats/3.jpg", f"{valid_name}/dogs/4.jpg"])
    _images(tmp_path, ["test/cats/5.jpg", "test/6.jpg", "train/7.jpg", "extra/dogs/8.jpg"])

    labelled = label_images(tmp_path)

    assert labelled.source == "split-folders" and valid_name in labelled.why
    assert _labels(labelled) == {
        "train/cats/1.jpg": "cats", "train/dogs/2.jpg": "dogs",
        f"{valid_name}/cats/3.jpg": "cats", f"{valid_name}/dogs/4.jpg": "dogs",
    }  # fmt: skip
    valid = dict(zip(_labels(labelled), labelled.manifest["is_valid"], strict=True))
    assert valid == {name: name.startswith(valid_name) for name in valid}
    assert _reasons(labelled.left_out, tmp_path) == {"test/cats/5.jpg": TEST_FOLDER, "test/6.jpg": TEST_FOLDER}
    assert _reasons(labelled.unlabelled, tmp_path) == {
        "train/7.jpg": NOT_IN_CLASS_FOLDER,
        "extra/dogs/8.jpg": OUTSIDE_SPLIT_FOLDERS,
    }
    split = split_manifest(labelled.manifest)
    assert dict(zip(split.manifest["path"], split.manifest["split"], strict=True)) == {
        path: "valid" if is_valid else "train"
        for path, is_valid in zip(labelled.manifest["path"], labelled.manifest["is_valid"], strict=True)
    }


def test_split_folder_names_are_settings_and_two_validation_folders_are_refused(tmp_path):
    _images(tmp_path, ["training/a/1.jpg", "dev/a/2.jpg", "training/b/3.jpg", "dev/b/4.jpg"])
    settings = DataSettings(train_folder="training", valid_folders="dev")
    assert label_images(tmp_path, settings).source == "split-folders"
    assert label_images(tmp_path).source != "split-folders"  # the default names do not match
    with pytest.raises(InputError, match="--labels split-folders: the data root .* has no train/"):
        label_images(tmp_path, DataSettings(labels="split-folders"))

    _images(tmp_path, ["training/a/1.jpg", "val/a/5.jpg"])
    with pytest.raises(InputError, match=r"holds dev/ and val/: keep one validation folder, or name the one"):
        label_images(tmp_path, DataSettings(train_folder="training", valid_folders="dev,val"))


def _csv(path, text):
    path.write_text(text)
    return path


def test_csv_labels_files_by_path_or_by_unique_name_and_lists_what_is_missing(tmp_path):
    root = tmp_path / "data"
    _images(root, ["images/a.jpg", "images/b.jpg", "images/c.jpg", "more/d.jpg", "images/unlisted.jpg"])
    csv = _csv(tmp_path / "labels.csv", "fname,label\nimages/a.jpg,cat\nb.jpg,dog\nmore/d.jpg,dog\ngone.jpg,cat\n")

    labelled = label_images(root, DataSettings(labels_csv=str(csv)), csv_path=csv)

    assert labelled.source == "csv" and labelled.why == "auto: --labels-csv names a CSV"
    assert _labels(labelled) == {"images/a.jpg": "cat", "images/b.jpg": "dog", "more/d.jpg": "dog"}
    assert _reasons(labelled.unlabelled, root) == {"gone.jpg": MISSING_FILE}
    assert labelled.labelling_share == (1, 4)  # of the CSV's rows
    assert _reasons(labelled.left_out, root) == {"images/c.jpg": NOT_IN_CSV, "images/unlisted.jpg": NOT_IN_CSV}


def test_csv_valid_column_fixes_the_split_and_its_column_names_are_settings(tmp_path):
    _images(tmp_path, ["1.jpg", "2.jpg", "3.jpg"])
    csv = _csv(tmp_path / "train.csv", "file,breed,holdout\n1.jpg,pug,False\n2.jpg,pug,True\n3.jpg,boxer,false\n")
    settings = DataSettings(labels="csv", labels_csv=str(csv), fname_col="file", label_col="breed", valid_col="holdout")

    labelled = label_images(tmp_path, settings, csv_path=csv)

    assert list(labelled.manifest["label"]) == ["pug", "pug", "boxer"]
    assert list(labelled.manifest["is_valid"]) == [False, True, False]
    assert list(split_manifest(labelled.manifest).manifest["split"]) == ["train", "valid", "train"]


def test_one_file_spelt_two_ways_with_two_labels_is_refused(tmp_path):
    _images(tmp_path, ["images/a.jpg", "images/b.jpg"])
    csv = _csv(tmp_path / "labels.csv", "fname,label\nimages/a.jpg,cat\nimages/b.jpg,dog\na.jpg,dog\n")
    with pytest.raises(InputError, match=r"labels.csv: rows 2 and 4 both name images/a.jpg, labelled cat and dog"):
        label_images(tmp_path, DataSettings(labels_csv=str(csv)), csv_path=csv)


def test_no_images_and_missing_folders_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.md").write_text("no images here")
    for folder in ("empty", "text"):
        with pytest.raises(NoImagesError, match=str(tmp_path / folder)):
            label_images(tmp_path / folder)
    with pytest.raises(NotADirectoryError, match="missing"):
        label_images(tmp_path / "missing")


def test_csv_source_without_a_csv_is_refused_by_the_recipe():
    with pytest.raises(ValueError, match="--labels csv needs --labels-csv FILE"):
        DataSettings(labels="csv")


def test_the_data_version_follows_a_csv_label_and_a_moved_image(tmp_path):
    import hashlib

    from lib.data.digests import dataset_version

    def version(root, settings=None, csv=None):
        manifest = label_images(root, settings, csv_path=csv).manifest
        manifest["sha256"] = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in manifest["path"]]
        return dataset_version(split_manifest(manifest, seed=0).manifest)

    _images(tmp_path / "folders", ["cats/1.jpg", "cats/2.jpg", "dogs/3.jpg", "dogs/4.jpg"])
    before = version(tmp_path / "folders")
    (tmp_path / "folders" / "cats" / "2.jpg").rename(tmp_path / "folders" / "dogs" / "2.jpg")
    assert version(tmp_path / "folders") != before

    _images(tmp_path / "flat", ["1.jpg", "2.jpg", "3.jpg", "4.jpg"])
    csv = tmp_path / "labels.csv"
    settings = DataSettings(labels_csv=str(csv))
    csv.write_text("fname,label\n1.jpg,cat\n2.jpg,cat\n3.jpg,dog\n4.jpg,dog\n")
    first = version(tmp_path / "flat", settings, csv)
    csv.write_text("fname,label\n1.jpg,cat\n2.jpg,dog\n3.jpg,dog\n4.jpg,dog\n")
    assert version(tmp_path / "flat", settings, csv) != first
