"""Each refusal of the label gate, on labels built by the real label sources from files written here."""

import pandas as pd
import pytest

from lib.data.label_gate import LabelGateError, check_labels, check_split
from lib.data.labelling import label_images
from lib.data.splitting import split_manifest
from lib.recipe import DataSettings
from tests.support.images import write_image


def _images(root, names):
    for name in names:
        write_image(root / name, (8, 8))
    return root


def _gate(root, settings=None, csv_path=None):
    settings = settings or DataSettings()
    labelled = label_images(root, settings, csv_path=csv_path)
    check_labels(labelled, settings)
    return labelled


def _refusal(root, settings=None, csv_path=None) -> str:
    with pytest.raises(LabelGateError) as refused:
        _gate(root, settings, csv_path)
    message = str(refused.value)
    assert "\n" not in message  # one line
    return message


def test_pets_like_names_pass(tmp_path):
    _gate(_images(tmp_path, [f"{breed}_{n}.jpg" for breed in ("Bengal", "pug") for n in range(1, 4)]))


def test_camera_names_in_class_folders_under_the_regex_are_refused_suggesting_folders(tmp_path):
    _images(tmp_path, [f"{kind}/IMG_{n:04d}.jpg" for n, kind in enumerate(["cats", "dogs"] * 4)])
    regex = DataSettings(labels="regex")

    message = _refusal(tmp_path, regex)

    assert "differ only in their folders" in message and "pass --labels folder" in message
    _gate(tmp_path)  # auto finds the class folders
    _gate(tmp_path, DataSettings(labels="folder"))


def test_one_class_is_refused(tmp_path):
    message = _refusal(_images(tmp_path, [f"IMG_{n}.jpg" for n in range(4)]))
    assert "The labels give 1 class ('IMG') for 4 images: a classifier needs at least 2" in message
    assert "--label-pattern" in message


def test_a_regex_capturing_a_counter_is_refused_as_mostly_unique(tmp_path):
    _images(tmp_path, [f"photo_{n:03d}_1.jpg" for n in range(6)] + ["photo_000_2.jpg"])
    message = _refusal(tmp_path, DataSettings(label_pattern=r"(photo_\d+)_\d.jpg$"))
    assert "5 of 6 labels occur once ('photo_001', 'photo_002', 'photo_003', ...)" in message


def test_a_class_with_one_image_is_refused_naming_it(tmp_path):
    _images(tmp_path, ["cats/1.jpg", "cats/2.jpg", "dogs/3.jpg", "dogs/4.jpg", "owls/5.jpg"])
    message = _refusal(tmp_path)
    assert "1 class has fewer than 2 images: 'owls' (1: 5.jpg)" in message
    assert "Add images of those classes, or remove them." in message


def test_too_many_unlabelled_images_are_refused_and_a_few_are_left_out(tmp_path):
    _images(tmp_path, [f"{breed}_{n}.jpg" for breed in ("Bengal", "pug") for n in range(1, 11)] + ["IMG0001.jpg"])
    labelled = _gate(tmp_path)  # 1 of 21 (4.8%) is within the default 5%
    assert len(labelled.manifest) == 20 and len(labelled.unlabelled) == 1

    message = _refusal(tmp_path, DataSettings(max_unlabelled=0.01))
    assert message.startswith("1 of 21 images (5%) got no label, more than --max-unlabelled 0.01 allows")
    assert "1 do not match the label pattern (IMG0001.jpg)" in message and "raise --max-unlabelled" in message


def test_camera_names_in_class_folders_unmatched_by_the_regex_suggest_folders(tmp_path):
    _images(tmp_path, ["cats/DSC1.jpg", "cats/DSC2.jpg", "dogs/DSC3.jpg", "dogs/DSC4.jpg"])
    message = _refusal(tmp_path, DataSettings(labels="regex"))
    assert "4 of 4 images (100%) got no label" in message and "pass --labels folder" in message


def test_a_csv_naming_missing_files_lists_the_first_twenty_and_the_count(tmp_path):
    _images(tmp_path, ["a.jpg", "b.jpg"])
    rows = ["a.jpg,cat", "b.jpg,dog"] + [f"gone{n:02d}.jpg,cat" for n in range(25)]
    csv = tmp_path / "labels.csv"
    csv.write_text("fname,label\n" + "\n".join(rows) + "\n")

    message = _refusal(tmp_path, DataSettings(labels_csv=str(csv)), csv)

    assert message.startswith("25 of 27 CSV rows (93%) got no label")
    listed = [f"gone{n:02d}.jpg" for n in range(20)]
    assert f"25 are named by the CSV but missing ({', '.join(listed)}, and 5 more)" in message
    assert "gone20.jpg" not in message


def _split(root, settings=None):
    settings = settings or DataSettings()
    labelled = _gate(root, settings)
    manifest = labelled.manifest
    return split_manifest(manifest, valid_pct=settings.valid_pct, seed=settings.seed), "is_valid" in manifest


def test_labels_found_only_in_validation_folders_are_refused(tmp_path):
    _images(tmp_path, ["train/cats/1.jpg", "train/cats/2.jpg", "train/dogs/3.jpg", "train/dogs/4.jpg"])
    _images(tmp_path, ["valid/cats/5.jpg", "valid/owls/6.jpg", "valid/owls/7.jpg"])
    split, fixed = _split(tmp_path)
    with pytest.raises(LabelGateError, match=r"1 class has images only in validation after the data's own split: "
                       r"'owls' \(2\)\. .*add training images of them"):  # fmt: skip
        check_split(split, fixed=fixed)


def test_an_empty_validation_side_is_refused(tmp_path):
    _images(tmp_path, [f"{breed}_{n}.jpg" for breed in ("Bengal", "pug") for n in range(1, 3)])
    csv = tmp_path / "labels.csv"
    csv.write_text("fname,label,is_valid\n" + "".join(f"{p.name},x{p.name[0]},False\n" for p in tmp_path.glob("*.jpg")))
    labelled = label_images(tmp_path, DataSettings(labels_csv=str(csv)), csv_path=csv)
    with pytest.raises(LabelGateError, match="The data's own split leaves no valid images .of 4.: mark some images as"):
        check_split(split_manifest(labelled.manifest), fixed=True)


def test_a_random_split_that_puts_a_whole_class_in_validation_is_refused_naming_the_seed():
    manifest = pd.DataFrame({"path": [f"/d/{n}.jpg" for n in range(12)], "label": ["a"] * 5 + ["b"] * 5 + ["c"] * 2})
    # The seeded permutation is torch's: find a seed whose validation fifth holds both images of class c.
    for seed in range(500):
        split = split_manifest(manifest, valid_pct=0.2, seed=seed)
        if not split.valid_only.empty:
            break
    assert set(split.valid_only["label"]) == {"c"}
    with pytest.raises(LabelGateError, match=r"only in validation after the random split: 'c' \(2\).*--seed"):
        check_split(split, fixed=False)


def test_missing_csv_files_within_the_share_are_named_in_the_warning(tmp_path):
    from lib.data.label_gate import unlabelled_warning

    names = [f"{kind}_{n}.jpg" for kind in ("cat", "dog") for n in range(12)]
    _images(tmp_path, names)
    csv = tmp_path / "labels.csv"
    csv.write_text("fname,label\n" + "".join(f"{name},{name[:3]}\n" for name in names) + "gone.jpg,cat\n")
    settings = DataSettings(labels_csv=str(csv))

    labelled = _gate(tmp_path, settings, csv)  # 1 of 25 rows: 4%, within 5%

    assert unlabelled_warning(labelled, settings, "left_out.csv") == (
        "1 of 25 CSV rows (4%) got no label and are left out (within --max-unlabelled 0.05): 1 are named by the CSV "
        "but missing (gone.jpg); all are listed in left_out.csv"
    )
    assert unlabelled_warning(_gate(tmp_path, DataSettings()), DataSettings(), "x") is None  # the regex labels all
