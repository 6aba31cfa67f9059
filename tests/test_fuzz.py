"""Fuzzing the readers of user files: images, captions, metadata, safetensors (and a StyleGAN2 folder).

Every case is random bytes, a truncated valid file, a valid file with flipped bytes in its first 64
bytes, or a valid file with a huge declared size. Whatever the bytes, a reader must either succeed or
raise a one-line `DataError`/`UserError` naming the file; never another exception, never a hang.
Seeded, so a failure names a case that reproduces.
"""

import io
import json
import random
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from genadapt.data import load_dataset
from genadapt.data.captions import read_metadata, sidecar_caption
from genadapt.data.images import load_rgb
from genadapt.errors import UserError
from genadapt.runs import read_safetensors

CASES = 250  # per file kind; 6 kinds plus the end-to-end and StyleGAN2 folder cases: ~1,600 in all
SECONDS_PER_CASE = 10.0  # generous: a case takes milliseconds; only a hang gets near it


def _png() -> bytes:
    x = np.linspace(0, 255, 24, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([np.tile(x, (16, 1))] * 3, -1)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png())).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _safetensors(tmp: Path) -> bytes:
    path = tmp / "valid.safetensors"
    save_file({"weight": torch.randn(4, 3), "bias": torch.zeros(4), "steps": torch.tensor([7])}, str(path), metadata={"k": "v"})
    return path.read_bytes()


VALID_TEXT = {
    "caption": "a red square, pixel art\n".encode(),
    "jsonl": b'{"file_name": "a.png", "text": "first"}\n{"file_name": "b.png", "text": null}\n',
    "csv": b'file_name,text\na.png,"first, with a comma"\nb.png,\n',
}


def _huge_size(kind: str, data: bytes, rng: random.Random) -> bytes:
    """The file's own size field claims something enormous."""
    if kind == "safetensors":  # u64 little-endian header length
        return struct.pack("<Q", rng.choice([2**63, 2**40, 10**8, len(data) * 1000])) + data[8:]
    if kind == "png":  # IHDR width and height (big-endian u32 at 16 and 20), with a valid CRC so Pillow believes them
        ihdr = data[12:16] + struct.pack(">II", rng.choice([2**31 - 1, 65535, 40000]), rng.choice([2**31 - 1, 65535, 1])) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    if kind == "jpeg":  # SOF0 height and width
        at = data.find(b"\xff\xc0")
        return data if at < 0 else data[: at + 5] + struct.pack(">HH", 65535, 65535) + data[at + 9 :]
    return data * rng.randint(2, 50)  # text: long, but still text


def mutate(kind: str, data: bytes, rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(["random", "truncate", "flip", "flip", "huge"])
    if how == "random":
        return how, bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 8, 9, 64, 300])))
    if how == "truncate":
        return how, data[: rng.randrange(len(data))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(min(64, len(out)))] = rng.getrandbits(8)
        return how, bytes(out)
    return how, _huge_size(kind, data, rng)


def within_time(function, label: str):
    """Run `function` with a time limit (a thread, so a hang inside C or Rust code is caught too)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(SECONDS_PER_CASE)
    if thread.is_alive():
        pytest.fail(f"{label}: no answer within {SECONDS_PER_CASE} s (a hang)")
    return outcome


def assert_clean(outcome: dict, label: str, path: Path) -> None:
    error = outcome.get("error")
    if error is None:
        return
    if not isinstance(error, UserError):  # DataError is a UserError
        raise AssertionError(f"{label}: {type(error).__name__} instead of a one-line error: {error}") from error
    message = str(error)
    assert "\n" not in message, f"{label}: multi-line message {message!r}"
    assert str(path) in message, f"{label}: message does not name {path}: {message!r}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return {"png": _png(), "jpeg": _jpeg(), "safetensors": _safetensors(tmp_path_factory.mktemp("valid")), **VALID_TEXT}


def _read_image(path: Path):
    pixels = load_rgb(path, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    return pixels


def _read_caption(path: Path):
    text = sidecar_caption(path.with_suffix(".png"))
    assert isinstance(text, str)
    return text


def _read_metadata(path: Path):
    captions, found = read_metadata(path.parent)
    assert found == path and all(isinstance(v, (str, type(None))) for v in captions.values())
    return captions


def _read_weights(path: Path):
    tensors = read_safetensors(path, "fuzzed weights")
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    return tensors


READERS = {  # kind: (file name, reader)
    "png": ("image.png", _read_image),
    "jpeg": ("image.jpg", _read_image),
    "caption": ("image.txt", _read_caption),
    "jsonl": ("metadata.jsonl", _read_metadata),
    "csv": ("metadata.csv", _read_metadata),
    "safetensors": ("weights.safetensors", _read_weights),
}


@pytest.mark.parametrize("kind", sorted(READERS))
def test_reader_survives_mutated_files(kind, corpus, tmp_path):
    name, reader = READERS[kind]
    rng = random.Random(f"fuzz-{kind}")
    outcomes = {"ok": 0, "error": 0}
    for case in range(CASES):
        folder = tmp_path / f"case{case:03d}"
        folder.mkdir()
        path = folder / name
        how, data = mutate(kind, corpus[kind], rng)
        path.write_bytes(data)
        label = f"{kind} case {case} ({how}, {len(data)} bytes)"
        outcome = within_time(lambda: reader(path), label)
        assert_clean(outcome, label, path)
        outcomes["error" if "error" in outcome else "ok"] += 1
    assert outcomes["error"] > 0  # the mutations do reach the error paths


def test_load_dataset_survives_mutated_folders(corpus, tmp_path, capsys):
    """End to end: a folder of one good image and mutated image, caption and metadata files."""
    rng = random.Random("fuzz-folders")
    good = corpus["png"]
    for case in range(40):
        folder = tmp_path / f"case{case:02d}"
        folder.mkdir()
        (folder / "good.png").write_bytes(good)
        kind = rng.choice(["png", "jpeg", "caption", "jsonl", "csv"])
        name = {"png": "bad.png", "jpeg": "bad.jpg", "caption": "good.txt", "jsonl": "metadata.jsonl", "csv": "metadata.csv"}[kind]
        how, data = mutate(kind, corpus[kind], rng)
        (folder / name).write_bytes(data)
        label = f"folder case {case} ({kind} {how})"
        outcome = within_time(lambda: load_dataset(str(folder), resolution=8), label)
        assert_clean(outcome, label, folder)
        if "value" in outcome:
            assert len(outcome["value"]) >= 1
    capsys.readouterr()  # the skipped-file warnings


def test_stylegan2_folder_with_mutated_weights(tmp_path):
    from genadapt.families.stylegan2 import Discriminator, Generator, load_stylegan2, save_stylegan2

    channels = {4: 16, 8: 16}
    g_kwargs = {"size": 8, "style_dim": 16, "n_mlp": 1, "channel_multiplier": 1, "channels": channels}
    d_kwargs = {"size": 8, "channel_multiplier": 1, "channels": channels}
    torch.manual_seed(0)
    folder = save_stylegan2(tmp_path / "model", Generator(**g_kwargs), Discriminator(**d_kwargs), g_kwargs, d_kwargs)
    weights = folder / "generator_ema.safetensors"
    valid = weights.read_bytes()
    rng = random.Random("fuzz-stylegan2")
    errors = 0
    for case in range(30):
        how, data = mutate("safetensors", valid, rng)
        weights.write_bytes(data)
        label = f"stylegan2 case {case} ({how})"
        outcome = within_time(lambda: load_stylegan2(folder), label)
        assert_clean(outcome, label, weights)
        errors += "error" in outcome
    assert errors > 0
    weights.write_bytes(valid)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "generator": {**config["generator"], "style_dim": 32}}))
    with pytest.raises(UserError, match="does not match config.json") as error:  # valid file, other shapes
        load_stylegan2(folder)
    assert "\n" not in str(error.value)


def test_read_safetensors_names_the_file_the_problem_and_the_fix(corpus, tmp_path, monkeypatch):
    import os

    valid = corpus["safetensors"]
    cases = {
        "missing": (None, "no such file (test weights); check the path"),
        "folder": ("mkdir", "is a folder"),
        "dangling": ("symlink", "broken link"),
        "empty": (b"", "not a valid safetensors file of test weights (header too small); re-save or re-download it"),
        "huge-header": (struct.pack("<Q", 2**63) + valid[8:], "(header too large)"),
        "truncated": (valid[:-3], "(incomplete metadata, file not fully covered)"),
        "not-json": (valid[:8] + b"\xff" * (len(valid) - 8), "invalid UTF-8 in header"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if content == "mkdir":
            path.mkdir()
        elif content == "symlink":
            path.symlink_to(tmp_path / "gone")
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(UserError) as error:
            read_safetensors(path, "test weights")
        message = str(error.value)
        assert message.startswith(f"{path}: ") and words in message and "\n" not in message, (name, message)

    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(valid)
    os.chmod(locked, 0)
    if os.access(locked, os.R_OK):  # root reads mode-000 files: fail the open as it would for a user
        import safetensors.torch

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    with pytest.raises(UserError, match="permission denied"):
        read_safetensors(locked, "test weights")
    monkeypatch.undo()
    os.chmod(locked, 0o644)
    assert set(read_safetensors(locked)) == {"weight", "bias", "steps"}
