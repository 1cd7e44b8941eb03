"""Tests for lib.data.synthetic: Oxford-IIIT Pet naming and layout, the shapes layouts and extras, determinism,
and a real class structure."""

import csv
import itertools
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from lib.data.images import open_rgb
from lib.data.synthetic import (
    BROKEN_FILES,
    CAT_BREEDS,
    DOG_BREEDS,
    ODD_MODES,
    SHAPE_CLASSES,
    SHAPE_LABELS_CSV,
    SHAPE_LAYOUTS,
    breed_names,
    make_pets_dataset,
    make_shapes_dataset,
    odd_mode_files,
    pack_tgz,
    shape_extras,
)

LABEL_PATTERN = re.compile(r"(.+)_\d+.jpg$")  # the book's RegexLabeller (fastbook 05_pet_breeds.ipynb)
NUMBER_PATTERN = re.compile(r"_(\d+).jpg$")


def _label(path: Path) -> str:
    return LABEL_PATTERN.search(path.name).group(1)


def _number(path: Path) -> int:
    return int(NUMBER_PATTERN.search(path.name).group(1))


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return make_pets_dataset(tmp_path_factory.mktemp("pets"))


@pytest.fixture(scope="module")
def messy_pets(tmp_path_factory) -> Path:
    return make_pets_dataset(
        tmp_path_factory.mktemp("messy"), breeds=2, images_per_breed=4, broken=True, odd_modes=True
    )


def test_breed_lists_are_the_37_oxford_breeds_spelled_as_in_the_archive():
    assert len(CAT_BREEDS) == 12 and len(DOG_BREEDS) == 25
    assert len(set(CAT_BREEDS) | set(DOG_BREEDS)) == 37
    assert all(name[0].isupper() for name in CAT_BREEDS)
    assert all(name == name.lower() for name in DOG_BREEDS)
    assert {"Abyssinian", "British_Shorthair", "Sphynx", "great_pyrenees", "yorkshire_terrier"} <= {
        *CAT_BREEDS,
        *DOG_BREEDS,
    }


def test_breeds_alternate_cats_and_dogs_then_finish_with_dogs():
    assert breed_names(4) == ("Abyssinian", "american_bulldog", "Bengal", "american_pit_bull_terrier")
    every = breed_names(37)
    assert set(every) == {*CAT_BREEDS, *DOG_BREEDS}
    assert every[24:] == DOG_BREEDS[12:]
    for count in (0, 38):
        with pytest.raises(ValueError):
            breed_names(count)


def test_files_are_named_and_numbered_like_oxford_items(pets):
    files = sorted(pets.iterdir())
    assert pets.name == "images"
    assert len(files) == 6 * 20
    assert all(LABEL_PATTERN.search(path.name) for path in files)
    labels = {_label(path) for path in files}
    assert labels == set(breed_names(6))
    assert labels & set(CAT_BREEDS) and labels & set(DOG_BREEDS)  # both spellings appear
    for breed in labels:
        assert sorted(_number(path) for path in files if _label(path) == breed) == list(range(1, 21))


def test_pictures_are_real_rgb_jpegs(pets):
    for path in sorted(pets.iterdir())[:10]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"


def test_sizes_and_aspect_ratios_vary_within_range(pets):
    sizes = [Image.open(path).size for path in sorted(pets.iterdir())]
    sides = np.array(sizes)
    assert sides.min() >= 96 and sides.max() <= 320
    aspects = sides[:, 0] / sides[:, 1]
    assert aspects.min() >= 1 / 1.7 - 1e-9 and aspects.max() <= 1.7 + 1e-9
    assert aspects.min() < 0.8 and aspects.max() > 1.25  # portrait and landscape both occur
    assert len(set(sizes)) > len(sizes) // 2


def test_custom_side_range_is_respected(tmp_path):
    images = make_pets_dataset(tmp_path, breeds=2, images_per_breed=10, min_side=64, max_side=100)
    sides = np.array([Image.open(path).size for path in images.iterdir()])
    assert sides.min() >= 64 and sides.max() <= 100


def test_same_seed_gives_same_bytes_and_another_seed_differs(tmp_path):
    def snapshot(root: Path, seed: int) -> dict[str, bytes]:
        images = make_pets_dataset(root, breeds=3, images_per_breed=4, seed=seed)
        return {path.name: path.read_bytes() for path in images.iterdir()}

    first, again, other = (snapshot(tmp_path / name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_generation_is_fast(tmp_path):
    started = time.perf_counter()
    make_pets_dataset(tmp_path, breeds=6, images_per_breed=20)
    assert time.perf_counter() - started < 4.0  # typically ~0.5 s; per-pixel Python loops would take minutes


def _colour_and_stripe_features(path: Path) -> np.ndarray:
    """Mean colour of the central square, plus gray-level change along x and along y."""
    image = open_rgb(path)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    pixels = np.asarray(image.crop((left, top, left + side, top + side)).resize((32, 32)), dtype=np.float64)
    centre = pixels[8:24, 8:24] / 255
    gray = centre.mean(axis=-1)
    changes = [np.abs(np.diff(gray, axis=1)).mean(), np.abs(np.diff(gray, axis=0)).mean()]
    return np.concatenate([centre.reshape(-1, 3).mean(axis=0), 3 * np.array(changes)])


def _nearest_centroid_accuracy(images: Path, train_up_to: int, features: slice) -> float:
    """Fit class centroids on pictures numbered up to train_up_to; return accuracy on the rest."""
    files = sorted(images.iterdir())
    vectors = np.array([_colour_and_stripe_features(path)[features] for path in files])
    labels = np.array([_label(path) for path in files])
    is_train = np.array([_number(path) <= train_up_to for path in files])
    classes = sorted(set(labels))
    centroids = np.array([vectors[is_train & (labels == name)].mean(axis=0) for name in classes])
    distances = ((vectors[~is_train, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return float((np.array(classes)[distances.argmin(axis=1)] == labels[~is_train]).mean())


def test_six_breeds_are_separable_by_mean_colour_alone(pets):
    # Chance is 1/6; held-out pictures are the ones numbered 15..20.
    assert _nearest_centroid_accuracy(pets, train_up_to=14, features=slice(0, 3)) >= 0.9


def test_all_37_breeds_are_separable_by_colour_and_stripe_direction(tmp_path):
    images = make_pets_dataset(tmp_path, breeds=37, images_per_breed=6, max_side=160)
    # Chance is 1/37; breeds sharing a hue differ in their pattern, so colour alone is not enough here.
    assert _nearest_centroid_accuracy(images, train_up_to=4, features=slice(None)) >= 0.6


def test_broken_files_are_named_like_items_and_broken_as_listed(messy_pets):
    assert sorted(BROKEN_FILES.values()) == ["empty", "not_image", "truncated"]
    for name, reason in BROKEN_FILES.items():
        path = messy_pets / name
        assert LABEL_PATTERN.search(name)
        if reason == "empty":
            assert path.stat().st_size == 0
        elif reason == "not_image":
            with pytest.raises(UnidentifiedImageError):
                Image.open(path)
        else:
            with Image.open(path) as image, pytest.raises(OSError, match="truncated"):
                image.load()


def test_broken_files_are_absent_unless_asked_for(pets):
    assert not any((pets / name).exists() for name in BROKEN_FILES)
    assert not any((pets / name).exists() for name in odd_mode_files(20))


def test_odd_modes_continue_the_first_breeds_numbering_and_open_as_rgb(messy_pets):
    odd = odd_mode_files(4)
    assert list(odd) == [f"Abyssinian_{number}.jpg" for number in range(5, 10)]
    assert list(odd.values()) == list(ODD_MODES)
    for name, mode in odd.items():
        with Image.open(messy_pets / name) as image:
            assert image.mode == mode
            assert image.format == ("JPEG" if mode in ("L", "CMYK") else "PNG")  # PNG data under a .jpg name
            pixels = np.asarray(image)
        if mode == "I;16":
            assert pixels.max() > 255  # really uses the 16-bit range
        if mode == "RGBA":
            assert pixels[..., 3].min() == 0 and pixels[..., 3].max() == 255
        assert open_rgb(messy_pets / name).mode == "RGB"


def test_pack_tgz_lays_out_members_like_the_real_archive(messy_pets, tmp_path):
    archive = pack_tgz(messy_pets, tmp_path / "out" / "oxford-iiit-pet.tgz")
    assert archive == tmp_path / "out" / "oxford-iiit-pet.tgz"
    with tarfile.open(archive, "r:gz") as tar:
        members = [member for member in tar.getmembers() if member.isfile()]
        files = {member.name: tar.extractfile(member).read() for member in members}
    expected = {f"oxford-iiit-pet/images/{path.name}": path.read_bytes() for path in messy_pets.iterdir()}
    assert files == expected
    assert list(archive.parent.iterdir()) == [archive]  # no partial file left behind


def test_pack_tgz_is_reproducible_and_takes_a_top_level_name(tmp_path):
    images = make_pets_dataset(tmp_path, breeds=2, images_per_breed=3)
    first = pack_tgz(images, tmp_path / "first.tgz", top_level="pets")
    for path in images.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))  # same pictures, other file times
    second = pack_tgz(images, tmp_path / "second.tgz", top_level="pets")
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes()[4:8] == bytes(4)  # gzip header time (RFC 1952 MTIME) is zero
    with tarfile.open(first, "r:gz") as tar:
        assert all(name.startswith("pets/images") for name in tar.getnames())


# Shapes: two classes of four tiny pictures keep every layout test to a few milliseconds.
SHAPES = SHAPE_CLASSES[:2]
PER_CLASS = 4


def _tree(root: Path) -> set[str]:
    """Every file under root, as a path relative to root with forward slashes."""
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def _shapes(root: Path, **options) -> Path:
    return make_shapes_dataset(root, classes=len(SHAPES), images_per_class=PER_CLASS, side=16, **options)


def _csv_rows(root: Path) -> list[dict[str, str]]:
    with open(root / SHAPE_LABELS_CSV, newline="", encoding="utf-8") as table:
        return list(csv.DictReader(table))


def test_shape_classes_are_distinct_and_every_layout_is_known():
    assert SHAPE_CLASSES[:3] == ("circle", "square", "triangle") and len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert SHAPE_LAYOUTS == ("folder", "csv", "csv_valid", "split", "nested")


def test_folder_layout_is_one_folder_per_class(tmp_path):
    root = _shapes(tmp_path, layout="folder")
    assert root == tmp_path
    assert _tree(root) == {f"{c}/{c}_{n}.jpg" for c in SHAPES for n in range(1, PER_CLASS + 1)}


def test_csv_layout_is_a_flat_folder_and_a_table_of_labels(tmp_path):
    root = _shapes(tmp_path, layout="csv")
    pictures = {f"images/{c}_{n}.jpg" for c in SHAPES for n in range(1, PER_CLASS + 1)}
    assert _tree(root) == pictures | {SHAPE_LABELS_CSV}
    rows = _csv_rows(root)
    assert list(rows[0]) == ["fname", "label"]
    assert {row["fname"]: row["label"] for row in rows} == {path: path[7:].split("_")[0] for path in pictures}


def test_csv_valid_layout_marks_the_first_quarter_of_each_class_valid(tmp_path):
    root = _shapes(tmp_path, layout="csv_valid", valid_fraction=0.25)
    rows = _csv_rows(root)
    assert list(rows[0]) == ["fname", "label", "is_valid"]
    valid = {row["fname"] for row in rows if row["is_valid"] == "True"}
    assert valid == {f"images/{c}_1.jpg" for c in SHAPES}  # 0.25 of 4 pictures: the first one
    assert {row["is_valid"] for row in rows} == {"True", "False"}


def test_split_layout_has_train_valid_and_test_folders_of_classes(tmp_path):
    root = _shapes(tmp_path, layout="split", valid_name="val", valid_fraction=0.5, test_images=3)
    expected = {f"val/{c}/{c}_{n}.jpg" for c in SHAPES for n in (1, 2)}
    expected |= {f"train/{c}/{c}_{n}.jpg" for c in SHAPES for n in (3, 4)}
    expected |= {f"test/{c}/{c}_{n}.jpg" for c in SHAPES for n in (5, 6, 7)}
    assert _tree(root) == expected


def test_split_layout_without_test_images_has_no_test_folder(tmp_path):
    root = _shapes(tmp_path, layout="split")
    assert {path.name for path in root.iterdir()} == {"train", "valid"}
    assert len(list((root / "valid").rglob("*.jpg"))) == len(SHAPES)  # round(0.25 * 4) per class


def test_nested_layout_spreads_each_class_over_two_subfolders(tmp_path):
    root = _shapes(tmp_path, layout="nested")
    expected = {f"{c}/batch{1 if n % 2 else 2}/{c}_{n}.jpg" for c in SHAPES for n in range(1, PER_CLASS + 1)}
    assert _tree(root) == expected


def test_camera_names_are_one_counter_across_the_dataset_that_no_file_name_pattern_can_label(tmp_path):
    root = _shapes(tmp_path, layout="split", camera_names=True, test_images=1)
    names = [path.name for path in root.rglob("*.jpg")]
    assert len(names) == len(SHAPES) * (PER_CLASS + 1) == len(set(names))
    assert all(re.fullmatch(r"IMG_\d{4}\.jpg", name) for name in names)
    assert sorted(names) == [f"IMG_{counter:04d}.jpg" for counter in range(1, len(names) + 1)]
    assert {LABEL_PATTERN.search(name).group(1) for name in names} == {"IMG"}  # the book's regex sees one class


def test_shapes_with_the_same_seed_are_the_same_bytes_and_another_seed_differs(tmp_path):
    def snapshot(root: Path, seed: int) -> dict[str, bytes]:
        _shapes(root, layout="csv_valid", seed=seed, extras=True)
        return {name: (root / name).read_bytes() for name in _tree(root)}

    first, again, other = (snapshot(tmp_path / name, seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert first == again
    assert first.keys() == other.keys()
    junk = {f"images/{name}" for name, extra in shape_extras(PER_CLASS).items() if extra.image_format is None}
    pictures = [name for name in first if name not in junk and name != SHAPE_LABELS_CSV]
    assert len(pictures) > len(SHAPES) * PER_CLASS and all(first[name] != other[name] for name in pictures)


@pytest.mark.parametrize(
    ("layout", "folder"),
    [("folder", "circle"), ("csv", "images"), ("csv_valid", "images"), ("split", "train/circle"),
     ("nested", "circle/batch2")],
)  # fmt: skip
def test_extras_lie_beside_the_first_class_training_pictures(tmp_path, layout, folder):
    root = _shapes(tmp_path / "extras", layout=layout, extras=True)
    extras = shape_extras(PER_CLASS)
    plain = _tree(_shapes(tmp_path / "plain", layout=layout))
    assert _tree(root) - plain == {f"{folder}/{name}" for name in extras}
    assert (root / folder / f"circle_{PER_CLASS}.jpg").is_file()  # the resource fork's and thumbnail's namesake


def test_extras_include_every_kind_of_file_found_beside_own_pictures():
    names = list(shape_extras(PER_CLASS))
    suffixes = {Path(name).suffix for name in names}
    assert {".JPG", ".jpeg", ".png", ".webp", ".gif", ".txt"} <= suffixes
    assert any(not name.isascii() and " " in name for name in names)
    assert f"._circle_{PER_CLASS}.jpg" in names and ".DS_Store" in names
    assert any(name.startswith(".thumbnails/") for name in names)
    camera = list(shape_extras(PER_CLASS, camera_names=True))
    assert f"._IMG_{PER_CLASS:04d}.jpg" in camera and "IMG_9001.JPG" in camera
    assert not any("circle" in name for name in camera)


def test_extra_pictures_open_in_their_format_and_junk_is_no_picture(tmp_path):
    root = _shapes(tmp_path, layout="folder", extras=True)
    for name, extra in shape_extras(PER_CLASS).items():
        path = root / "circle" / name
        if extra.image_format is None:
            assert path.read_bytes() == extra.junk
            with pytest.raises(UnidentifiedImageError):
                Image.open(path)
        else:
            with Image.open(path) as picture:
                assert picture.format == extra.image_format and picture.size == (16, 16)
            assert open_rgb(path).mode == "RGB"
    with open(root / "circle" / f"._circle_{PER_CLASS}.jpg", "rb") as fork:
        assert fork.read(4) == bytes.fromhex("00051607")  # AppleDouble magic number (RFC 1740)


def test_csv_lists_the_extra_pictures_but_no_junk(tmp_path):
    root = _shapes(tmp_path, layout="csv_valid", extras=True)
    listed = {row["fname"]: (row["label"], row["is_valid"]) for row in _csv_rows(root)}
    items = [name for name, extra in shape_extras(PER_CLASS).items() if extra.is_item]
    assert len(listed) == len(SHAPES) * PER_CLASS + len(items)
    assert all(listed[f"images/{name}"] == ("circle", "False") for name in items)
    assert all((root / fname).is_file() for fname in listed)
    assert not any(Path(fname).name.startswith(".") or "/." in fname or fname.endswith(".txt") for fname in listed)


def _saturated_colour(path: Path) -> np.ndarray:
    """Mean RGB (0..1) of the tenth of the pixels with the most saturated colour: the shape, not the background."""
    picture = open_rgb(path)
    saturation = np.asarray(picture.convert("HSV"))[..., 1].reshape(-1)
    pixels = np.asarray(picture, dtype=np.float64).reshape(-1, 3) / 255
    return pixels[saturation >= np.quantile(saturation, 0.9)].mean(axis=0)


def test_every_shape_class_is_told_apart_by_colour_alone(tmp_path):
    root = make_shapes_dataset(tmp_path, classes=len(SHAPE_CLASSES), images_per_class=12, side=32)
    colours = {c: np.array([_saturated_colour(root / c / f"{c}_{n}.jpg") for n in range(1, 13)]) for c in SHAPE_CLASSES}
    centres = {c: values.mean(axis=0) for c, values in colours.items()}
    spread = max(np.linalg.norm(colours[c] - centres[c], axis=1).max() for c in SHAPE_CLASSES)
    apart = min(np.linalg.norm(centres[a] - centres[b]) for a, b in itertools.combinations(SHAPE_CLASSES, 2))
    # Every picture lies nearer its own class's mean colour than any other class's, with room to spare.
    assert apart > 2 * spread


def test_extra_pictures_have_the_first_class_colour(tmp_path):
    root = make_shapes_dataset(tmp_path, classes=len(SHAPE_CLASSES), images_per_class=6, side=32, extras=True)
    centres = {
        c: np.mean([_saturated_colour(root / c / f"{c}_{n}.jpg") for n in range(1, 7)], axis=0) for c in SHAPE_CLASSES
    }
    for name, extra in shape_extras(6).items():
        if extra.is_item:
            colour = _saturated_colour(root / "circle" / name)
            assert min(centres, key=lambda c: np.linalg.norm(colour - centres[c])) == "circle", name


@pytest.mark.parametrize(
    "options",
    [{"layout": "grid"}, {"classes": len(SHAPE_CLASSES) + 1}, {"layout": "folder", "test_images": 2},
     {"layout": "split", "valid_name": "train"}, {"layout": "csv_valid", "valid_fraction": 1.0}],
)  # fmt: skip
def test_shapes_reject_options_they_cannot_honour(tmp_path, options):
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, **options)
