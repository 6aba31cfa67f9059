"""Built-in data: disjoint splits and deterministic, nested k-shot selection."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from genadapt.data import load_dataset
from genadapt.data.imageset import pixel_hash
from genadapt.errors import DataError


@pytest.fixture(scope="module")
def domains():
    names = ["source/train", "source/reference", "flags/train", "flags/reference", "dark-skin/train", "dark-skin/reference"]
    return {name: load_dataset(f"builtin:openmoji/{name}", resolution=32) for name in names}


def test_openmoji_renders_captioned_rgb(domains):
    source = domains["source/train"]
    assert len(source) > 2500 and source.pixels.shape[1:] == (32, 32, 3)
    assert all(source.captions) and all(record.label.startswith("source/") for record in source.records)
    assert source.pixels.std() > 20  # glyphs, not blank canvases


def test_splits_are_disjoint_by_id_and_by_pixels(domains):
    ids = [set(record.id for record in images.records) for images in domains.values()]
    pixels = [set(pixel_hash(p) for p in images.pixels) for images in domains.values()]
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            assert not ids[i] & ids[j]
            assert not pixels[i] & pixels[j]


def test_target_domains_are_what_they_say(domains):
    assert all(caption.startswith("flag") or "flag" in caption for caption in domains["flags/train"].captions)
    assert all("dark skin tone" in caption for caption in domains["dark-skin/reference"].captions)
    dark = re.compile(r"(?<!medium-)dark skin tone")
    assert not any(dark.search(caption) for caption in domains["source/train"].captions)
    assert not any(caption.split()[0] == "flag" for caption in domains["source/train"].captions)
    for name in ("flags/train", "flags/reference", "dark-skin/train", "dark-skin/reference"):
        assert len(domains[name]) >= 100


def test_k_shot_is_deterministic_and_nested():
    ten = load_dataset("builtin:openmoji/flags?shots=10&seed=0")
    again = load_dataset("builtin:openmoji/flags", shots=10, seed=0)
    five = load_dataset("builtin:openmoji/flags?shots=5&seed=0")
    other = load_dataset("builtin:openmoji/flags?shots=10&seed=1")
    assert [r.id for r in ten.records] == [r.id for r in again.records]
    assert {r.id for r in five.records} < {r.id for r in ten.records}
    assert {r.id for r in other.records} != {r.id for r in ten.records}
    assert ten.name == "builtin:openmoji/flags/train?shots=10&seed=0"


def test_digits_builtin():
    sevens = load_dataset("builtin:digits/7?shots=4", resolution=16)
    assert len(sevens) == 4 and sevens.pixels.shape == (4, 16, 16, 3)
    assert all("seven" in caption for caption in sevens.captions)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("builtin:openmoji/cats", "unknown OpenMoji domain"),
        ("builtin:openmoji/source/test", "unknown split"),
        ("builtin:nope", "unknown built-in dataset"),
        ("builtin:openmoji/flags?shots=ten", "must be integers"),
        ("builtin:openmoji/flags?shots=100000", "only"),
        ("builtin:openmoji/flags?size=3", "unknown option"),
    ],
)
def test_bad_builtin_specs(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_manifest_records_every_item():
    shots = load_dataset("builtin:openmoji/flags?shots=3&seed=2")
    manifest = shots.manifest()
    assert manifest["count"] == 3 and len(manifest["items"]) == 3
    assert all(len(item["sha256"]) == 64 for item in manifest["items"])
    assert np.array_equal(load_dataset("builtin:openmoji/flags?shots=3&seed=2").pixels, shots.pixels)


def test_records_survive_a_json_round_trip_hashable():
    import json

    from genadapt.data.imageset import ImageRecord

    record = ImageRecord(id="a.png", caption="x", original_size=(40, 20), crop_top_left=(16, 0))
    again = ImageRecord(**json.loads(json.dumps(record.__dict__)))
    assert again == record and hash(again) == hash(record)


def test_processes_rendering_the_cache_at_once_both_finish(tmp_path, monkeypatch):
    """Two first runs on a fresh cache render OpenMoji together; each writes under its own temp name, so neither
    finds its file renamed away by the other (it did: a shared `.tmp.npz`)."""
    import threading

    from genadapt.data import openmoji

    monkeypatch.setenv("GENADAPT_CACHE", str(tmp_path))
    codes = [code for code in openmoji._codes() if openmoji.describe(code) is not None][:40]
    monkeypatch.setattr(openmoji, "_codes", lambda: codes)
    monkeypatch.setattr(openmoji, "render", lambda batch, resolution: np.stack([np.full((resolution, resolution, 3), i, dtype=np.uint8) for i in range(len(batch))]))
    both_written = threading.Barrier(2, timeout=30)
    replace = os.replace

    def replace_once_both_wrote(source, destination):  # the interleaving that broke: both write, then both rename
        if Path(destination).parent == tmp_path:
            both_written.wait()
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_once_both_wrote)
    results, errors = [], []

    def first_run():
        try:
            results.append(len(openmoji.load_all(8)))
        except Exception as exc:  # noqa: BLE001 - the test reports what a racing process would have raised
            errors.append(exc)

    threads = [threading.Thread(target=first_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1] > 0
    assert [path.name for path in tmp_path.iterdir()] == [f"openmoji-{openmoji._version()}-8px-v2.npz"]
    assert len(openmoji.load_all(8)) == results[0]  # the cache reads back
