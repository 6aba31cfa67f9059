"""Reading user images of any common format and mode into RGB arrays of a fixed size.

Every failure becomes a `DataError` whose message names the file and what to do, so a
folder scan can report unusable files instead of crashing or dropping them silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from genadapt.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 8
# Pillow's own default (~89 Mpx); above it we refuse rather than risk a decompression bomb.
MAX_PIXELS = 89_478_485
FIT_MODES = ("crop", "pad")


def parse_color(color: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(color)[:3]
    except ValueError:
        raise DataError(
            f"background colour {color!r} is not a colour Pillow knows; use a name like 'white' or a hex value like '#808080'"
        ) from None


def open_image(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode the first frame of an image, or raise a DataError that says why not."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror}); check that the file exists and is readable") from None
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes); delete it or replace it with the real image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            image = Image.open(path)
            image.seek(0)  # first frame of GIF/WebP/TIFF stacks
            image.load()
        except PermissionError:
            raise DataError(f"{path}: cannot read (permission denied); fix the file's permissions") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(
                f"{path}: image has more than {max_pixels:,} pixels (decompression-bomb guard); downscale it first"
            ) from None
        except UnidentifiedImageError:
            raise DataError(
                f"{path}: not an image Pillow can read (wrong extension or not an image); remove it or convert it to PNG"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{path}: truncated or corrupt image ({reason}); re-export or remove it") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    if min(image.size) < MIN_SIDE:
        raise DataError(
            f"{path}: image is {image.size[0]}x{image.size[1]}, smaller than {MIN_SIDE} px on a side; remove it or use a larger version"
        )
    return image


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale to 8 bits by range (Pillow's convert clips instead)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or values.max(initial=0) > 255:
        top = 65535.0
    else:
        top = 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any mode to RGB; transparency is composited on `background`, EXIF orientation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image).convert("RGB")
    if image.mode == "CMYK":
        return image.convert("RGB")
    return image.convert("RGB")


def fit_square(image: Image.Image, resolution: int, fit: str = "crop", background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Center-crop (`crop`) or pad with `background` (`pad`) to a square, then resize to `resolution`."""
    if fit not in FIT_MODES:
        raise DataError(f"fit {fit!r} is not one of {', '.join(FIT_MODES)}; pass --fit crop or --fit pad")
    width, height = image.size
    if fit == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    else:
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), background)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if image.size != (resolution, resolution):
        # LANCZOS for downscaling is what diffusers/kohya use by default for quality.
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def crop_top_left(width: int, height: int, resolution: int, fit: str = "crop") -> tuple[int, int]:
    """Where `fit_square`'s crop starts, in the frame of the image resized so its short side is
    `resolution`: diffusers' SDXL scripts' `crop_top_left` for a center crop; (0, 0) when padding."""
    if fit != "crop":
        return 0, 0
    scale = resolution / min(width, height)
    return max(0, round((round(height * scale) - resolution) / 2)), max(0, round((round(width * scale) - resolution) / 2))


def load_rgb(path: Path, resolution: int, fit: str = "crop", background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A user image as a uint8 HxWx3 array at `resolution`."""
    return np.asarray(fit_square(to_rgb(open_image(path), background), resolution, fit, background), dtype=np.uint8)
