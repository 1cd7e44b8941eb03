import re

import pytest

from lib.data.labelling import (
    DEFAULT_LABEL_PATTERN,
    NoImagesError,
    UnmatchedFilesError,
    image_files,
    label_from_filename,
    label_images,
)
from tests.support.images import write_image


def test_book_pattern_labels_cats_and_dogs_greedily():
    pattern = re.compile(DEFAULT_LABEL_PATTERN)
    assert label_from_filename("Abyssinian_1.jpg", pattern) == "Abyssinian"
    assert label_from_filename("great_pyrenees_173.jpg", pattern) == "great_pyrenees"
    # (.+) is greedy: everything before the last _<digits> is the label
    assert label_from_filename("american_pit_bull_terrier_12.jpg", pattern) == "american_pit_bull_terrier"
    assert label_from_filename("no_number.jpg", pattern) is None
    assert label_from_filename("beagle_1.png", pattern) is None


def test_image_files_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    names = ["pug_3.jpg", "b/beagle_2.jpg", "a/Bengal_9.jpeg", "pug_10.JPG", "z/deep/boxer_1.png"]
    for name in reversed(names):
        write_image(tmp_path / name, (8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    write_image(tmp_path / ".hidden_1.jpg", (8, 8))
    write_image(tmp_path / ".cache" / "pug_99.jpg", (8, 8))

    found = image_files(tmp_path)

    assert found == sorted(tmp_path / n for n in names)
    assert all(".hidden" not in str(p) and ".cache" not in str(p) for p in found)


def test_label_images_builds_manifest_with_labels_sizes_and_mtimes(tmp_path):
    for name in ["Abyssinian_2.jpg", "Abyssinian_1.jpg", "beagle_1.jpg"]:
        write_image(tmp_path / name, (10, 6))

    manifest = label_images(tmp_path).manifest

    assert list(manifest["label"]) == ["Abyssinian", "Abyssinian", "beagle"]
    assert list(manifest["path"]) == sorted(
        str(tmp_path / n) for n in ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "beagle_1.jpg"]
    )
    assert list(manifest["bytes"]) == [
        (tmp_path / n).stat().st_size for n in ["Abyssinian_1.jpg", "Abyssinian_2.jpg", "beagle_1.jpg"]
    ]
    assert manifest["mtime_ns"].gt(0).all()


def test_unmatched_names_raise_with_count_and_examples(tmp_path):
    write_image(tmp_path / "pug_1.jpg", (8, 8))
    write_image(tmp_path / "IMG0001.jpg", (8, 8))
    write_image(tmp_path / "beagle.png", (8, 8))

    with pytest.raises(UnmatchedFilesError) as error:
        label_images(tmp_path)

    message = str(error.value)
    assert "2 of 3" in message and "IMG0001.jpg" in message and "beagle.png" in message
    assert "--label-pattern" in message and "--skip-unmatched" in message


def test_skip_unmatched_reports_instead_of_raising(tmp_path):
    write_image(tmp_path / "pug_1.jpg", (8, 8))
    write_image(tmp_path / "IMG0001.jpg", (8, 8))

    labelled = label_images(tmp_path, skip_unmatched=True)

    assert list(labelled.manifest["label"]) == ["pug"]
    assert labelled.unmatched == (str(tmp_path / "IMG0001.jpg"),)


def test_custom_pattern_and_bad_patterns(tmp_path):
    write_image(tmp_path / "cat.001.png", (8, 8))
    assert list(label_images(tmp_path, pattern=r"^(\w+)\.\d+").manifest["label"]) == ["cat"]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        label_images(tmp_path, pattern="(unclosed")
    with pytest.raises(ValueError, match="needs a group"):
        label_images(tmp_path, pattern=r"\d+")


def test_empty_or_missing_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.md").write_text("no images here")
    for folder in ("empty", "text"):
        with pytest.raises(NoImagesError, match=str(tmp_path / folder)):
            label_images(tmp_path / folder)
    with pytest.raises(NotADirectoryError, match="missing"):
        label_images(tmp_path / "missing")
