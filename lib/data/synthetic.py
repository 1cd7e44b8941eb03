"""Make a small pets-like dataset: Oxford-IIIT Pet file names and layout, synthetic pictures.

Each breed gets a visual signature that a small CNN learns from scratch in about a minute on a CPU: a hue, a
pattern (plain, horizontal stripes, vertical stripes or checks) and a body shape. Every picture jitters the
position, size and colour of that body and the background, and adds noise, so a model has to learn the
signature rather than memorise pictures. The signatures survive the chapter-5 augmentations (random crops of
75% area, horizontal flips, small rotations, resizing to 64-128 px): stripes are horizontal or vertical
only, because a flip would turn a 45-degree stripe into a 135-degree one.
"""

import colorsys
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
# The convertible oddities written by odd_modes=True, in file-number order, as the Pillow mode each opens as.
# The real archive holds PNG, grayscale and CMYK data under .jpg names (TFDS oxford_iiit_pet 4.0.0 notes).
ODD_MODES: tuple[str, ...] = ("L", "CMYK", "RGBA", "P", "I;16")

_JPEG_QUALITY = 90
_PATTERNS = ("plain", "horizontal_stripes", "vertical_stripes", "checks")
_SHAPES = ("ellipse", "box", "diamond")
_HUE_SLOTS = 10  # 10 hues x 4 patterns = 40 distinct signatures >= 37 breeds
_STRIPE_PERIOD = 0.5  # in body half-widths: four stripe periods across the body
_MAX_ASPECT = 1.7  # width/height spans 1/1.7..1.7 (~0.6..1.7), like the real photos


@dataclass(frozen=True)
class _Signature:
    """What makes one breed recognisable."""

    hue: float  # 0..1 on the HSV colour wheel
    pattern: str
    shape: str


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
) -> Path:
    """Write `root/images/<breed>_<n>.jpg` pictures, Oxford-IIIT Pet style, and return the images folder."""
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
    return images_dir


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


def _write_broken_files(images_dir: Path, *, seed: int, min_side: int, max_side: int) -> None:
    """Write one file per cleaning failure: zero bytes, text, and a JPEG cut to half its bytes."""
    contents = {"empty": b"", "not_image": b"This is not an image, whatever its name says.\n"}
    buffer = io.BytesIO()
    pixels = _draw_pet(0, _FIRST_BROKEN_NUMBER, seed=seed, min_side=min_side, max_side=max_side)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=_JPEG_QUALITY)
    contents["truncated"] = buffer.getvalue()[: buffer.tell() // 2]
    for name, reason in BROKEN_FILES.items():
        (images_dir / name).write_bytes(contents[reason])
