"""Bad data through the command line: every case ends with exit code 2 and one `error:` line that names
the file, never a traceback. `data inspect` reports on a folder; `data grid` loads it the way `adapt`
does (`genadapt.data.load_dataset`)."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from genadapt.cli import app

runner = CliRunner()


def _refuse_reading(path: Path, monkeypatch) -> None:
    """Root reads mode-000 files, so make reading this path fail as it does for a user."""
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        real = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)


def _write(name: str, data: bytes):
    def make(folder, monkeypatch):
        (folder / name).write_bytes(data)
        return folder / name

    return make


def _symlink(name: str):
    def make(folder, monkeypatch):
        (folder / name).symlink_to(folder / "nowhere")
        return folder / name

    return make


def _mkdir(name: str):
    def make(folder, monkeypatch):
        (folder / name).mkdir()
        return folder / name

    return make


def _unreadable(name: str, data: bytes):
    def make(folder, monkeypatch):
        (folder / name).write_bytes(data)
        _refuse_reading(folder / name, monkeypatch)
        return folder / name

    return make


def _no_usable_image(folder, monkeypatch):
    for path in folder.glob("*.png"):
        path.write_bytes(b"")
    return folder


JSONL_OK = b'{"file_name": "a.png", "text": "a caption"}\n'
CSV_OK = b"file_name,text\na.png,a caption\n"

# case id: (make the bad input, return the path the error must name; words the error must carry)
CASES = {
    "caption-latin1": (_write("a.txt", "café".encode("latin-1")), "save it as UTF-8"),
    "caption-binary": (_write("a.txt", b"\x00\x01\x02\xff"), "binary"),
    "caption-utf16": (_write("a.txt", "a cat".encode("utf-16")), "UTF-16"),
    "caption-folder": (_mkdir("a.txt"), "is a folder"),
    "caption-dangling-symlink": (_symlink("a.txt"), "broken link"),
    "caption-unreadable": (_unreadable("a.txt", b"a cat"), "permission denied"),
    "jsonl-invalid-json": (_write("metadata.jsonl", JSONL_OK + b'{"file_name": "b.png", "text": \n'), "line 2: invalid JSON"),
    "jsonl-latin1": (_write("metadata.jsonl", '{"file_name": "a.png", "text": "café"}\n'.encode("latin-1")), "save it as UTF-8"),
    "jsonl-binary": (_write("metadata.jsonl", b"\x1f\x8b\x08\x00" + bytes(40)), "binary"),
    "jsonl-not-an-object": (_write("metadata.jsonl", b'"a.png"\n'), "not an object"),
    "jsonl-list-caption": (_write("metadata.jsonl", b'{"file_name": "a.png", "text": ["a", "b"]}\n'), "make it a string"),
    "jsonl-no-file-name": (_write("metadata.jsonl", b'{"text": "x"}\n'), "no 'file_name' field"),
    "jsonl-duplicate-row": (_write("metadata.jsonl", JSONL_OK * 2), "one row per image"),
    "jsonl-folder": (_mkdir("metadata.jsonl"), "is a folder"),
    "jsonl-dangling-symlink": (_symlink("metadata.jsonl"), "broken link"),
    "jsonl-unreadable": (_unreadable("metadata.jsonl", JSONL_OK), "permission denied"),
    "csv-no-text-column": (_write("metadata.csv", b"file_name,prompt\na.png,x\n"), "no 'text' column"),
    "csv-unclosed-quote": (_write("metadata.csv", b'file_name,text\na.png,"open\n'), "malformed CSV"),
    "csv-latin1": (_write("metadata.csv", "file_name,text\na.png,café\n".encode("latin-1")), "save it as UTF-8"),
    "csv-unreadable": (_unreadable("metadata.csv", CSV_OK), "permission denied"),
    "no-usable-image": (_no_usable_image, "none of the 2 image files is usable"),
}
COMMANDS = {
    "inspect": lambda folder, out: ["data", "inspect", str(folder)],
    "load": lambda folder, out: ["data", "grid", str(folder), "--out", str(out / "grid.png"), "--resolution", "8"],
}


# `data inspect` on a folder without a usable image is a report (exit 1, tested in test_cli), not an error.
PAIRS = [(case, command) for case in sorted(CASES) for command in sorted(COMMANDS) if (case, command) != ("no-usable-image", "inspect")]


@pytest.mark.parametrize("case, command", PAIRS, ids=[f"{case}-{command}" for case, command in PAIRS])
def test_bad_data_is_one_error_line_naming_the_file(case, command, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    for index, name in enumerate(["a.png", "b.png"]):
        Image.new("RGB", (16, 16), (index * 90, 20, 20)).save(folder / name)
    make, words = CASES[case]
    named = make(folder, monkeypatch)
    result = runner.invoke(app, COMMANDS[command](folder, tmp_path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(named) in lines[0] and words in lines[0], lines[0]
    assert not list(tmp_path.glob("grid.png"))  # nothing half-made


@pytest.mark.parametrize(
    "args, words",
    [
        (["data", "inspect", "{folder}", "--caption-extension", "txt"], "--caption-extension .txt"),
        (["data", "inspect", "{folder}/missing"], "no such folder"),
        (["data", "grid", "{folder}/missing", "--out", "{folder}/g.png"], "no such folder"),
        (["data", "inspect", "builtin:openmoji/nope"], "unknown OpenMoji domain"),
    ],
    ids=["extension-without-dot", "inspect-missing-folder", "load-missing-folder", "unknown-builtin"],
)
def test_bad_options_are_one_error_line(args, words, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    result = runner.invoke(app, [arg.format(folder=tmp_path) for arg in args])
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [["data", "inspect", "--help"], ["data", "grid", "--help"], ["data", "--help"]])
def test_data_help_prints(args):
    """`[/SPLIT]` in the help text once crashed rich's markup parser (MarkupError): help must print as written."""
    for color in (False, True):
        result = runner.invoke(app, args, color=color)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output and "Usage:" in result.output
    if args[1] == "inspect":
        assert "builtin:openmoji[/DOMAIN[/SPLIT]]" in result.output
