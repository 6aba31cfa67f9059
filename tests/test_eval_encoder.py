"""The eval-encoder: a tiny pretrain writes a loadable, deterministic encoder, resumes exactly,
and never trains on a target-domain image."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from genadapt.data import load_dataset
from genadapt.data.imageset import pixel_hash
from genadapt.errors import UserError
from genadapt.zoo import eval_encoder as E


def tiny(**changes) -> E.EvalEncoderConfig:
    settings = dict(widths=(8, 16), projection_dim=8, steps=4, batch=16, warmup_steps=2, checkpoint_every=2, log_every=1)
    settings.update(changes)
    return E.EvalEncoderConfig(**settings)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-encoder")
    return out, E.pretrain(out, tiny())


def test_pretrain_writes_a_loadable_deterministic_encoder(run):
    out, model = run
    assert model == out / "model"
    assert {p.name for p in model.iterdir()} == {"encoder.safetensors", "config.json"}
    for name in ("config.yaml", "manifest.json", "log.jsonl", "metrics.json", "checkpoints/state.pt"):
        assert (out / name).is_file(), name
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    encoder = E.load_eval_encoder(model)
    assert re.fullmatch(r"pocket-eval-encoder@[0-9a-f]{12}", encoder.extractor_id)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())

    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = encoder(images)
    assert feats.shape == (5, 16) and torch.isfinite(feats).all()
    assert torch.equal(feats, encoder(images))  # eval mode: no batch statistics, no randomness
    assert torch.equal(feats, E.load_eval_encoder(model)(images))  # the saved file is the whole model
    assert torch.equal(feats[:2], encoder(images[:2]))  # an image's feats do not depend on its batch
    assert encoder(torch.rand(3, 3, 64, 64) * 2 - 1).shape == (3, 16)  # other sizes are resized to 32

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extractor_id"] == encoder.extractor_id and metrics["steps"] == 4
    assert 0 <= metrics["held_out_knn"]["5nn_accuracy"] <= 1
    assert set(metrics["retrieval_top1"]) >= {"held_out", "flags/reference (unseen domain)"}
    assert all(math.isfinite(v) for v in metrics["fid_vs_source_train"].values())


def test_no_target_domain_image_is_in_the_training_set(run):
    out, _ = run
    manifest = json.loads((out / "manifest.json").read_text())
    trained = manifest["data"]["train"]["items"]
    targets = [load_dataset(f"builtin:openmoji/{name}") for name in ("flags/train", "flags/reference", "dark-skin/train", "dark-skin/reference")]
    target_ids = {r.id for images in targets for r in images.records}
    target_hashes = {pixel_hash(p) for images in targets for p in images.pixels}
    assert len(target_hashes) > 500
    assert not {item["id"] for item in trained} & target_ids
    assert not {item["sha256"] for item in trained} & target_hashes
    # The manifest is what was trained on: the same images, by pixel hash, as `training_data` gives.
    train, held_out = E.training_data(tiny())
    assert [pixel_hash(p) for p in train.pixels] == [item["sha256"] for item in trained]
    assert not {pixel_hash(p) for p in train.pixels} & target_hashes
    labels = {item["label"].split("/")[0] for item in trained}
    assert "source" in labels and any(label.isdigit() for label in labels)  # OpenMoji source and digits
    assert {r.id for r in held_out.records}.isdisjoint(item["id"] for item in trained)


@pytest.mark.parametrize("spec", ["builtin:openmoji/flags", "builtin:openmoji/dark-skin/reference", "builtin:openmoji"])
def test_target_domain_data_is_refused(spec):
    with pytest.raises(UserError, match="must not see"):
        E.training_data(tiny(data=("builtin:digits", spec)))


def test_resume_after_an_interruption_gives_the_same_encoder(run, tmp_path, monkeypatch):
    _, uninterrupted = run
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    real_step = E.train_step

    def dies_on_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(E, "train_step", dies_on_step_three)
    with pytest.raises(KeyboardInterrupt):
        E.pretrain(out, tiny())
    assert torch.load(out / "checkpoints" / "state.pt", weights_only=True)["step"] == 2
    assert not (out / "model").exists()
    monkeypatch.setattr(E, "train_step", real_step)
    model = E.pretrain(out, tiny())
    resumed, straight = load_file(model / "encoder.safetensors"), load_file(uninterrupted / "encoder.safetensors")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert E.load_eval_encoder(model).extractor_id == E.load_eval_encoder(uninterrupted).extractor_id
    with pytest.raises(UserError, match="different config"):
        E.pretrain(out, tiny(lr=1e-4))


def test_nt_xent_prefers_aligned_views():
    z = torch.eye(8)
    # Each view's positive is identical and orthogonal to all negatives: the loss tends to 0 as τ -> 0.
    assert E.nt_xent(z, z, temperature=0.05).item() < 1e-6
    # Positives no closer than negatives: the loss is log(2N - 1), the uniform softmax over 2N - 1 others.
    same = torch.ones(8, 4)
    assert E.nt_xent(same, same, temperature=0.5).item() == pytest.approx(math.log(15), rel=1e-6)


def test_augment_keeps_white_backgrounds_and_range():
    config = E.EvalEncoderConfig()
    white = torch.ones(4, 3, 32, 32)
    # Rotation, scale and shift fill with white, and contrast/saturation leave a flat image alone:
    # only brightness may change a blank icon.
    geometric = E.augment(white, E.EvalEncoderConfig(brightness=0.0), torch.Generator().manual_seed(0))
    assert torch.allclose(geometric, white, atol=1e-5)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    views = E.augment(images, config, torch.Generator().manual_seed(1))
    again = E.augment(images, config, torch.Generator().manual_seed(1))
    assert views.shape == images.shape and views.min() >= -1 and views.max() <= 1
    assert torch.equal(views, again) and not torch.equal(views, images)
