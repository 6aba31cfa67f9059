"""Data: user folders, built-in datasets, k-shot selection, augmentation.

`load_dataset(spec)` accepts a folder path or a built-in spec:

    builtin:openmoji                      every rendered OpenMoji (all domains)
    builtin:openmoji/source               the whole pretraining domain
    builtin:openmoji/source/train         its 90% pretraining part (source/reference: the 10% held out)
    builtin:openmoji/flags                a target domain's train pool (also dark-skin)
    builtin:openmoji/flags/reference      its held-out evaluation set
    builtin:digits  builtin:digits/7      scikit-learn digits (all, or one class)

and query options `?shots=10&seed=0` (a deterministic k-shot subset of the pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from genadapt.errors import DataError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class DataSpec:
    source: str  # folder path or builtin name without the query
    shots: int | None = None
    seed: int = 0

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)


def parse_spec(spec: str) -> DataSpec:
    source, _, query = str(spec).partition("?") if str(spec).startswith(BUILTIN_PREFIX) else (str(spec), "", "")
    options = parse_qs(query, strict_parsing=False)
    unknown = set(options) - {"shots", "seed"}
    if unknown:
        raise DataError(f"{spec}: unknown option {sorted(unknown)[0]!r}; use ?shots=N&seed=S")
    try:
        shots = int(options["shots"][0]) if "shots" in options else None
        seed = int(options["seed"][0]) if "seed" in options else 0
    except ValueError:
        raise DataError(f"{spec}: shots and seed must be integers, e.g. ?shots=10&seed=0") from None
    return DataSpec(source, shots, seed)


def _load_builtin(name: str, resolution: int):
    from genadapt.data import openmoji
    from genadapt.data.digits import load_digits

    parts = name[len(BUILTIN_PREFIX):].strip("/").split("/")
    if parts[0] == "openmoji":
        if len(parts) == 1:
            return openmoji.load_all(resolution)
        domain = parts[1]
        if domain not in openmoji.DOMAINS:
            raise DataError(f"{name}: unknown OpenMoji domain {domain!r}; choose one of {', '.join(openmoji.DOMAINS)}")
        split = parts[2] if len(parts) > 2 else ("train" if domain != "source" else None)
        if split not in (None, *openmoji.SPLITS):
            raise DataError(f"{name}: unknown split {split!r}; use train or reference")
        return openmoji.load_domain(domain, split, resolution)
    if parts[0] == "digits":
        if len(parts) == 1:
            return load_digits(resolution)
        if len(parts) == 2 and parts[1].isdigit() and len(parts[1]) == 1:
            return load_digits(resolution, int(parts[1]))
        raise DataError(f"{name}: use builtin:digits or builtin:digits/<0-9>")
    raise DataError(f"{name}: unknown built-in dataset; choose builtin:openmoji[/DOMAIN[/SPLIT]] or builtin:digits[/D]")


def load_dataset(
    spec: str,
    resolution: int = 32,
    shots: int | None = None,
    seed: int | None = None,
    fit: str = "crop",
    background: str = "white",
    caption: str | None = None,
    caption_extension: str = ".txt",
    caption_column: str = "text",
    strict: bool = False,
):
    """An ImageSet from a folder or a builtin spec; explicit shots/seed override the spec's query."""
    from genadapt.data.folder import load_folder
    from genadapt.data.images import parse_color
    from genadapt.data.imageset import select_shots

    parsed = parse_spec(spec)
    shots = shots if shots is not None else parsed.shots
    seed = seed if seed is not None else parsed.seed
    if parsed.is_builtin:
        images = _load_builtin(parsed.source, resolution)
        if caption is not None:
            images = images.with_captions(caption)
    else:
        images = load_folder(
            Path(parsed.source), resolution, fit, parse_color(background), caption, caption_extension, caption_column, strict
        )
    if shots is not None:
        name = f"{images.name}?shots={shots}&seed={seed}"
        images = images.subset(select_shots(len(images), shots, seed), name=name)
    return images
