"""Tests for lib.data.synthetic: Oxford-IIIT Pet naming and layout, determinism, and a real class structure."""

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
    breed_names,
    make_pets_dataset,
    odd_mode_files,
    pack_tgz,
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
