"""One picture as the model sees it: short side scaled to the presize, then a square crop of the presize.

These few functions are the geometry shared by the presize cache (lib/data/presize.py), the loaders
(lib/data/loading.py), test-time augmentation and the served model (lib/serve/contract.py). They import Pillow and
torchvision alone, so the registered model can carry this file and prepare pictures exactly as validation does
wherever it is loaded.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

CENTRE = 0.5  # the crop fraction of validation: fastai's Resize crops the centre on the valid split


def presized_shape(width: int, height: int, presize: int) -> tuple[int, int]:
    """Return (width, height) scaled so the short side equals presize, the aspect ratio kept."""
    scale = presize / min(width, height)
    return max(presize, round(width * scale)), max(presize, round(height * scale))


def presize_image(image: Image.Image, presize: int) -> Image.Image:
    """Scale an image so its short side equals presize (bilinear, antialiased when shrinking, as Pillow's is).

    Pillow returns a copy when the size is already right, so a picture presized once is presized again unchanged.
    """
    return image.resize(presized_shape(*image.size, presize), Image.Resampling.BILINEAR)


def crop_offset(length: int, crop: int, fraction: float) -> int:
    """Return the start of a crop along one axis, int(fraction * (length - crop)) as fastai's Resize does."""
    return int(fraction * (length - crop))


def square_crop(image: Image.Image, size: int, fraction_x: float, fraction_y: float) -> Image.Image:
    """Cut a size x size square at the given fractions of the free room along each axis (0.5, 0.5 is the centre)."""
    width, height = image.size
    left, top = crop_offset(width, size, fraction_x), crop_offset(height, size, fraction_y)
    return image.crop((left, top, left + size, top + size))


def tensor_square_crop(pixels: torch.Tensor, size: int, fraction_x: float, fraction_y: float) -> torch.Tensor:
    """`square_crop` of a C x H x W tensor: the size x size square at the given fractions of the free room."""
    height, width = pixels.shape[1:]
    left, top = crop_offset(width, size, fraction_x), crop_offset(height, size, fraction_y)
    return pixels[:, top : top + size, left : left + size]


def validation_picture(picture: Image.Image, presize: int) -> torch.Tensor:
    """Return an upright RGB picture as the validation loader shows it: presized, centre square, uint8 3 x H x W."""
    return pil_to_tensor(square_crop(presize_image(picture, presize), presize, CENTRE, CENTRE))
