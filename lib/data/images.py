"""Open any image file as an 8-bit RGB PIL image, the one way the pipeline reads pixels.

fastai opens items with ``Image.open`` -> ``.load()`` -> ``.convert('RGB')`` (fastai 2.8.12 ``load_image``). That
plain convert is wrong for some files the Oxford-IIIT Pet archive really contains (PNG, grayscale and CMYK
data under ``.jpg`` names, TFDS oxford_iiit_pet 4.0.0 notes): transparent pixels keep whatever colour lies
under them, and 16-bit values clip to white. The functions here keep fastai's result for ordinary RGB/L
JPEGs and fix the rest.
"""

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# EXIF tag 0x0112 (TIFF/EXIF 2.32 "Orientation"); 1 means the stored pixels are already upright.
_EXIF_ORIENTATION_TAG = 0x0112
_UPRIGHT = 1
_WHITE = (255, 255, 255)
# 65535 / 255 = 257 exactly, so 16-bit full scale lands on 8-bit full scale (0 -> 0, 65535 -> 255).
_SIXTEEN_BIT_TO_EIGHT_BIT = 257
_SIXTEEN_BIT_MAX = 65535
_INT32_MAX = 2**31 - 1
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageTooLargeError(ValueError):
    """Raised when an image has more pixels than the caller allows."""


@dataclass(frozen=True)
class ImageFacts:
    """What decoding one file found: its upright size, its original mode, and whether it had to be converted."""

    width: int
    height: int
    mode: str
    converted: bool  # the mode was not RGB, or EXIF orientation rotated the pixels

    def as_dict(self) -> dict:
        """Return the facts as a plain dict (for JSON and DataFrame rows)."""
        return asdict(self)


def open_rgb(source: Path | str | BinaryIO, *, max_pixels: int | None = None) -> Image.Image:
    """Open one image, check its size, decode it fully and return it upright in RGB (see open_rgb_with_facts)."""
    return open_rgb_with_facts(source, max_pixels=max_pixels)[0]


def open_rgb_with_facts(
    source: Path | str | BinaryIO, *, max_pixels: int | None = None
) -> tuple[Image.Image, ImageFacts]:
    """Open one image, check its size, decode it fully and return it upright in RGB, with what was found.

    Args:
        source: A path, or a binary file object such as ``io.BytesIO`` (its ``name`` attribute, when set, is
            used in error messages).
        max_pixels: Largest allowed width * height. Defaults to Pillow's ``Image.MAX_IMAGE_PIXELS``, which
            also caps it: Pillow's own decompression-bomb check runs inside ``Image.open`` whatever we pass.

    Returns:
        A new RGB image holding the first frame, rotated as its EXIF orientation says, and its ImageFacts.

    Raises:
        ImageTooLargeError: The image has more than ``max_pixels`` pixels; raised before any pixel is decoded.
        PIL.UnidentifiedImageError: Pillow does not recognise the data as an image.
        OSError: The pixel data is truncated or broken.
    """
    limit = _pixel_limit(max_pixels)
    try:
        with Image.open(source) as image:
            _check_pixel_count(image, limit, source)
            # Image.open sits on frame 0 of animated GIF/PNG/WebP files; load() decodes only that frame.
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
            converted = image.mode != "RGB" or exif_orientation(image) != _UPRIGHT
            return rgb, ImageFacts(width=rgb.width, height=rgb.height, mode=image.mode, converted=converted)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The warning only arrives here as an exception when the caller's warnings filter says "error".
        raise ImageTooLargeError(f"{_describe(source)}: {error}") from error
    except UnidentifiedImageError as error:
        # Pillow names a file object by its repr, memory address included; name every source the same way.
        raise UnidentifiedImageError(f"cannot identify image file {_describe(source)}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB without losing its content.

    Returns the image itself when it is already RGB, otherwise a new image; the input is never modified.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return _gray_to_rgb(_integer_to_uint8(np.asarray(image)))
    if image.mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(image)))
    if image.mode == "P" or image.mode in _ALPHA_MODES or image.has_transparency_data:
        return _composite_on_white(image.convert("RGBA"))
    return image.convert("RGB")  # L, 1, CMYK, YCbCr: Pillow's conversions are exact for these


def exif_orientation(image: Image.Image) -> int:
    """Return the EXIF orientation code of an opened image (1 when upright or untagged)."""
    return int(image.getexif().get(_EXIF_ORIENTATION_TAG, _UPRIGHT))


def _pixel_limit(max_pixels: int | None) -> int | None:
    """Return the effective pixel limit: the caller's, never above Pillow's own bomb limit."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is None or pillow_limit is None:
        return max_pixels if max_pixels is not None else pillow_limit
    return min(max_pixels, pillow_limit)


def _check_pixel_count(image: Image.Image, limit: int | None, source: Path | str | BinaryIO) -> None:
    """Raise ImageTooLargeError when the header's width * height exceeds the limit."""
    width, height = image.size
    if limit is not None and width * height > limit:
        pixels = width * height
        raise ImageTooLargeError(
            f"{_describe(source)}: {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels"
        )


def _describe(source: Path | str | BinaryIO) -> str:
    """Name an image source for error messages."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    return str(getattr(source, "name", "<in-memory image>"))


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Blend an RGBA image onto a white background and drop the alpha channel."""
    # A plain .convert('RGB') keeps whatever colour is stored under transparent pixels (often black or noise).
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _integer_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit (or 32-bit integer) gray values to 0-255."""
    values = values.astype(np.float64)
    # 16-bit PNGs open as I;16 or I, so "I" holding only 0..65535 is 16-bit data; anything else is full int32.
    if values.size == 0 or (values.min() >= 0 and values.max() <= _SIXTEEN_BIT_MAX):
        scaled = values / _SIXTEEN_BIT_TO_EIGHT_BIT
    else:
        scaled = np.clip(values, 0, None) * (255 / _INT32_MAX)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale float gray values to 0-255: stretch a 0..1 range, clip anything else as Pillow does."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Return an RGB image whose three channels equal the given 8-bit gray array."""
    return Image.fromarray(gray).convert("RGB")  # a 2-D uint8 array becomes mode L
