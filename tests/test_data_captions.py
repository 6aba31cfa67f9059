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
