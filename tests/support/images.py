"""Small images written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int], color=(200, 60, 30), *, format: str = "JPEG") -> Path:
    """Write a width x height image with a solid colour and a gradient stripe, so crops are distinguishable."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[...] = color
    pixels[:, :, 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # green encodes x position
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=format, quality=95)
    return path
