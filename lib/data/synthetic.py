"""Make small synthetic datasets: a pets-like one (Oxford-IIIT Pet file names and layout) and coloured shapes.

Each breed gets a visual signature that a small CNN learns from scratch in about a minute on a CPU: a hue, a
pattern (plain, horizontal stripes, vertical stripes or checks) and a body shape. Every picture jitters the
position, size and colour of that body and the background, and adds noise, so a model has to learn the
signature rather than memorise pictures. The signatures survive the chapter-5 augmentations (random crops of
75% area, horizontal flips, small rotations, resizing to 64-128 px): stripes are horizontal or vertical
only, because a flip would turn a 45-degree stripe into a 135-degree one.

The shapes dataset is the "own data" case: one shape in one bright colour per class, written in every layout a
user's own pictures come in (class folders, a CSV of labels, train/valid/test folders, nested folders), optionally
with the files real folders hold beside the pictures (other formats and extensions, hidden and junk files).
"""

import colorsys
import csv
import gzip
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The 37 Oxford-IIIT Pet breeds as spelled in the archive's file names: cats capitalised, dogs lower-case
# (https://www.robots.ox.ac.uk/~vgg/data/pets/, annotations/list.txt).
CAT_BREEDS: tuple[str, ...] = (
    "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
    "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
)  # fmt: skip
DOG_BREEDS: tuple[str, ...] = (
    "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
    "japanese_chin", "keeshond", "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug",
    "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip

# Broken files written by broken=True, named like real items of the first breed (always present); numbered far
# above any normal item so the names can be fixed here.
_FIRST_BROKEN_NUMBER = 9001
BROKEN_FILES: dict[str, str] = {
    f"{CAT_BREEDS[0]}_{_FIRST_BROKEN_NUMBER}.jpg": "empty",
    f"{CAT_BREEDS[0]}_{_FIRST_BROKEN_NUMBER + 1}.jpg": "not_image",
    f"{CAT_BREEDS[0]}_{_FIRST_BROKEN_NUMBER + 2}.jpg": "truncated",
}
# Near-duplicates written by duplicates=True, named like real items and numbered far above them: each is a copy of
# `<first breed>_<n>.jpg` (n = 1, 2, 3): the same bytes, the picture shrunk to 80% and saved at a lower quality, and
# the picture saved again at a lower quality under the second breed's name (a conflicting label).
_FIRST_DUPLICATE_NUMBER = 8001
DUPLICATE_KINDS = ("exact", "resized", "relabelled")
_DUPLICATE_QUALITY = 75
# The convertible oddities written by odd_modes=True, in file-number order, as the Pillow mode each opens as.
# The real archive holds PNG, grayscale and CMYK data under .jpg names (TFDS oxford_iiit_pet 4.0.0 notes).
ODD_MODES: tuple[str, ...] = ("L", "CMYK", "RGBA", "P", "I;16")

_JPEG_QUALITY = 90
_PATTERNS = ("plain", "horizontal_stripes", "vertical_stripes", "checks")
_SHAPES = ("ellipse", "box", "diamond")
_HUE_SLOTS = 10  # 10 hues x 4 patterns = 40 distinct signatures >= 37 breeds
_STRIPE_PERIOD = 0.5  # in body half-widths: four stripe periods across the body
_MAX_ASPECT = 1.7  # width/height spans 1/1.7..1.7 (~0.6..1.7), like the real photos


# Shapes: each class is one shape in one bright colour (a hue on the HSV wheel), so colour alone tells the classes
# apart; the shape is a second cue. Red, green and blue first, then the colours halfway between them.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
_SHAPE_HUES = {"circle": 0.0, "square": 1 / 3, "triangle": 2 / 3, "diamond": 1 / 6, "cross": 5 / 6, "ring": 0.5}
SHAPE_LAYOUTS: tuple[str, ...] = ("folder", "csv", "csv_valid", "split", "nested")
SHAPE_LABELS_CSV = "labels.csv"  # written at the data root by the csv layouts
_FIRST_EXTRA_NUMBER = 9001  # extras are numbered far above any normal picture, as the pets' broken files are
# The first bytes of the junk files extras=True writes: an AppleDouble header (magic 0x00051607, version 0x00020000,
# RFC 1740 section 3.1) as macOS writes in `._<name>` files on volumes without resource forks, and a .DS_Store
# header (a 1, then the magic "Bud1" of the Finder's buddy allocator).
_APPLE_DOUBLE = bytes.fromhex("00051607 00020000") + b"Mac OS X        " + bytes(64)
_DS_STORE = bytes.fromhex("00000001") + b"Bud1" + bytes(64)


@dataclass(frozen=True)
class ShapeExtra:
    """One file that make_shapes_dataset(extras=True) writes beside the first class's pictures."""

    what: str  # what the file stands for among a user's own pictures
    image_format: str | None = None  # the Pillow format of a picture; None for a file that is no picture at all
    is_item: bool = False  # a picture of the first class that a label source should list
    junk: bytes = b""  # the bytes of a file that is no picture


@dataclass(frozen=True)
class _Signature:
    """What makes one breed recognisable."""

    hue: float  # 0..1 on the HSV colour wheel
    pattern: str
    shape: str


def duplicate_files(breeds: int) -> dict[str, tuple[str, str]]:
    """Return the file names written by duplicates=True, each with the name of its original and its kind."""
    names = breed_names(breeds)
    labels = {"exact": names[0], "resized": names[0], "relabelled": names[min(1, len(names) - 1)]}
    return {
        f"{labels[kind]}_{_FIRST_DUPLICATE_NUMBER + offset}.jpg": (f"{names[0]}_{offset + 1}.jpg", kind)
        for offset, kind in enumerate(DUPLICATE_KINDS)
    }


def breed_names(count: int) -> tuple[str, ...]:
    """Return the first `count` breeds, alternating cats and dogs so both spellings appear."""
    if not 1 <= count <= len(CAT_BREEDS) + len(DOG_BREEDS):
        raise ValueError(f"breeds must be between 1 and {len(CAT_BREEDS) + len(DOG_BREEDS)}, got {count}")
    alternating = [name for pair in zip(CAT_BREEDS, DOG_BREEDS, strict=False) for name in pair]
    remaining_dogs = DOG_BREEDS[len(CAT_BREEDS) :]
    return tuple([*alternating, *remaining_dogs][:count])


def odd_mode_files(images_per_breed: int) -> dict[str, str]:
    """Return the file names written by odd_modes=True, each with the Pillow mode it opens as."""
    first = images_per_breed + 1  # continue the first breed's numbering
    return {f"{CAT_BREEDS[0]}_{first + offset}.jpg": mode for offset, mode in enumerate(ODD_MODES)}


def make_pets_dataset(
    root: Path,
    *,
    breeds: int = 6,
    images_per_breed: int = 20,
    seed: int = 0,
    min_side: int = 96,
    max_side: int = 320,
    broken: bool = False,
    odd_modes: bool = False,
    duplicates: bool = False,
) -> Path:
    """Write `root/images/<breed>_<n>.jpg` pictures, Oxford-IIIT Pet style, and return the images folder.

    duplicates: also write the near-duplicates `duplicate_files` lists (needs 2 breeds and 3 images per breed).
    """
    if duplicates and (breeds < 2 or images_per_breed < len(DUPLICATE_KINDS)):
        raise ValueError(f"duplicates=True needs at least 2 breeds and 3 images per breed, got {breeds} and "
                         f"{images_per_breed}")  # fmt: skip
    if not 1 <= images_per_breed < _FIRST_BROKEN_NUMBER - len(ODD_MODES):
        largest = _FIRST_BROKEN_NUMBER - len(ODD_MODES) - 1
        raise ValueError(f"images_per_breed must be between 1 and {largest}, got {images_per_breed}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side} and {max_side}")
    images_dir = Path(root) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for breed_index, breed in enumerate(breed_names(breeds)):
        for number in range(1, images_per_breed + 1):
            pixels = _draw_pet(breed_index, number, seed=seed, min_side=min_side, max_side=max_side)
            Image.fromarray(pixels).save(images_dir / f"{breed}_{number}.jpg", "JPEG", quality=_JPEG_QUALITY)
    if odd_modes:
        _write_odd_modes(images_dir, images_per_breed, seed=seed, min_side=min_side, max_side=max_side)
    if broken:
        _write_broken_files(images_dir, seed=seed, min_side=min_side, max_side=max_side)
    if duplicates:
        _write_duplicates(images_dir, breeds)
    return images_dir


def shape_extras(images_per_class: int, *, camera_names: bool = False) -> dict[str, ShapeExtra]:
    """Return the files written by extras=True, by name relative to the folder of `<first class>_<images_per_class>`.

    That folder, the one of the first class's last training picture, is `<class>/`, `images/`, `train/<class>/` or
    `<class>/batch<1|2>/`, by layout. The resource fork and the hidden thumbnail are named after that picture.
    """
    stems = [_shape_stem(0, number, 1, camera_names) for number in range(_FIRST_EXTRA_NUMBER, _FIRST_EXTRA_NUMBER + 5)]
    last = _shape_stem(0, images_per_class, 1, camera_names)
    return {
        f"{stems[0]}.JPG": ShapeExtra("JPEG with an upper-case extension", "JPEG", True),
        f"{stems[1]}.jpeg": ShapeExtra("JPEG with the long extension", "JPEG", True),
        f"{stems[2]}.png": ShapeExtra("PNG", "PNG", True),
        f"{stems[3]}.webp": ShapeExtra("WebP", "WEBP", True),
        f"{stems[4]}.gif": ShapeExtra("GIF", "GIF", True),
        "café noir 1.JPG": ShapeExtra("JPEG named with non-ASCII characters and spaces", "JPEG", True),
        f"._{last}.jpg": ShapeExtra("macOS resource fork (AppleDouble), not a picture", junk=_APPLE_DOUBLE),
        f".thumbnails/{last}.jpg": ShapeExtra("picture inside a hidden folder", "JPEG"),
        ".DS_Store": ShapeExtra("hidden macOS Finder file", junk=_DS_STORE),
        "notes.txt": ShapeExtra("text file", junk=b"Shapes photographed on Saturday.\n"),
    }


def make_shapes_dataset(
    root: Path,
    *,
    layout: str = "folder",
    classes: int = 3,
    images_per_class: int = 12,
    seed: int = 0,
    side: int = 64,
    valid_name: str = "valid",
    valid_fraction: float = 0.25,
    test_images: int = 0,
    camera_names: bool = False,
    extras: bool = False,
) -> Path:
    """Write `side` x `side` JPEGs of coloured shapes, one class per shape, and return the data root (`root`).

    Layouts:
        folder: `<class>/<name>`.
        csv: `images/<name>` and `labels.csv` with the columns fname (relative to root) and label.
        csv_valid: as csv, plus a column is_valid, True for the first valid_fraction of each class.
        split: `train/<class>/<name>`, `<valid_name>/<class>/<name>` with the first valid_fraction of each class,
            and with test_images > 0 also `test/<class>/<name>` with that many more pictures per class.
        nested: `<class>/batch1/<name>` for odd picture numbers, `<class>/batch2/<name>` for even ones.

    Names are `<class>_<n>.jpg` with n from 1 in each class, or with camera_names `IMG_<4-digit counter>.jpg`,
    the counter running across the whole dataset. extras=True adds the files of shape_extras(); labels.csv lists
    the pictures among them (as training pictures of the first class) but no junk.
    """
    if layout not in SHAPE_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(SHAPE_LAYOUTS)}, got {layout!r}")
    if not 1 <= classes <= len(SHAPE_CLASSES):
        raise ValueError(f"classes must be between 1 and {len(SHAPE_CLASSES)}, got {classes}")
    if test_images and layout != "split":
        raise ValueError(f"test_images needs layout='split', got layout={layout!r}")
    per_class = images_per_class + test_images
    if images_per_class < 1 or test_images < 0 or classes * per_class >= _FIRST_EXTRA_NUMBER:
        raise ValueError(f"need images_per_class >= 1, test_images >= 0 and fewer than {_FIRST_EXTRA_NUMBER} in all")
    if valid_name in ("", "train", "test") or "/" in valid_name:
        raise ValueError(f"valid_name must be a folder name other than train and test, got {valid_name!r}")
    valid_count = _valid_count(images_per_class, valid_fraction) if layout in ("csv_valid", "split") else 0
    root = Path(root)
    rows = []
    for class_index, class_name in enumerate(SHAPE_CLASSES[:classes]):
        for number in range(1, per_class + 1):
            part = "test" if number > images_per_class else "valid" if number <= valid_count else "train"
            name = _shape_stem(class_index, number, per_class, camera_names) + ".jpg"
            relative = _shape_path(layout, class_name, number, part, name, valid_name=valid_name)
            _save_shape(root / relative, "JPEG", class_index, number, seed=seed, side=side)
            rows.append((relative, class_name, part == "valid"))
    if extras:
        first_class = _shape_path(layout, SHAPE_CLASSES[0], images_per_class, "train", "", valid_name=valid_name)
        extras_dir = first_class.rstrip("/")  # the folder of the first class's last (training) picture
        for offset, (name, extra) in enumerate(shape_extras(images_per_class, camera_names=camera_names).items()):
            if extra.image_format is None:
                (root / extras_dir / name).write_bytes(extra.junk)
                continue
            # A picture of its own, drawn from a number no normal picture has.
            _save_shape(
                root / extras_dir / name, extra.image_format, 0, _FIRST_EXTRA_NUMBER + offset, seed=seed, side=side
            )
            if extra.is_item:
                rows.append((f"{extras_dir}/{name}", SHAPE_CLASSES[0], False))
    if layout in ("csv", "csv_valid"):
        with open(root / SHAPE_LABELS_CSV, "w", newline="", encoding="utf-8") as table:
            writer = csv.writer(table, lineterminator="\n")
            writer.writerow(["fname", "label", "is_valid"] if layout == "csv_valid" else ["fname", "label"])
            writer.writerows(row if layout == "csv_valid" else row[:2] for row in rows)
    return root


def pack_tgz(images_dir: Path, archive: Path, *, top_level: str = "oxford-iiit-pet") -> Path:
    """Pack an images folder into a gzip tarball laid out like the real archive: `<top_level>/images/...`."""
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    # Fixed gzip mtime, owners and member times: the same images always give the same archive bytes.
    with (
        open(partial, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w") as tar,
    ):
        tar.add(images_dir, arcname=f"{top_level}/images", filter=_anonymise_member)  # adds in sorted order
    os.replace(partial, archive)  # a crash never leaves a half-written archive under the final name
    return archive


def _anonymise_member(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Drop the owner and time of an archive member so archives are reproducible."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    member.mtime = 0
    return member


def _signature(breed_index: int) -> _Signature:
    """Give each breed index a distinct hue/pattern pair (unique for indices below 40) and a shape."""
    hue_slot, block = breed_index % _HUE_SLOTS, breed_index // _HUE_SLOTS
    # Stepping 3 slots (108 degrees) per breed puts neighbouring breeds far apart on the colour wheel.
    hue = (hue_slot * 3 % _HUE_SLOTS) / _HUE_SLOTS
    pattern = _PATTERNS[(hue_slot + 3 * block) % len(_PATTERNS)]
    return _Signature(hue=hue, pattern=pattern, shape=_SHAPES[breed_index % len(_SHAPES)])


def _draw_pet(breed_index: int, number: int, *, seed: int, min_side: int, max_side: int) -> np.ndarray:
    """Draw picture `number` of a breed as an (height, width, 3) uint8 array."""
    # One generator per picture: a picture does not change when more breeds or pictures are requested.
    rng = np.random.default_rng((seed, breed_index, number))
    width, height = _picture_size(rng, min_side=min_side, max_side=max_side)
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    canvas = _background(rng, xs / width, ys / height)
    signature = _signature(breed_index)
    body, markings = _body_masks(rng, signature, xs, ys, short_side=min(width, height))
    colour = _hsv_to_rgb(signature.hue + rng.normal(0, 0.02), rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    canvas[body] = colour
    canvas[body & markings] = colour * rng.uniform(0.2, 0.4)  # dark markings in the breed's own hue
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2.0, 10.0)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _picture_size(rng: np.random.Generator, *, min_side: int, max_side: int) -> tuple[int, int]:
    """Draw a (width, height) with both sides in [min_side, max_side] and width/height in ~0.6..1.7."""
    aspect = float(np.exp(rng.uniform(-np.log(_MAX_ASPECT), np.log(_MAX_ASPECT))))
    stretch = min(max(aspect, 1 / aspect), max_side / min_side)
    long_side = int(rng.integers(int(np.ceil(min_side * stretch)), max_side + 1))
    short_side = min(max(int(np.ceil(long_side / stretch)), min_side), long_side)
    return (long_side, short_side) if aspect >= 1 else (short_side, long_side)


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return a float (height, width, 3) background: a dull random colour under a random gradient."""
    base = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.35, 0.9))
    slope_x, slope_y = rng.uniform(-0.3, 0.3, size=2)
    shade = 1 + slope_x * (x - 0.5) + slope_y * (y - 0.5)
    return shade[..., None] * base[None, None, :]


def _body_masks(
    rng: np.random.Generator, signature: _Signature, xs: np.ndarray, ys: np.ndarray, *, short_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return boolean (height, width) masks of the body and of its markings."""
    width, height = xs.shape[1], ys.shape[0]
    # The body stays near the centre and large, so a random crop of 75% of the area keeps most of it.
    centre_x, centre_y = rng.uniform(0.4, 0.6) * width, rng.uniform(0.4, 0.6) * height
    radius = rng.uniform(0.28, 0.4) * short_side
    u = (xs - centre_x) / (radius * rng.uniform(0.85, 1.15))  # body coordinates: the body spans about -1..1
    v = (ys - centre_y) / (radius * rng.uniform(0.85, 1.15))
    if signature.shape == "ellipse":
        body = u**2 + v**2 <= 1
    elif signature.shape == "box":
        body = np.maximum(np.abs(u), np.abs(v)) <= 0.85
    else:
        body = np.abs(u) + np.abs(v) <= 1.2
    return body, _markings(signature.pattern, u + rng.uniform(0, 1), v + rng.uniform(0, 1))


def _markings(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return where a pattern is dark, given body coordinates shifted by a random phase."""
    across = (np.floor(u / (_STRIPE_PERIOD / 2)) % 2).astype(bool)  # alternates along x: vertical stripes
    down = (np.floor(v / (_STRIPE_PERIOD / 2)) % 2).astype(bool)  # alternates along y: horizontal stripes
    if pattern == "horizontal_stripes":
        return np.broadcast_to(down, (v.shape[0], u.shape[1]))
    if pattern == "vertical_stripes":
        return np.broadcast_to(across, (v.shape[0], u.shape[1]))
    if pattern == "checks":
        return across ^ down
    return np.zeros((v.shape[0], u.shape[1]), dtype=bool)


def _valid_count(images_per_class: int, valid_fraction: float) -> int:
    """Validation pictures per class: valid_fraction of them rounded, but at least one and never all."""
    if not 0 < valid_fraction < 1 or images_per_class < 2:
        raise ValueError(
            f"need 0 < valid_fraction < 1 and 2+ images per class, got {valid_fraction}, {images_per_class}"
        )
    return min(max(round(valid_fraction * images_per_class), 1), images_per_class - 1)


def _shape_stem(class_index: int, number: int, per_class: int, camera_names: bool) -> str:
    """File name without extension: `<class>_<number>`, or a camera's `IMG_<counter>` unique across classes."""
    if camera_names:
        return f"IMG_{class_index * per_class + number:04d}"
    return f"{SHAPE_CLASSES[class_index]}_{number}"


def _shape_path(layout: str, class_name: str, number: int, part: str, name: str, *, valid_name: str) -> str:
    """Where a picture goes, relative to the data root, in a layout."""
    if layout == "folder":
        return f"{class_name}/{name}"
    if layout in ("csv", "csv_valid"):
        return f"images/{name}"
    if layout == "split":
        return f"{valid_name if part == 'valid' else part}/{class_name}/{name}"
    return f"{class_name}/batch{2 - number % 2}/{name}"


def _save_shape(path: Path, image_format: str, class_index: int, number: int, *, seed: int, side: int) -> None:
    """Draw one picture of a class and save it in a Pillow format, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(_draw_shape(class_index, number, seed=seed, side=side))
    options = {"JPEG": {"quality": _JPEG_QUALITY}, "WEBP": {"lossless": True}}.get(image_format, {})
    picture.save(path, image_format, **options)


# Each mask takes body coordinates u (right) and v (down), in which the shape spans about -1..1.
_SHAPE_MASKS = {
    "circle": lambda u, v: u**2 + v**2 <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    "triangle": lambda u, v: (v <= 0.8) & (np.abs(u) <= 0.6 * (v + 0.9)),  # apex up, base 2 wide
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.15,
    "cross": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.3) & (np.maximum(np.abs(u), np.abs(v)) <= 0.95),
    "ring": lambda u, v: (u**2 + v**2 <= 1) & (u**2 + v**2 >= 0.55**2),
}


def _draw_shape(class_index: int, number: int, *, seed: int, side: int) -> np.ndarray:
    """Draw picture `number` of a shape class as a (side, side, 3) uint8 array."""
    rng = np.random.default_rng((seed, class_index, number))  # one generator per picture, as for the pets
    xs = np.arange(side, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(side, dtype=np.float32)[:, None] + 0.5
    canvas = _background(rng, xs / side, ys / side)
    centre_x, centre_y = rng.uniform(0.38, 0.62, size=2) * side
    radius = rng.uniform(0.26, 0.36) * side
    class_name = SHAPE_CLASSES[class_index]
    mask = _SHAPE_MASKS[class_name]((xs - centre_x) / radius, (ys - centre_y) / radius)
    canvas[mask] = _hsv_to_rgb(_SHAPE_HUES[class_name] + rng.normal(0, 0.015), rng.uniform(0.8, 1), rng.uniform(0.8, 1))
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2.0, 8.0)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """Return one colour as a float32 RGB array in 0..255."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _write_odd_modes(images_dir: Path, images_per_breed: int, *, seed: int, min_side: int, max_side: int) -> None:
    """Write convertible files under .jpg names: grayscale and CMYK JPEGs, RGBA, palette and 16-bit PNGs."""
    for name, mode in odd_mode_files(images_per_breed).items():
        number = int(name.rsplit("_", 1)[1].removesuffix(".jpg"))
        rgb = Image.fromarray(_draw_pet(0, number, seed=seed, min_side=min_side, max_side=max_side))
        _odd_image(rgb, mode).save(images_dir / name, "JPEG" if mode in ("L", "CMYK") else "PNG")


def _odd_image(rgb: Image.Image, mode: str) -> Image.Image:
    """Return an RGB picture re-expressed in the given Pillow mode."""
    if mode == "RGBA":
        return _cut_out(rgb)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # full 16-bit range, 255 -> 65535
        return Image.fromarray(gray)  # a 2-D uint16 array becomes mode I;16
    return rgb.convert(mode)


def _cut_out(rgb: Image.Image) -> Image.Image:
    """Make the corners outside a centred ellipse fully transparent, with black stored under them."""
    width, height = rgb.size
    x = (np.arange(width)[None, :] + 0.5) / width - 0.5
    y = (np.arange(height)[:, None] + 0.5) / height - 0.5
    opaque = (x / 0.5) ** 2 + (y / 0.5) ** 2 <= 1
    pixels = np.where(opaque[..., None], np.asarray(rgb), 0).astype(np.uint8)
    alpha = (opaque * 255).astype(np.uint8)
    return Image.fromarray(np.dstack([pixels, alpha]))  # (h, w, 4) uint8 becomes RGBA


def _write_duplicates(images_dir: Path, breeds: int) -> None:
    """Write the near-duplicates of duplicate_files: an exact copy, a shrunk re-encoding, a relabelled re-encoding."""
    for name, (original, kind) in duplicate_files(breeds).items():
        if kind == "exact":
            (images_dir / name).write_bytes((images_dir / original).read_bytes())
            continue
        with Image.open(images_dir / original) as picture:
            if kind == "resized":
                picture = picture.resize((picture.width * 4 // 5, picture.height * 4 // 5), Image.Resampling.BILINEAR)
            picture.save(images_dir / name, "JPEG", quality=_DUPLICATE_QUALITY)


def _write_broken_files(images_dir: Path, *, seed: int, min_side: int, max_side: int) -> None:
    """Write one file per cleaning failure: zero bytes, text, and a JPEG cut to half its bytes."""
    contents = {"empty": b"", "not_image": b"This is not an image, whatever its name says.\n"}
    buffer = io.BytesIO()
    pixels = _draw_pet(0, _FIRST_BROKEN_NUMBER, seed=seed, min_side=min_side, max_side=max_side)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=_JPEG_QUALITY)
    contents["truncated"] = buffer.getvalue()[: buffer.tell() // 2]
    for name, reason in BROKEN_FILES.items():
        (images_dir / name).write_bytes(contents[reason])
