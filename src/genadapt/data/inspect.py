"""`genadapt data inspect`: a report on a folder or built-in dataset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from genadapt.data import load_dataset, parse_spec
from genadapt.data.folder import inspect_folder


def inspect(data: str, caption=None, caption_extension=".txt", caption_column="text", background="white") -> dict:
    from genadapt.data.images import parse_color

    spec = parse_spec(data)
    if not spec.is_builtin:
        return inspect_folder(Path(spec.source), caption, caption_extension, caption_column, parse_color(background))
    images = load_dataset(data)
    return {
        "folder": images.name,
        "usable": len(images),
        "unusable": [],
        "formats": {"rendered": len(images)},
        "modes": {"RGB": len(images)},
        "sizes": {"min": [images.resolution] * 2, "max": [images.resolution] * 2, "distinct": 1},
        "captions": {"builtin": sum(1 for c in images.captions if c)},
        "caption_examples": images.captions[:3],
        "labels": dict(Counter(r.label for r in images.records).most_common()),
        "exact_duplicates": [],
        "near_duplicates": [],
        "metadata_unmatched": [],
    }


def render_report(report: dict) -> str:
    lines = [f"{report['folder']}: {report['usable']} usable image(s), {len(report['unusable'])} unusable"]
    if report["formats"]:
        lines.append("  formats: " + ", ".join(f"{k} {v}" for k, v in sorted(report["formats"].items())))
        lines.append("  modes:   " + ", ".join(f"{k} {v}" for k, v in sorted(report["modes"].items())))
    sizes = report["sizes"]
    if sizes["min"]:
        lines.append(f"  sizes:   {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]} ({sizes['distinct']} distinct)")
    captions = {k: v for k, v in report["captions"].items() if k != "metadata_file"}
    source = f" from {report['captions']['metadata_file']}" if report["captions"].get("metadata_file") else ""
    lines.append("  captions: " + (", ".join(f"{k} {v}" for k, v in captions.items()) or "none") + source)
    for example in report["caption_examples"]:
        lines.append(f"    e.g. {example!r}")
    for label, count in list(report.get("labels", {}).items())[:12]:
        lines.append(f"  {label}: {count}")
    if report.get("metadata_unmatched"):
        names = report["metadata_unmatched"]
        lines.append(f"  metadata rows naming no image file (captions unused): {', '.join(names[:10])}" + (f" and {len(names) - 10} more" if len(names) > 10 else ""))
    for group in report["exact_duplicates"]:
        lines.append("  exact duplicates: " + ", ".join(group))
    for pair in report["near_duplicates"]:
        lines.append(f"  near duplicates: {pair['a']} ~ {pair['b']} (dHash distance {pair['dhash_bits']})")
    if report["unusable"]:
        lines.append("  unusable files:")
        lines.extend(f"    {item['reason']}" for item in report["unusable"])
    if report["usable"] < 1:
        lines.append("  no usable image: training would refuse this data")
    return "\n".join(lines)
