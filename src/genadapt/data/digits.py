"""`builtin:digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), upsampled.

Tiny and offline: the fastest real images for tests. Dark strokes on white, like OpenMoji.
"""

from __future__ import annotations

import numpy as np

from genadapt.data.imageset import ImageRecord, ImageSet, pixel_hash

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits(resolution: int = 32, digit: int | None = None) -> ImageSet:
    from PIL import Image
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    values = (255 - bunch.images / 16.0 * 255).round().astype(np.uint8)  # 0..16 ink -> white paper
    pixels, records = [], []
    for index, (image, target) in enumerate(zip(values, bunch.target)):
        if digit is not None and target != digit:
            continue
        big = np.asarray(Image.fromarray(image, "L").resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB"))
        pixels.append(big)
        records.append(ImageRecord(id=f"digit-{index:04d}", caption=f"a handwritten digit {WORDS[target]}", label=str(target), sha256=pixel_hash(big)))
    name = "builtin:digits" + (f"/{digit}" if digit is not None else "")
    return ImageSet(name, np.stack(pixels), records)
