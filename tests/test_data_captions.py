import json

import pytest
from PIL import Image

from genadapt.data import load_dataset
from genadapt.errors import DataError


def _images(folder, names):
    for index, name in enumerate(names):
        Image.new("RGB", (16, 16), (index * 40, 0, 0)).save(folder / name)


def test_sidecar_txt_kohya_style(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_text("a red square\n")
    images = load_dataset(str(tmp_path), resolution=8, caption="fallback prompt")
    assert images.captions == ["a red square", "fallback prompt"]


def test_metadata_jsonl_hf_imagefolder(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert load_dataset(str(tmp_path), resolution=8).captions == ["first", "second"]


def test_metadata_csv_and_custom_column(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "metadata.csv").write_text("file_name,prompt\na.png,from csv\n")
    assert load_dataset(str(tmp_path), resolution=8, caption_column="prompt").captions == ["from csv"]
    with pytest.raises(DataError, match="metadata.csv: no 'text' column"):
        load_dataset(str(tmp_path), resolution=8)


def test_one_caption_for_all(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    assert load_dataset(str(tmp_path), resolution=8, caption="a photo of <tok>").captions == ["a photo of <tok>"] * 2


def test_broken_metadata_names_line_and_fix(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"metadata.jsonl line 2: invalid JSON"):
        load_dataset(str(tmp_path), resolution=8)


# --------------------------------------------------------------------------- unusable caption files

from genadapt.data.folder import inspect_folder  # noqa: E402


def _unreadable(path, monkeypatch):
    """Tests run as root, who reads mode-000 files: make reading this one path fail as it would for a user."""
    import os
    from pathlib import Path

    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        real = Path.read_bytes

        def refuse(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)


BAD_CAPTIONS = {  # how to break the file, and the words the message must carry
    "latin1": (lambda p, mp: p.write_bytes("café au lait".encode("latin-1")), "not UTF-8 (byte 0xe9 on line 1"),
    "binary": (lambda p, mp: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), "binary"),
    "utf16": (lambda p, mp: p.write_bytes("a red square".encode("utf-16")), "UTF-16"),
    "folder": (lambda p, mp: p.mkdir(), "is a folder"),
    "dangling-symlink": (lambda p, mp: p.symlink_to(p.parent / "gone.txt"), "broken link"),
    "unreadable": (lambda p, mp: (p.write_text("fine"), _unreadable(p, mp)), "permission denied"),
}
FIXES = {"latin1": "save it as UTF-8", "utf16": "save it as UTF-8", "binary": "UTF-8 text file", "folder": "rename or remove it",
         "dangling-symlink": "fix or remove the link", "unreadable": "fix its permissions"}


@pytest.mark.parametrize("which", ["a.txt", "metadata.jsonl", "metadata.csv"])
@pytest.mark.parametrize("problem", sorted(BAD_CAPTIONS))
def test_unusable_caption_files_are_one_line_errors_for_loading_and_inspect(tmp_path, monkeypatch, which, problem):
    _images(tmp_path, ["a.png", "b.png"])
    path = tmp_path / which
    breaks, words = BAD_CAPTIONS[problem]
    breaks(path, monkeypatch)
    for read in (lambda: load_dataset(str(tmp_path), resolution=8), lambda: inspect_folder(tmp_path)):
        with pytest.raises(DataError) as error:
            read()
        message = str(error.value)
        assert message.startswith(f"{path}:") and words in message and FIXES[problem] in message and "\n" not in message


def test_byte_order_marks_are_dropped(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_bytes("\ufeffa red square\n".encode())
    (tmp_path / "metadata.jsonl").write_bytes('\ufeff{"file_name": "b.png", "text": "from jsonl"}\n'.encode())
    assert load_dataset(str(tmp_path), resolution=8).captions == ["a red square", "from jsonl"]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_bytes("\ufefffile_name,text\nb.png,from excel\n".encode())  # Excel's "CSV UTF-8"
    assert load_dataset(str(tmp_path), resolution=8).captions == ["a red square", "from excel"]


def test_null_text_and_empty_cells_mean_no_caption(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    rows = [{"file_name": "a.png", "text": None}, {"file_name": "b.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert load_dataset(str(tmp_path), resolution=8).captions == ["", ""]  # not 'None'
    # null falls back to --caption like an image without a row; "" is an explicit empty caption
    assert load_dataset(str(tmp_path), resolution=8, caption="a photo").captions == ["a photo", ""]
    assert inspect_folder(tmp_path, caption="a photo")["captions"] == {"metadata_file": "metadata.jsonl", "--caption": 1, "metadata": 1}
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,\nb.png,bee\n")  # CSV cannot say null: empty is none
    assert load_dataset(str(tmp_path), resolution=8, caption="a photo").captions == ["a photo", "bee"]


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"file_name": "a.png", "text": ["a", "b"]}', "line 1: 'text' is a JSON list; make it a string, or null"),
        ('{"file_name": "a.png", "text": 42}', "line 1: 'text' is a JSON int"),
        ('["a.png", "text"]', "line 1: a JSON list, not an object"),
        ('{"file_name": 3, "text": "x"}', "line 1: file_name must be a non-empty path"),
        ('{"file_name": "a.png", "text": "x"}\n\n{"file_name": "./a.png", "text": "y"}', "line 3: 'a.png' already has a row (line 1)"),
        ('{"file_name": "a.png", "text": "x"', "line 1: invalid JSON"),
        ("[" * 100_000, "line 1: invalid JSON"),
    ],
    ids=["list-text", "number-text", "not-an-object", "number-name", "duplicate", "unclosed", "deep-nesting"],
)
def test_malformed_jsonl_rows_name_the_line_and_fix(tmp_path, content, words):
    _images(tmp_path, ["a.png"])
    (tmp_path / "metadata.jsonl").write_text(content)
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), resolution=8)
    assert str(error.value).startswith(str(tmp_path / "metadata.jsonl")) and words in str(error.value) and "\n" not in str(error.value)


def test_malformed_csv_names_the_line(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"never closed\n')
    with pytest.raises(DataError, match=r"metadata.csv line 2: malformed CSV \(unexpected end of data\)"):
        load_dataset(str(tmp_path), resolution=8)


def test_json_strings_keep_line_separators(tmp_path):
    _images(tmp_path, ["a.png"])  # U+2028 is legal inside a JSON string; splitlines() would cut the row there
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "one\u2028two"}, ensure_ascii=False), encoding="utf-8")
    assert load_dataset(str(tmp_path), resolution=8).captions == ["one\u2028two"]


def test_metadata_rows_naming_missing_files_are_reported(tmp_path, capsys):
    """A row whose file is not in the folder (a typo, a deleted image) keeps its caption unused: a warning
    when loading, listed by inspect, and refused with strict. Rows of unusable images are not counted twice."""
    _images(tmp_path, ["a.png"])
    (tmp_path / "broken.png").write_bytes(b"")
    rows = [{"file_name": "a.png", "text": "ok"}, {"file_name": "A.PNG", "text": "typo"}, {"file_name": "broken.png", "text": "x"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert load_dataset(str(tmp_path), resolution=8).captions == ["ok"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "metadata.jsonl" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "1 row(s) name no image file" in warned[0] and "A.PNG" in warned[0]
    assert inspect_folder(tmp_path)["metadata_unmatched"] == ["A.PNG"]
    (tmp_path / "broken.png").unlink()
    with pytest.raises(DataError, match=r"metadata.jsonl: rows for A.PNG, broken.png name no image file in .*--strict"):
        load_dataset(str(tmp_path), resolution=8, strict=True)


def test_caption_extension_without_a_dot(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match=r"caption extension 'txt': start it with a dot, e.g. --caption-extension .txt"):
        load_dataset(str(tmp_path), resolution=8, caption_extension="txt")
