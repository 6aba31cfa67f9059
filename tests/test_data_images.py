"""Every image format and mode users bring, and every kind of bad file, ends well."""

import io

import numpy as np
import pytest
from PIL import Image

from genadapt.data import load_dataset
from genadapt.data.folder import inspect_folder
from genadapt.data.images import load_rgb, open_image
from genadapt.errors import DataError


def _gradient(size=(40, 24)):
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (height, 1)), np.tile(x[::-1], (height, 1)), np.full((height, width), 80, np.uint8)], -1)
    return Image.fromarray(rgb, "RGB")


def _write_all_formats(folder):
    base = _gradient()
    base.save(folder / "rgb.png")
    base.save(folder / "rgb.jpg", quality=95)
    base.save(folder / "rgb.webp")
    base.save(folder / "rgb.bmp")
    base.save(folder / "rgb.tiff")
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    base.convert("L").save(folder / "grey.png")
    rgba = base.convert("RGBA")
    alpha = np.zeros((24, 40), np.uint8)
    alpha[:, 20:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "rgba.png")
    rgba.convert("LA").save(folder / "la.png")
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette-transparent.png", transparency=0)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "grey16.png")
    return base


def test_every_format_and_mode_loads_as_rgb(tmp_path):
    _write_all_formats(tmp_path)
    images = load_dataset(str(tmp_path), resolution=16)
    assert len(images) == 12 and not images.skipped
    assert images.pixels.shape == (12, 16, 16, 3) and images.pixels.dtype == np.uint8
    tensors = images.tensors()
    assert tensors.min() >= -1 and tensors.max() <= 1


def test_transparency_is_composited_on_chosen_background(tmp_path):
    _write_all_formats(tmp_path)
    white = load_rgb(tmp_path / "rgba.png", 24, fit="pad")
    black = load_rgb(tmp_path / "rgba.png", 24, fit="pad", background=(0, 0, 0))
    # Left half of the image is fully transparent: background shows through.
    assert white[12, 6].tolist() == [255, 255, 255]
    assert black[12, 6].tolist() == [0, 0, 0]
    assert (white[12, 18] == black[12, 18]).all()  # opaque pixels don't depend on the background


def test_sixteen_bit_keeps_its_range(tmp_path):
    _write_all_formats(tmp_path)
    eight = load_rgb(tmp_path / "grey.png", 24)
    sixteen = load_rgb(tmp_path / "grey16.png", 24)
    assert np.abs(eight.astype(int) - sixteen.astype(int)).max() <= 2


def test_crop_and_pad(tmp_path):
    _gradient((40, 20)).save(tmp_path / "wide.png")
    cropped = load_rgb(tmp_path / "wide.png", 20, fit="crop")
    padded = load_rgb(tmp_path / "wide.png", 20, fit="pad", background=(0, 255, 0))
    assert cropped.shape == padded.shape == (20, 20, 3)
    assert padded[0, 10].tolist() == [0, 255, 0]  # top band is padding
    assert cropped[0, 10].tolist() != [0, 255, 0]


def _write_bad_files(folder):
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    buffer = io.BytesIO()
    _gradient().save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, "PNG")  # 144 Mpx of zeros compresses to little
    (folder / "bomb.png").write_bytes(buffer.getvalue())
    return {"empty.png": "empty file", "text.png": "not an image", "truncated.png": "truncated", "tiny.png": "1x1", "bomb.png": "decompression"}


@pytest.mark.parametrize("name", ["empty.png", "text.png", "truncated.png", "tiny.png", "bomb.png"])
def test_bad_file_gives_one_line_reason_naming_it(tmp_path, name):
    expected = _write_bad_files(tmp_path)[name]
    with pytest.raises(DataError) as error:
        open_image(tmp_path / name)
    message = str(error.value)
    assert name in message and expected in message and "\n" not in message


def test_unreadable_file(tmp_path, monkeypatch):
    import os

    _gradient().save(tmp_path / "locked.png")
    os.chmod(tmp_path / "locked.png", 0)
    if os.access(tmp_path / "locked.png", os.R_OK):  # root reads mode-000 files: make the read itself fail

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("genadapt.data.images.Image.open", refuse)
    with pytest.raises(DataError, match="permission denied"):
        open_image(tmp_path / "locked.png")


def test_mixed_folder_skips_and_reports_or_refuses_when_strict(tmp_path):
    _write_all_formats(tmp_path)
    _write_bad_files(tmp_path)
    images = load_dataset(str(tmp_path), resolution=16)
    assert len(images) == 12 and len(images.skipped) == 5
    with pytest.raises(DataError, match="--strict"):
        load_dataset(str(tmp_path), resolution=16, strict=True)
    report = inspect_folder(tmp_path)
    assert report["usable"] == 12
    assert sorted(item["file"] for item in report["unusable"]) == ["bomb.png", "empty.png", "text.png", "tiny.png", "truncated.png"]


def test_skipped_files_are_warned_one_line_each_and_kept_in_the_manifest(tmp_path, capsys):
    _write_all_formats(tmp_path)
    expected = _write_bad_files(tmp_path)
    images = load_dataset(str(tmp_path), resolution=16)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"warning: skipped 5 unusable file(s) in {tmp_path} (--strict refuses them instead):"
    assert len(lines) == 6 and all(line.startswith("warning: ") for line in lines)
    for name, reason in expected.items():  # one line per file, naming it with its reason
        assert [line for line in lines[1:] if f"{tmp_path / name}:" in line and reason in line], name
    assert sorted(images.manifest()["skipped"]) == sorted(line.removeprefix("warning:   ") for line in lines[1:])
    load_dataset(str(tmp_path), resolution=16, shots=3)  # compare/evaluate reload a folder: no repeat
    assert capsys.readouterr().err == ""
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path), resolution=16, strict=True)
    assert str(error.value).startswith(f"{tmp_path / 'bomb.png'}: ") and "(and 4 more); --strict refuses" in str(error.value)


def test_dangling_image_symlinks_are_reported_not_dropped(tmp_path):
    _gradient().save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "moved-away.png")
    images = load_dataset(str(tmp_path), resolution=16)
    assert len(images) == 1 and len(images.skipped) == 1 and str(tmp_path / "b.png") in images.skipped[0]
    assert [item["file"] for item in inspect_folder(tmp_path)["unusable"]] == ["b.png"]


def test_unlistable_subfolder_is_an_error(tmp_path, monkeypatch):
    import os

    _gradient().save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    real = os.scandir

    def scandir(path="."):  # root can list mode-000 folders: fail the listing as it would for a user
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"sub: cannot list folder \(Permission denied\); fix its permissions"):
        load_dataset(str(tmp_path), resolution=16)


def test_folders_without_usable_images_refuse(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        load_dataset(str(tmp_path))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 image files is usable"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(str(tmp_path / "missing"))


def test_duplicates_are_reported(tmp_path):
    base = _gradient()
    base.save(tmp_path / "a.png")
    base.save(tmp_path / "b.bmp")  # same pixels, other format
    base.resize((80, 48)).save(tmp_path / "c.png")  # resized: near duplicate
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    report = inspect_folder(tmp_path)
    assert report["exact_duplicates"] == [["a.png", "b.bmp"]]
    near = {frozenset((pair["a"], pair["b"])) for pair in report["near_duplicates"]}
    assert frozenset(("a.png", "c.png")) in near
    assert not any("noise.png" in pair for pair in near)
