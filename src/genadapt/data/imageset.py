"""An in-memory image set: uint8 pixels, captions, labels and provenance.

Few-shot sets are small, so holding them as one array is simpler and faster than a
streaming dataset, and lets every run hash exactly what it trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from genadapt.errors import DataError


@dataclass(frozen=True)
class ImageRecord:
    id: str  # file path relative to the data folder, or a built-in item's id
    caption: str = ""
    label: str = ""
    sha256: str = ""  # of the source file bytes (user data) or of the rendered pixels (built-in)
    # SDXL's micro-conditioning (Podell et al. 2023 §2.2): the file's (height, width) before fitting and
    # the crop's (top, left) at training scale; None for built-in images, which are rendered at size.
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)

    def __post_init__(self):  # JSON (caches, manifests) hands back lists; records stay hashable and comparable
        if self.original_size is not None:
            object.__setattr__(self, "original_size", tuple(self.original_size))
        object.__setattr__(self, "crop_top_left", tuple(self.crop_top_left))


@dataclass
class ImageSet:
    name: str  # the spec it was loaded from, e.g. a folder or builtin:openmoji/flags
    pixels: np.ndarray  # uint8, N x H x W x 3, RGB
    records: list[ImageRecord]
    skipped: list[str] = field(default_factory=list)  # one-line reasons for unusable files

    def __post_init__(self) -> None:
        if len(self.records) != len(self.pixels):
            raise ValueError("one record per image is required")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def captions(self) -> list[str]:
        return [record.caption for record in self.records]

    def subset(self, indices, name: str | None = None) -> "ImageSet":
        indices = list(indices)
        return ImageSet(name or self.name, self.pixels[indices], [self.records[i] for i in indices], list(self.skipped))

    def with_captions(self, caption: str) -> "ImageSet":
        """The same images, every caption replaced (e.g. a textual-inversion prompt)."""
        records = [dataclasses.replace(r, caption=caption) for r in self.records]
        return ImageSet(self.name, self.pixels, records, list(self.skipped))

    def tensors(self):
        """Float NCHW tensor in [-1, 1] (the project convention)."""
        import torch

        return torch.from_numpy(self.pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def manifest(self) -> dict:
        """What a run folder records about its data: every item with hash and caption."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(record.sha256.encode())
        return {
            "name": self.name,
            "count": len(self),
            "resolution": self.resolution,
            "sha256": digest.hexdigest(),
            "items": [record.__dict__ for record in self.records],
            "skipped": self.skipped,
        }


def pixel_hash(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def select_shots(count: int, shots: int, seed: int) -> list[int]:
    """Deterministic k-shot indices: a seeded permutation's prefix, so k-shot sets are nested (5 ⊂ 10)."""
    if shots < 1:
        raise DataError(f"shots must be at least 1, got {shots}")
    if shots > count:
        raise DataError(f"asked for {shots} shots but only {count} usable images are available; lower shots")
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(i) for i in order[:shots])


def image_set(name: str, images, prompts: list[str] | None = None) -> ImageSet:
    """Generated images (a float NCHW tensor in [-1, 1]) as an ImageSet, one record per sample."""
    from genadapt.grid import to_uint8

    pixels = to_uint8(images)
    prompts = prompts or [""] * len(pixels)
    records = [ImageRecord(id=f"sample-{i:04d}", caption=p, sha256=pixel_hash(x)) for i, (p, x) in enumerate(zip(prompts, pixels))]
    return ImageSet(name, pixels, records)
