"""Image grids as PNG: how people look at samples, shots and copies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def to_uint8(images) -> np.ndarray:
    """NHWC uint8 from NHWC uint8 arrays or NCHW float tensors in [-1, 1]."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return images
    array = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return array


def make_grid(images, columns: int | None = None, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), background, dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        grid[top : top + height, left : left + width] = pixels[index]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_grid(images, path: Path, columns: int | None = None, scale: int = 1) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, columns, scale=scale)).save(path)
    return path


def save_image(image, path: Path) -> Path:
    """One CHW float image in [-1, 1] as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image[None])[0]).save(path)
    return path
