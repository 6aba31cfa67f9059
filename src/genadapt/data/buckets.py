"""Training sizes: the resolution a run trains at, aspect-ratio buckets for non-square photos, center or random crops.

Aspect-ratio bucketing (kohya-ss/sd-scripts, after NovelAI): instead of cropping every photo to a square, each
image trains at the bucket whose aspect ratio is nearest its own. Buckets are kohya's: sides that are multiples of
`step` pixels (the base's latent factor: VAE factor x the UNet's downsampling, 64 px for SD 1.x/2.x), area about
resolution^2 (the square bucket, and for each width w from min to max the largest height h <= resolution^2 / w), both
orientations. An image goes to exactly one bucket, the nearest in log aspect ratio (so a photo and its transpose
get transposed buckets; kohya compares w/h itself); it is resized (LANCZOS) to cover the bucket and cropped to it,
at the center or, with --random-crop, at a position drawn every step. Within the buckets' range of aspect ratios
the crop removes at most `aspect_tolerance(buckets)` in log aspect ratio (half the widest gap between neighbouring
buckets); a more extreme image is cropped to the most extreme bucket, and the run says so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from genadapt.errors import UserError


def latent_step(model) -> int:
    """Pixels per step of a valid training side: the VAE factor times the UNet's total downsampling."""
    downsamples = 2 ** (len(model.unet.config.block_out_channels) - 1)
    return int(model.pipeline.vae_scale_factor) * downsamples


def round_to(value: int, step: int, up: bool = False) -> int:
    return max(step, (math.ceil(value / step) if up else value // step) * step)


def bucket_resolutions(resolution: int, step: int, min_reso: int, max_reso: int) -> list[tuple[int, int]]:
    """kohya's `make_bucket_resolutions`: (width, height) pairs, ordered by aspect ratio (w / h)."""
    area = resolution * resolution
    buckets = {(round_to(int(math.sqrt(area)), step),) * 2}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((area // width) // step) * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def log_aspect(width: float, height: float) -> float:
    return math.log(width / height)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket nearest in log aspect ratio (the first of equals)."""
    target = log_aspect(width, height)
    errors = [abs(log_aspect(w, h) - target) for w, h in buckets]
    return int(np.argmin(errors))


def aspect_tolerance(buckets: list[tuple[int, int]]) -> float:
    """The most log aspect ratio a crop removes from an image whose aspect lies within the buckets' range."""
    ratios = sorted({log_aspect(w, h) for w, h in buckets})
    return max((b - a) / 2 for a, b in zip(ratios, ratios[1:])) if len(ratios) > 1 else 0.0


def in_range(width: int, height: int, buckets: list[tuple[int, int]]) -> bool:
    ratios = [log_aspect(w, h) for w, h in buckets]
    return min(ratios) - 1e-12 <= log_aspect(width, height) <= max(ratios) + 1e-12


@dataclass
class Fitted:
    """One image fitted to its bucket; sizes are (height, width), as SDXL's conditioning records them."""

    source: int  # index in the ImageSet
    original: tuple[int, int]  # before any resizing
    resized: tuple[int, int]  # resized to cover the bucket
    bucket: tuple[int, int]  # what it trains at
    crop: tuple[int, int]  # (top, left) of the center crop in the resized frame
    pixels: np.ndarray  # uint8, the resized image (resized[0] x resized[1] x 3)

    def center(self) -> np.ndarray:
        top, left = self.crop
        return self.pixels[top:top + self.bucket[0], left:left + self.bucket[1]]

    @property
    def room(self) -> tuple[int, int]:
        """How far a random crop can move: top in [0, room[0]], left in [0, room[1]]."""
        return self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]


def fit(image: Image.Image, source: int, bucket_wh: tuple[int, int]) -> Fitted:
    """Resize `image` (LANCZOS) so that it covers the bucket, keeping its aspect ratio; the crop is centered."""
    width, height = image.size
    bw, bh = bucket_wh
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    resized = image if (rw, rh) == (width, height) else image.resize((rw, rh), Image.Resampling.LANCZOS)
    crop = ((rh - bh) // 2, (rw - bw) // 2)
    return Fitted(source, (height, width), (rh, rw), (bh, bw), crop, np.asarray(resized.convert("RGB"), dtype=np.uint8))


def source_images(images, data: str, background: str) -> list[Image.Image]:
    """Each image of the set at its own size before fitting: the file again for a folder, the rendered pixels for a
    built-in set (rendered square at the resolution)."""
    from genadapt.data import parse_spec
    from genadapt.data.images import open_image, parse_color, to_rgb

    spec = parse_spec(data)
    if spec.is_builtin:
        return [Image.fromarray(pixels) for pixels in images.pixels]
    folder, colour = Path(spec.source), parse_color(background)
    return [to_rgb(open_image(folder / record.id), colour) for record in images.records]


def plan(natives: list[Image.Image], resolution: int, step: int, enable_bucket: bool,
         min_reso: int | None, max_reso: int | None) -> tuple[list[tuple[int, int]], list[Fitted]]:
    """The buckets (width, height) and every image fitted to exactly one of them."""
    if enable_bucket:
        low, high = bucket_range(resolution, step, min_reso, max_reso)
        buckets = bucket_resolutions(resolution, step, low, high)
    else:
        buckets = [(resolution, resolution)]
    fitted = [fit(image, i, buckets[nearest_bucket(*image.size, buckets)]) for i, image in enumerate(natives)]
    return buckets, fitted


def bucket_range(resolution: int, step: int, min_reso: int | None, max_reso: int | None) -> tuple[int, int]:
    """--min/--max-bucket-reso, by default half and twice the resolution, on the step grid."""
    low = min_reso if min_reso is not None else round_to(resolution // 2, step)
    high = max_reso if max_reso is not None else round_to(resolution * 2, step)
    return low, high


def resize_notes(fitted: list[Fitted], buckets: list[tuple[int, int]], random_crop: bool) -> list[str]:
    """One line per distinct (original size, treatment): what the run does to the images before training."""
    lines = Counter()
    for item in fitted:
        (oh, ow), (rh, rw), (bh, bw) = item.original, item.resized, item.bucket
        if (oh, ow) == (bh, bw):
            continue
        parts = []
        if (rh, rw) != (oh, ow):
            parts.append(f"resized to {rw}x{rh}")
        if (rh, rw) != (bh, bw):
            parts.append(f"cropped at random (every step) to {bw}x{bh}" if random_crop else f"center-cropped to {bw}x{bh}")
        if len(buckets) > 1 and not in_range(ow, oh, buckets):
            parts.append("(wider or taller than every bucket)")
        lines[f"{ow}x{oh}: " + ", ".join(parts)] += 1
    return [f"{count} image(s) of {text}" for text, count in lines.items()]


def square_notes(records, resolution: int, fit_mode: str) -> list[str]:
    """The same, for images fitted square by the loader (--fit crop or pad, then resized)."""
    lines = Counter()
    for record in records:
        if record.original_size is None or tuple(record.original_size) == (resolution, resolution):
            continue
        height, width = record.original_size
        parts = []
        if width != height:
            side = min(width, height) if fit_mode == "crop" else max(width, height)
            parts.append(f"center-cropped to {side}x{side}" if fit_mode == "crop" else f"padded to {side}x{side}")
        else:
            side = width
        if side != resolution:
            parts.append(f"resized to {resolution}x{resolution}")
        lines[f"{width}x{height}: " + ", ".join(parts)] += 1
    return [f"{count} image(s) of {text}" for text, count in lines.items()]


def check_resolution(resolution: int, step: int, base: str) -> None:
    if resolution % step:
        raise UserError(f"--resolution {resolution}: this base ({base}) trains at multiples of {step} px (its VAE factor times the UNet's "
                        f"downsampling); use {round_to(resolution, step)} or {round_to(resolution, step, up=True)}")


def check_bucket_settings(config, resolution: int, step: int) -> tuple[int, int, int]:
    """The bucket step and range a run uses, checked against the base's latent factor."""
    bucket_step = config.bucket_reso_steps or step
    if bucket_step % step:
        raise UserError(f"--bucket-reso-steps {bucket_step}: bucket sides must stay multiples of this base's {step} px; use a multiple of {step}")
    low, high = bucket_range(resolution, bucket_step, config.min_bucket_reso, config.max_bucket_reso)
    for name, value in (("--min-bucket-reso", low), ("--max-bucket-reso", high)):
        if value % bucket_step:
            raise UserError(f"{name} {value}: must be a multiple of the bucket step ({bucket_step} px)")
    return bucket_step, low, high


def check_data_settings(config, family: str) -> None:
    """Data settings that contradict each other, refused before the run starts (diffusion runs only read them)."""
    if family != "diffusion":
        return
    augment = (config.augment or "none").strip().lower().partition(":")[0]
    if config.center_crop and config.random_crop:
        raise UserError("--center-crop and --random-crop: give one of them (the default is a center crop)")
    for flag, given in (("--center-crop", config.center_crop), ("--random-crop", config.random_crop), ("--enable-bucket", config.enable_bucket)):
        if given and config.fit == "pad":
            raise UserError(f"{flag} crops images to their training size; --fit pad pads them instead: drop one of them")
    if config.random_crop and augment == "diffaugment":
        raise UserError("--random-crop encodes a new crop every step, --augment diffaugment caches augmented variants of fixed crops: use one of them")
    if config.random_flip and augment == "diffaugment":
        raise UserError("--random-flip is --augment flip; DiffAugment's cached variants are not flipped: use --augment flip or --augment diffaugment")
    if config.keep_tokens and not config.shuffle_caption:
        raise UserError("--keep-tokens applies with --shuffle-caption (the tags kept in place while the others are shuffled); add --shuffle-caption")
    if config.instance_prompt is not None and config.caption is not None:
        raise UserError("--instance-prompt replaces every caption, --caption fills only images without one: give one of them")
    if not config.enable_bucket:
        for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(config, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} applies with --enable-bucket; add --enable-bucket or drop it")
    elif config.min_bucket_reso is not None and config.max_bucket_reso is not None and config.min_bucket_reso > config.max_bucket_reso:
        raise UserError(f"--min-bucket-reso {config.min_bucket_reso} is above --max-bucket-reso {config.max_bucket_reso}")
