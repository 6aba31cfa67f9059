"""Captions in the conventions users already have.

- kohya sd-scripts: a sidecar `NAME.txt` (or another `caption_extension`) beside each image;
- Hugging Face imagefolder: `metadata.jsonl` or `metadata.csv` with `file_name` and `text` columns;
- one prompt for all, used for images that have no caption of their own (kohya's `class_tokens` rule).

Every caption file that exists but cannot be used (unreadable, a folder, a broken link, binary, not
UTF-8, malformed) is a one-line `DataError` naming it and the fix: a caption that is silently lost
would train the image on the wrong prompt. A UTF-8 byte-order mark (Notepad, Excel) is dropped.
In metadata, `"text": null` (JSONL) or an empty cell (CSV) means "no caption of its own".
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path, PurePosixPath

from genadapt.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def _exists(path: Path) -> bool:
    """True for anything at `path`, a dangling symlink included (is_file() would hide it)."""
    return os.path.lexists(path)


def read_text(path: Path, what: str = "caption file") -> str:
    """The file as UTF-8 text (BOM dropped), or a DataError naming it, the problem and the fix."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a {what}; rename or remove it") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read {what} (permission denied); fix its permissions, e.g. chmod a+r") from None
    except FileNotFoundError:
        target = os.readlink(path) if path.is_symlink() else None
        where = f" (points to {target}, which does not exist)" if target else ""
        raise DataError(f"{path}: {what} is a broken link{where}; fix or remove the link") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or type(exc).__name__}); check the file") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: {what} is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise DataError(f"{path}: {what} is binary (contains NUL bytes), not text; replace it with a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")  # -sig: drops a leading byte-order mark
    except UnicodeDecodeError as exc:
        byte = data[exc.start : exc.start + 1].hex()
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: {what} is not UTF-8 (byte 0x{byte} on line {line}; Latin-1 or another legacy encoding?); save it as UTF-8"
        ) from None


def _relative_name(value, path: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path} {where}: file_name must be a non-empty path relative to the folder, got {value!r}")
    return PurePosixPath(value.replace("\\", "/")).as_posix()  # './a.png' and 'a.png' name the same image


def _add(captions: dict, lines: dict, name: str, text: str | None, path: Path, line: int) -> None:
    if name in lines:
        raise DataError(f"{path} line {line}: {name!r} already has a row (line {lines[name]}); keep one row per image")
    lines[name] = line
    captions[name] = text


def _read_jsonl(path: Path, caption_column: str) -> dict[str, str | None]:
    captions, lines = {}, {}
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks on
    for number, line in enumerate(read_text(path, "metadata file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg}, column {exc.colno}); each line must be one JSON object") from None
        except RecursionError:
            raise DataError(f"{path} line {number}: invalid JSON (nested too deeply); each line must be one flat JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: a JSON {type(row).__name__}, not an object; each line must be {{\"file_name\": ..., \"{caption_column}\": ...}}")
        if "file_name" not in row:
            raise DataError(f"{path} line {number}: no 'file_name' field; each line needs file_name and {caption_column}")
        if caption_column not in row:
            raise DataError(f"{path} line {number}: no {caption_column!r} field; add it or pass --caption-column")
        text = row[caption_column]
        if text is not None and not isinstance(text, str):  # str() would train on "['a', 'b']" or "42"
            raise DataError(f"{path} line {number}: {caption_column!r} is a JSON {type(text).__name__}; make it a string, or null for no caption")
        _add(captions, lines, _relative_name(row["file_name"], path, f"line {number}"), text, path, number)
    return captions


def _read_csv(path: Path, caption_column: str) -> dict[str, str | None]:
    # strict: an unclosed quote is an error, not a caption that swallows the rest of the file
    reader = csv.DictReader(io.StringIO(read_text(path, "metadata file"), newline=""), strict=True)
    captions, lines = {}, {}
    try:
        fields = reader.fieldnames or []
        for needed in ("file_name", caption_column):
            if needed not in fields:
                raise DataError(f"{path}: no {needed!r} column (found {', '.join(map(str, fields)) or 'none'}); add it or pass --caption-column")
        for row in reader:
            # An empty or missing cell: CSV cannot say null, so it means no caption of its own.
            text = row[caption_column] or None
            _add(captions, lines, _relative_name(row["file_name"], path, f"line {reader.line_num}"), text, path, reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.reader.line_num}: malformed CSV ({exc}); fix the quoting or re-export it as CSV") from None
    return captions


def read_metadata(folder: Path, caption_column: str = "text") -> tuple[dict[str, str | None], Path | None]:
    """Captions keyed by path relative to `folder`, from metadata.jsonl or metadata.csv if present.

    A value of None means the row gives no caption (the image falls back to `--caption`, else "")."""
    for name in METADATA_FILES:
        path = Path(folder) / name
        if _exists(path):
            reader = _read_jsonl if name.endswith(".jsonl") else _read_csv
            return reader(path, caption_column), path
    return {}, None


def caption_path(image_path: Path, caption_extension: str = ".txt") -> Path:
    try:
        return Path(image_path).with_suffix(caption_extension)
    except ValueError:  # Path refuses 'txt' and '.'
        raise DataError(f"caption extension {caption_extension!r}: start it with a dot, e.g. --caption-extension .txt") from None


def sidecar_caption(image_path: Path, caption_extension: str = ".txt") -> str | None:
    """The sidecar caption (stripped), None if there is none, or a DataError if it cannot be used."""
    path = caption_path(image_path, caption_extension)
    if not _exists(path):
        return None
    return read_text(path, "caption file").strip()
