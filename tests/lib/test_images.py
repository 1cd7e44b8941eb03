"""Tests for lib.data.images: each Pillow mode becomes RGB with the right colours; oversized images are refused."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from lib.data.images import ImageTooLargeError, exif_orientation, open_rgb, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(image: Image.Image, path: Path, image_format: str, **options) -> Path:
    image.save(path, image_format, **options)
    return path


def _pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(image.getpixel(xy))


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    """A 10000x9000 bilevel PNG: 90 M pixels, just over Pillow's 89.5 M limit, yet about 11 kB on disk."""
    return _save(Image.new("1", (10000, 9000)), tmp_path_factory.mktemp("bomb") / "big.png", "PNG")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_gray_is_scaled_to_eight_bit(mode):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    if mode == "I":  # how Pillow holds 16-bit PNG data in some versions
        image = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (3, 1), values.astype(dtype).tobytes())
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert [_pixel(rgb, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_sixteen_bit_png_file_opens_scaled(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "gray16.png", "PNG")
    rgb = open_rgb(path)
    assert [_pixel(rgb, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_full_range_32_bit_integers_are_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32))
    assert [_pixel(to_rgb(image), (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_images_are_stretched_from_unit_range_or_clipped():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [_pixel(to_rgb(unit), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[-5.0, 100.0, 300.0]], dtype=np.float32))
    assert [_pixel(to_rgb(wide), (x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_transparent_pixels_become_white_not_the_colour_stored_under_them():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    rgb = to_rgb(rgba)
    assert _pixel(rgb, (0, 0)) == WHITE
    assert _pixel(rgb, (1, 0)) == (10, 20, 30)
    assert all(abs(channel - 127) <= 1 for channel in _pixel(rgb, (2, 0)))  # black at half opacity on white


def test_transparent_gray_with_alpha_becomes_white():
    la = Image.new("LA", (1, 1), (0, 0))
    assert _pixel(to_rgb(la)) == WHITE


def test_palette_colours_are_preserved_and_transparent_index_becomes_white(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 200, 30, 250, 0, 0] + [0, 0, 0] * 254)
    palette.putdata([0, 1])
    assert [_pixel(to_rgb(palette), (x, 0)) for x in range(2)] == [(10, 200, 30), (250, 0, 0)]
    path = _save(palette, tmp_path / "palette.png", "PNG", transparency=1)
    reopened = open_rgb(path)
    assert [_pixel(reopened, (x, 0)) for x in range(2)] == [(10, 200, 30), WHITE]


def test_cmyk_pure_cyan_becomes_cyan(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "cyan.jpg", "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    red, green, blue = _pixel(open_rgb(path), (8, 8))
    assert red <= 10 and green >= 245 and blue >= 245


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, (77, 77, 77)), ("1", 1, WHITE)])
def test_gray_and_bilevel_images_become_gray_rgb(mode, value, expected):
    assert _pixel(to_rgb(Image.new(mode, (2, 2), value))) == expected


def test_rgb_is_returned_as_is_and_inputs_are_never_modified():
    rgb = Image.new("RGB", (2, 2), RED)
    assert to_rgb(rgb) is rgb
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    before = rgba.tobytes()
    to_rgb(rgba)
    assert rgba.mode == "RGBA" and rgba.tobytes() == before


def test_exif_orientation_6_rotates_to_upright(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = _save(stored, tmp_path / "rotated.jpg", "JPEG", quality=95, exif=exif)
    assert exif_orientation(Image.open(path)) == 6
    upright = open_rgb(path)
    assert upright.size == (20, 40)
    red, _, blue = _pixel(upright, (10, 5))  # the stored left half ends up on top
    assert red > 200 and blue < 60


def test_untagged_image_reports_upright_orientation():
    assert exif_orientation(Image.new("RGB", (2, 2))) == 1


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    path = _save(frames[0], tmp_path / "animated.gif", "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(path), "n_frames", 1) == 2
    rgb = open_rgb(path)
    assert rgb.mode == "RGB" and _pixel(rgb) == RED


def test_open_rgb_accepts_a_file_object_and_returns_a_loaded_copy(tmp_path):
    path = _save(Image.new("RGB", (5, 3), RED), tmp_path / "red.png", "PNG")
    rgb = open_rgb(io.BytesIO(path.read_bytes()))
    assert rgb.size == (5, 3) and _pixel(rgb) == RED


def test_too_many_pixels_raise_a_value_error_naming_file_size_and_limit(tmp_path):
    path = _save(Image.new("RGB", (40, 20)), tmp_path / "Bengal_1.jpg", "JPEG")
    with pytest.raises(ImageTooLargeError) as raised:
        open_rgb(path, max_pixels=799)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert "Bengal_1.jpg" in message and "40x20" in message and "799" in message
    assert open_rgb(path, max_pixels=800).size == (40, 20)  # the limit itself is allowed


def test_size_is_refused_before_any_pixel_is_decoded(tmp_path):
    whole = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(whole, "JPEG")  # noise: the cut lands in the pixel data, not the header
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(OSError, match="image file is truncated"):
        open_rgb(truncated)
    # Decoding first would raise the truncation error; checking the header first raises ImageTooLargeError.
    with pytest.raises(ImageTooLargeError):
        open_rgb(truncated, max_pixels=100)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_default_limit_is_pillows_and_cannot_be_raised_past_it(bomb_png):
    assert Image.MAX_IMAGE_PIXELS < 10000 * 9000
    with pytest.raises(ImageTooLargeError, match="10000x9000"):
        open_rgb(bomb_png)
    with pytest.raises(ImageTooLargeError):
        open_rgb(bomb_png, max_pixels=10**12)


def test_pillows_bomb_warning_raised_as_error_becomes_image_too_large(bomb_png):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="big.png"):
            open_rgb(bomb_png)


def test_pillows_bomb_error_becomes_image_too_large(tmp_path):
    path = _save(Image.new("1", (20000, 9000)), tmp_path / "bigger.png", "PNG")  # over twice Pillow's limit
    with pytest.raises(ImageTooLargeError, match="bigger.png") as raised:
        open_rgb(path)
    assert isinstance(raised.value.__cause__, Image.DecompressionBombError)


def test_unidentified_data_names_the_source(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(UnidentifiedImageError, match="notes.jpg"):
        open_rgb(path)
    in_memory = io.BytesIO(b"not an image")
    in_memory.name = "in-memory.jpg"
    with pytest.raises(UnidentifiedImageError, match="in-memory.jpg"):
        open_rgb(in_memory)
