"""A folder of user images (+ captions) into an ImageSet, and `data inspect`'s report."""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from genadapt.data.captions import read_metadata, sidecar_caption
from genadapt.data.images import IMAGE_EXTENSIONS, crop_top_left, fit_square, open_image, to_rgb
from genadapt.data.imageset import ImageRecord, ImageSet
from genadapt.errors import DataError

NEAR_DUPLICATE_BITS = 4  # Hamming distance on a 64-bit dHash; <= 4 is "visually the same" in practice


def list_image_files(folder: Path) -> list[Path]:
    """Image files below `folder` (recursive, hidden entries skipped), in a stable order.

    Dangling symlinks with an image extension are listed, so the scan reports them instead of
    dropping them; a subfolder that cannot be listed is an error (its images would vanish unseen)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder; pass --data with a folder of images or a builtin: dataset")
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file, not a folder; pass the folder that holds the images")

    def refuse(exc: OSError) -> None:
        where = exc.filename or folder
        raise DataError(f"{where}: cannot list folder ({exc.strerror or type(exc).__name__}); fix its permissions or move it out of {folder}")

    files = []
    for root, dirs, names in os.walk(folder, onerror=refuse):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_file() or (path.is_symlink() and not path.exists()):
                files.append(path)
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dhash(image: Image.Image) -> int:
    """64-bit difference hash (Krawetz): robust to resizing and re-encoding, for near-duplicates."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if bit else "0" for bit in bits), 2)


@dataclass
class FolderScan:
    folder: Path
    usable: list[tuple[Path, Image.Image]] = field(default_factory=list)  # RGB, native size
    unusable: list[tuple[Path, str]] = field(default_factory=list)  # (file, one-line reason)
    formats: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)


def scan(folder: Path, background: tuple[int, int, int] = (255, 255, 255)) -> FolderScan:
    result = FolderScan(Path(folder))
    for path in list_image_files(folder):
        try:
            image = open_image(path)
            result.formats[image.format or path.suffix.lower().lstrip(".")] += 1
            result.modes[image.mode] += 1
            result.usable.append((path, to_rgb(image, background)))
        except DataError as exc:
            result.unusable.append((path, str(exc)))
    return result


@dataclass
class Captions:
    texts: list[str]  # one per usable image, in order
    origins: Counter
    metadata_file: Path | None
    unmatched: list[str]  # metadata rows naming no image file in the folder (their captions are unused)


def _captions_for(folder: Path, found: FolderScan, caption: str | None, caption_extension: str, caption_column: str) -> Captions:
    metadata, metadata_file = read_metadata(folder, caption_column)
    texts, origins = [], Counter()
    for path, _ in found.usable:
        relative = path.relative_to(folder).as_posix()
        text = sidecar_caption(path, caption_extension)
        if text is not None:
            origins["sidecar"] += 1
        elif metadata.get(relative) is not None:  # None: the row says "no caption" (JSON null, empty CSV cell)
            text = metadata[relative]
            origins["metadata"] += 1
        elif caption is not None:
            text = caption
            origins["--caption"] += 1
        else:
            text = ""
            origins["none"] += 1
        texts.append(text)
    # Rows for unusable images are not "unmatched": those files are reported as skipped already.
    listed = {path.relative_to(folder).as_posix() for path, _ in [*found.usable, *found.unusable]}
    return Captions(texts, origins, metadata_file, sorted(name for name in metadata if name not in listed))


def _names(items: list[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


_warned: set[tuple[str, ...]] = set()  # compare/evaluate load one folder many times: say it once per process


def _warn_once(lines: list[str]) -> None:
    key = tuple(lines)
    if not lines or key in _warned:
        return
    _warned.add(key)
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def load_folder(
    folder: Path,
    resolution: int,
    fit: str = "crop",
    background: tuple[int, int, int] = (255, 255, 255),
    caption: str | None = None,
    caption_extension: str = ".txt",
    caption_column: str = "text",
    strict: bool = False,
) -> ImageSet:
    """Usable images at `resolution`. Unusable files are skipped with one warning line each on stderr
    and recorded in `skipped` (the manifest keeps them); with `strict`, the first one is a DataError.
    Metadata rows naming no image file are a warning too (a DataError with `strict`)."""
    folder = Path(folder)
    found = scan(folder, background)
    if strict and found.unusable:
        path, reason = found.unusable[0]
        more = f" (and {len(found.unusable) - 1} more)" if len(found.unusable) > 1 else ""
        raise DataError(f"{reason}{more}; --strict refuses unusable files, fix them or drop --strict")
    if not found.usable:
        if found.unusable:
            raise DataError(
                f"{folder}: none of the {len(found.unusable)} image files is usable (first: {found.unusable[0][1]}); run `genadapt data inspect {folder}`"
            )
        raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); put the training images in it")
    captions = _captions_for(folder, found, caption, caption_extension, caption_column)
    if strict and captions.unmatched:
        raise DataError(
            f"{captions.metadata_file}: rows for {_names(captions.unmatched)} name no image file in {folder}; "
            "fix file_name or remove the row(s) (--strict refuses unmatched rows)"
        )
    lines = []
    if found.unusable:
        lines.append(f"skipped {len(found.unusable)} unusable file(s) in {folder} (--strict refuses them instead):")
        lines.extend(f"  {reason}" for _, reason in found.unusable)
    if captions.unmatched:
        lines.append(
            f"{captions.metadata_file}: {len(captions.unmatched)} row(s) name no image file in {folder}, so their captions are unused: "
            f"{_names(captions.unmatched)}; check the file_name spelling"
        )
    _warn_once(lines)
    pixels = np.stack([np.asarray(fit_square(image, resolution, fit, background), dtype=np.uint8) for _, image in found.usable])
    records = [
        ImageRecord(
            id=path.relative_to(folder).as_posix(), caption=text, label="", sha256=file_sha256(path),
            original_size=(image.height, image.width), crop_top_left=crop_top_left(image.width, image.height, resolution, fit),
        )
        for (path, image), text in zip(found.usable, captions.texts)
    ]
    return ImageSet(str(folder), pixels, records, skipped=[reason for _, reason in found.unusable])


def inspect_folder(
    folder: Path,
    caption: str | None = None,
    caption_extension: str = ".txt",
    caption_column: str = "text",
    background: tuple[int, int, int] = (255, 255, 255),
) -> dict:
    """Everything a user should know about a folder before training on it."""
    folder = Path(folder)
    found = scan(folder, background)
    paths = [path for path, _ in found.usable]
    captions = _captions_for(folder, found, caption, caption_extension, caption_column)
    sizes = [image.size for _, image in found.usable]

    by_pixels: dict[str, list[str]] = {}
    hashes = []
    for path, image in found.usable:
        key = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()
        by_pixels.setdefault(key, []).append(path.relative_to(folder).as_posix())
        hashes.append(dhash(image))
    exact = [group for group in by_pixels.values() if len(group) > 1]
    exact_pairs = {frozenset((a, b)) for group in exact for a in group for b in group if a != b}
    near = []
    names = [path.relative_to(folder).as_posix() for path in paths]
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            distance = bin(hashes[i] ^ hashes[j]).count("1")
            if distance <= NEAR_DUPLICATE_BITS and frozenset((names[i], names[j])) not in exact_pairs:
                near.append({"a": names[i], "b": names[j], "dhash_bits": distance})
    return {
        "folder": str(folder),
        "usable": len(found.usable),
        "unusable": [{"file": str(path.relative_to(folder)), "reason": reason} for path, reason in found.unusable],
        "formats": dict(found.formats),
        "modes": dict(found.modes),
        "sizes": {
            "min": [min(w for w, _ in sizes), min(h for _, h in sizes)] if sizes else None,
            "max": [max(w for w, _ in sizes), max(h for _, h in sizes)] if sizes else None,
            "distinct": len(set(sizes)),
        },
        "captions": {"metadata_file": captions.metadata_file.name if captions.metadata_file else None, **dict(captions.origins)},
        "caption_examples": [c for c in captions.texts if c][:3],
        "metadata_unmatched": captions.unmatched,
        "exact_duplicates": exact,
        "near_duplicates": near,
    }
