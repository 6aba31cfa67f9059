"""Captions in the conventions users already have.

- kohya sd-scripts: a sidecar `NAME.txt` (or another `caption_extension`) beside each image;
- Hugging Face imagefolder: `metadata.jsonl` or `metadata.csv` with `file_name` and `text` columns;
- one prompt for all, used for images that have no caption of their own (kohya's `class_tokens` rule).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from genadapt.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _read_jsonl(path: Path, caption_column: str) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{path} line {number}: no 'file_name' field; each line needs file_name and {caption_column}")
        if caption_column not in row:
            raise DataError(f"{path} line {number}: no {caption_column!r} field; add it or pass --caption-column")
        captions[str(row["file_name"])] = str(row[caption_column])
    return captions


def _read_csv(path: Path, caption_column: str) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        for needed in ("file_name", caption_column):
            if needed not in fields:
                raise DataError(f"{path}: no {needed!r} column (found {', '.join(fields) or 'none'}); add it or pass --caption-column")
        return {row["file_name"]: row[caption_column] or "" for row in reader}


def read_metadata(folder: Path, caption_column: str = "text") -> tuple[dict[str, str], Path | None]:
    """Captions keyed by path relative to `folder`, from metadata.jsonl or metadata.csv if present."""
    for name in METADATA_FILES:
        path = folder / name
        if path.is_file():
            reader = _read_jsonl if name.endswith(".jsonl") else _read_csv
            return reader(path, caption_column), path
    return {}, None


def sidecar_caption(image_path: Path, caption_extension: str = ".txt") -> str | None:
    path = image_path.with_suffix(caption_extension)
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{path}: caption file is not UTF-8 text; re-save it as UTF-8") from None
