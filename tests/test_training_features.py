"""The training features of docs/training.md, each by its defining property, on tiny runs.

Scheduler: the learning rate of every step is diffusers' get_scheduler's. Min-SNR: the weights are the formula's.
Flip: a flipped variant is the mirror image. EMA: the saved weights are the running average of the per-step
weights. Buckets: every image in exactly one bucket, within the aspect tolerance; batches within a bucket; SDXL's
size ids follow the crop. Captions: dropout 1.0 gives empty prompts, shuffling keeps the first N tags, and text is
encoded per step only then. TensorBoard: the events read back. Resume: bit-exact with all of it on.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from diffusion_fixtures import build_tiny_pipeline, build_tiny_sdxl_pipeline
from genadapt.config import AdaptConfig
from genadapt.errors import Interrupted, UserError
from genadapt.families import diffusion
from genadapt.recipes import adapt, trainable_state

DATA = "builtin:digits/3?shots=4"
PHOTO_SIZES = [(120, 80), (120, 80), (80, 120), (64, 64), (200, 50), (90, 100)]  # (width, height)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Non-square photos with comma-separated tag captions (kohya style)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(PHOTO_SIZES):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"photo {i}, red, green, blue, round")
    return folder


def _config(base, out, **values):
    settings = dict(base=base, data=DATA, steps=4, batch_size=2, checkpointing_steps=100, num_validation_images=1, sample_steps=1,
                    learning_rate=1e-2, out=out)
    settings.update(values)
    return AdaptConfig(**settings)


def _run(base, out, **values):
    return adapt(_config(base, out, **values))


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _reference_lrs(name, lr, steps, **options):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = get_scheduler(name, optimizer=optimizer, num_training_steps=steps, **options)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# ----------------------------------------------------------------------------- schedule, loss weighting, optimisers


@pytest.mark.parametrize("name, options", [
    ("constant", {}),
    ("linear", {"num_warmup_steps": 2}),
    ("cosine_with_restarts", {"num_warmup_steps": 1, "num_cycles": 2}),
    ("polynomial", {"num_warmup_steps": 2, "power": 2.0}),
])
def test_the_learning_rate_of_every_step_is_diffusers_get_scheduler(base, tmp_path, name, options):
    flags = {"lr_warmup_steps": options.get("num_warmup_steps", 0), "lr_num_cycles": options.get("num_cycles", 1),
             "lr_power": options.get("power", 1.0)}
    _run(base, tmp_path / name, steps=6, lr_scheduler=name, **flags)
    logged = [record["lr"] for record in _log(tmp_path / name)]
    assert logged == pytest.approx(_reference_lrs(name, 1e-2, 6, **options), rel=1e-12, abs=1e-15)


def test_a_schedule_shaped_by_the_step_count_keeps_it_when_resumed(base, tmp_path):
    _run(base, tmp_path / "run", steps=2, checkpointing_steps=1, lr_scheduler="cosine")
    with pytest.raises(UserError, match="cosine schedule over 2 optimiser steps"):
        _run(base, tmp_path / "run", steps=4, checkpointing_steps=1, lr_scheduler="cosine")


def test_min_snr_weights_are_the_formula():
    from diffusers import DDPMScheduler

    from genadapt.recipes.train import denoise_term, min_snr_weights
    from genadapt.zoo import pocket_sd

    timesteps = torch.tensor([0, 1, 10, 100, 400, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler.from_config({**pocket_sd.noise_scheduler_config(), "prediction_type": prediction_type})
        alphas = scheduler.alphas_cumprod.double()[timesteps]
        snr = alphas / (1 - alphas)
        expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
        assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0).double(), expected, rtol=1e-5)
    # the denoising term: the per-sample mean squared error, weighted, then averaged over the batch
    model = type("Model", (), {"noise_scheduler": scheduler})()
    prediction, target = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    weighted = (per_sample * min_snr_weights(scheduler, timesteps, 5.0)).mean()
    assert torch.allclose(denoise_term(model, prediction, target, timesteps, 5.0), weighted)
    assert torch.allclose(denoise_term(model, prediction, target, timesteps, None), per_sample.mean())


def test_every_optimizer_is_the_named_one_and_steps():
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    from genadapt.recipes.optim import make_optimizer

    for name, kind in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("prodigy", Prodigy), ("adafactor", Adafactor)):
        weight = torch.nn.Parameter(torch.ones(4, 4))
        optimizer = make_optimizer(name, [weight], 1.0 if name == "prodigy" else 1e-2, 0.0)
        assert type(optimizer) is kind, name
        for _ in range(3):
            (weight ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert weight.detach().abs().max() < 1, name
    assert not make_optimizer("adafactor", [torch.nn.Parameter(torch.ones(2))], 1e-2, 0.0).param_groups[0]["relative_step"]


def test_the_adam_flags_reach_the_optimiser_and_default_to_the_loops(base, tmp_path):
    """diffusers' --adam_beta1/2, --adam_weight_decay, --adam_epsilon set the optimiser the run checkpoints; unset, the
    technique's weight decay (LoRA's 1e-2) and torch's β and ε."""
    def group(run, **values):
        _run(base, tmp_path / run, steps=1, checkpointing_steps=1, **values)
        return torch.load(tmp_path / run / "checkpoints" / "state.pt", weights_only=True)["optimizer"]["param_groups"][0]

    given = group("given", train="lora", adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.05, adam_epsilon=1e-6)
    assert (tuple(given["betas"]), given["weight_decay"], given["eps"]) == ((0.8, 0.95), 0.05, 1e-6)
    default = group("default", train="lora")
    assert (tuple(default["betas"]), default["weight_decay"], default["eps"]) == ((0.9, 0.999), 1e-2, 1e-8)


def test_a_missing_or_unusable_optional_package_is_a_one_line_error(monkeypatch, tmp_path):
    from genadapt.cli import app
    from genadapt.recipes import optim

    monkeypatch.setattr(optim, "missing", lambda module: module in ("prodigyopt", "tensorboard"))
    runner = CliRunner()
    for args, message in (
        (["--optimizer", "prodigy"], "pip install 'genadapt[optim]' (or pip install prodigyopt)"),
        (["--report-to", "tensorboard"], "pip install 'genadapt[tensorboard]' (or pip install tensorboard)"),
        (["--optimizer", "adamw8bit", "--cpu"], "runs on CUDA GPUs only"),
    ):
        result = runner.invoke(app, ["adapt", "--data", DATA, "--out", str(tmp_path / "never"), *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "never").exists()


REFUSED = [
    ({"keep_tokens": 1}, "--keep-tokens applies with --shuffle-caption"),
    ({"ema_decay": 0.99}, "--ema-decay applies with --use-ema"),
    ({"lr_warmup_steps": 10}, "--lr-scheduler constant has no warmup"),
    ({"lr_num_cycles": 3, "lr_scheduler": "cosine"}, "--lr-num-cycles applies to --lr-scheduler cosine_with_restarts"),
    ({"lr_power": 2.0, "lr_scheduler": "linear"}, "--lr-power applies to --lr-scheduler polynomial"),
    ({"center_crop": True, "random_crop": True}, "give one of them"),
    ({"random_crop": True, "fit": "pad"}, "--fit pad pads them instead"),
    ({"enable_bucket": True, "fit": "pad"}, "--fit pad pads them instead"),
    ({"random_flip": True, "augment": "diffaugment"}, "--random-flip is --augment flip"),
    ({"random_crop": True, "augment": "diffaugment"}, "use one of them"),
    ({"instance_prompt": "a dog", "caption": "a cat"}, "give one of them"),
    ({"min_bucket_reso": 32}, "--min-bucket-reso applies with --enable-bucket"),
    ({"train": "embedding", "use_ema": True}, "use --use-ema with --train full, freeze, lora"),
    ({"optimizer": "adam", "adam_weight_decay": 0.1}, "--optimizer adam has none (use --optimizer adamw)"),
    ({"optimizer": "adafactor", "adam_epsilon": 1e-6}, "--adam-epsilon applies to the Adam-family optimisers"),
]


@pytest.mark.parametrize("values, message", REFUSED, ids=[" ".join(v) for v, _ in REFUSED])
def test_settings_a_run_would_not_honour_are_refused(values, message, tmp_path):
    with pytest.raises(UserError, match=None) as error:
        AdaptConfig(data=DATA, out=tmp_path / "never", **values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_resolution_off_the_latent_grid_is_refused(base, tmp_path):
    with pytest.raises(UserError, match="multiples of 16 px.*use 32 or 48"):
        _run(base, tmp_path / "odd", resolution=40, steps=1)


# ----------------------------------------------------------------------------- EMA


def test_the_saved_weights_are_the_ema_of_the_per_step_weights(base, tmp_path):
    from diffusers.training_utils import EMAModel

    decay = 0.3
    per_step = []
    for steps in range(1, 5):  # one run, continued a step at a time: its weights after every step
        summary = _run(base, tmp_path / "raw", steps=steps, checkpointing_steps=1)
        per_step.append(trainable_state(summary["model"]))
    summary = _run(base, tmp_path / "ema", steps=4, use_ema=True, ema_decay=decay)
    saved = trainable_state(summary["model"])

    # by hand: θ̄_1 = θ_1, θ̄_k = d_k θ̄_(k-1) + (1 - d_k) θ_k with EMAModel's d_k = min(decay, k / (9 + k))
    average = {name: value.clone() for name, value in per_step[0].items()}
    for k in range(2, 5):
        d = min(decay, k / (9 + k))
        assert d == EMAModel([torch.zeros(1)], decay=decay).get_decay(k)
        for name in average:
            average[name] = d * average[name] + (1 - d) * per_step[k - 1][name]
    assert saved.keys() == average.keys()
    for name in saved:
        assert torch.allclose(saved[name], average[name], rtol=1e-5, atol=1e-7), name
        assert not torch.equal(saved[name], per_step[-1][name]) or torch.equal(per_step[0][name], per_step[-1][name])

    artifact = load_file(tmp_path / "ema" / "pytorch_lora_weights.safetensors")
    ema_values = [value for value in saved.values()]
    for value in artifact.values():  # every saved tensor is one of the EMA's
        assert any(value.shape == e.shape and torch.equal(value, e) for e in ema_values)
    assert json.loads((tmp_path / "ema" / "summary.json").read_text())["saved_weights"] == "ema"


# ----------------------------------------------------------------------------- sizes: resolution, buckets, crops, flips


def test_buckets_hold_every_image_once_within_the_aspect_tolerance():
    from genadapt.data import buckets as sizing

    rng = np.random.default_rng(1)
    sizes = [(int(w), int(h)) for w, h in rng.integers(40, 4000, size=(500, 2))] + [(100, 100), (3000, 200), (200, 3000)]
    for resolution, step in ((512, 64), (1024, 64), (64, 16)):
        low, high = sizing.bucket_range(resolution, step, None, None)
        buckets = sizing.bucket_resolutions(resolution, step, low, high)
        tolerance = sizing.aspect_tolerance(buckets)
        assert len(set(buckets)) == len(buckets) and (resolution, resolution) in buckets and tolerance < math.log(1.35)
        for width, height in buckets:
            assert width % step == 0 and height % step == 0 and low <= min(width, height) and max(width, height) <= high
            assert width * height <= resolution ** 2
            assert (height, width) in buckets  # both orientations
        for width, height in sizes:
            chosen = sizing.nearest_bucket(width, height, buckets)
            errors = [abs(math.log(width / height) - math.log(w / h)) for w, h in buckets]
            assert errors[chosen] == min(errors)  # the nearest (an index: exactly one bucket)
            if sizing.in_range(width, height, buckets):
                assert errors[chosen] <= tolerance + 1e-9

    # fitting: each image in exactly one bucket, resized to cover it, cropped on one side only
    small = [(w // 20 + 8, h // 20 + 8) for w, h in sizes[:60]]
    buckets, fitted = sizing.plan([Image.new("RGB", size) for size in small], 64, 16, True, None, None)
    assert sorted(item.source for item in fitted) == list(range(len(small)))
    for item, (width, height) in zip(fitted, small):
        bh, bw = item.bucket
        assert (bw, bh) == buckets[sizing.nearest_bucket(width, height, buckets)]
        assert item.original == (height, width) and item.resized[0] >= bh and item.resized[1] >= bw and min(item.room) == 0
        assert item.center().shape == (bh, bw, 3)


def test_a_bucketed_run_draws_each_batch_from_one_bucket(base, photos, tmp_path, monkeypatch, capsys):
    shapes = []
    predict = diffusion.predict

    def recording(model, unet, noisy, timesteps, text, sizes=None):
        shapes.append(tuple(noisy.shape))
        return predict(model, unet, noisy, timesteps, text, sizes)

    monkeypatch.setattr(diffusion, "predict", recording)
    _run(base, tmp_path / "bucketed", data=str(photos), resolution=64, enable_bucket=True, steps=12, batch_size=2)
    summary = json.loads((tmp_path / "bucketed" / "summary.json").read_text())
    assert sum(summary["buckets"].values()) == len(PHOTO_SIZES) and len(summary["buckets"]) > 2
    factor = 4  # the tiny pipeline's VAE factor
    trained = {f"{w * factor}x{h * factor}" for _, _, h, w in shapes}
    assert len(trained) > 1 and trained <= set(summary["buckets"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == len({size for size in PHOTO_SIZES if size != (64, 64)})  # one line per distinct resized size
    assert any("120x80: resized to 80x53, center-cropped to 80x48" in line for line in notes)
    assert "resolution: 64" in (tmp_path / "bucketed" / "config.yaml").read_text()


def test_sdxl_size_ids_follow_the_bucket_and_the_random_crop(photos, tmp_path_factory, monkeypatch):
    xl = str(build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl")))
    seen = []
    predict = diffusion.predict

    def recording(model, unet, noisy, timesteps, text, sizes=None):
        seen.append((tuple(noisy.shape), sizes.clone()))
        return predict(model, unet, noisy, timesteps, text, sizes)

    monkeypatch.setattr(diffusion, "predict", recording)
    out = tmp_path_factory.mktemp("xl") / "run"
    _run(xl, out, data=str(photos), resolution=64, enable_bucket=True, random_crop=True, random_flip=True, steps=8, batch_size=2)
    originals = {(h, w) for w, h in PHOTO_SIZES}
    crops = set()
    for shape, sizes in seen:
        for oh, ow, top, left, th, tw in sizes.long().tolist():
            assert (th, tw) == (shape[2] * 4, shape[3] * 4)  # the target is the bucket trained at
            assert (oh, ow) in originals and top >= 0 and left >= 0
            crops.add((top, left))
    assert len(crops) > 1  # random positions


def test_a_flipped_variant_is_the_mirror_image(base, photos, tmp_path, monkeypatch):
    from genadapt.data import buckets as sizing
    from genadapt.recipes import train

    model = diffusion.load(base)
    encoded = []
    encode = diffusion.encode_images
    monkeypatch.setattr(diffusion, "encode_images", lambda model, pixels, batch_size=64: (encoded.append(pixels), encode(model, pixels))[1])

    # cached variants (--random-flip is --augment flip): the second half mirrors the first
    from genadapt.data import load_dataset

    images = load_dataset(DATA, resolution=32)
    config = _config(base, tmp_path / "x", random_flip=True)
    assert train.augment_spec(config) == "flip"
    [bucket], _ = train.training_buckets(model, images, config, 32, None)
    pixels = encoded[-1]
    assert torch.equal(pixels[len(images):], pixels[: len(images)].flip(-1)) and bucket.flip.tolist() == [False] * 4 + [True] * 4

    # random crops: a flipped variant's crop is the mirror of the same crop, and SDXL's left corner is mirrored too
    item = sizing.fit(Image.fromarray(np.random.default_rng(2).integers(0, 255, (80, 120, 3), dtype=np.uint8)), 0, (32, 32))
    assert item.resized == (32, 48) and item.room == (0, 16)
    flip_bucket = train.Bucket((32, 32), torch.tensor([0, 0]), torch.tensor([False, True]), fitted=[item, item])
    draws = torch.tensor([[0.5, 0.3], [0.5, 0.3]])
    _, _, rows = train.random_crops(model, flip_bucket, torch.tensor([0, 1]), draws)
    plain, flipped = encoded[-1]
    assert torch.equal(flipped, plain.flip(-1))
    assert rows[0, 3] + rows[1, 3] == item.room[1] and rows[0, 2] == rows[1, 2]


# ----------------------------------------------------------------------------- captions


def test_caption_shuffle_keeps_the_first_tags_and_dropout_empties():
    from genadapt.recipes.train import vary_caption

    caption = "sks dog, red, green, blue, round, small"
    generator = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(30):
        shuffled = vary_caption(caption, 2, torch.rand(6, generator=generator), False)
        tags = shuffled.split(", ")
        assert tags[:2] == ["sks dog", "red"] and sorted(tags) == sorted(caption.split(", "))
        orders.add(shuffled)
    assert len(orders) > 5
    assert vary_caption(caption, 0, None, True) == "" and vary_caption(caption, 0, None, False) == caption


def test_caption_dropout_encodes_empty_prompts_every_step(base, tmp_path, monkeypatch):
    tokenized = []
    tokenize = diffusion.tokenize
    monkeypatch.setattr(diffusion, "tokenize", lambda model, captions: (tokenized.append(list(captions)), tokenize(model, captions))[1])
    _run(base, tmp_path / "cached", steps=3)
    assert len(tokenized) == 1  # captions fixed: tokenized (and encoded) once, before training
    tokenized.clear()
    _run(base, tmp_path / "dropout", steps=3, caption_dropout=1.0)
    assert len(tokenized) == 1 + 3 and all(caption == "" for step in tokenized[1:] for caption in step)
    tokenized.clear()
    _run(base, tmp_path / "shuffle", steps=3, shuffle_caption=True, keep_tokens=1)
    assert len(tokenized) == 1 + 3 and all(len(step) == 2 for step in tokenized[1:])


def test_instance_prompt_replaces_every_caption_and_caption_fills_the_missing(base, photos, tmp_path, capsys):
    import shutil

    folder = tmp_path / "some-captioned"
    shutil.copytree(photos, folder)
    for name in ("p0.txt", "p1.txt"):
        (folder / name).unlink()
    _run(base, tmp_path / "instance", data=str(folder), steps=1, instance_prompt="a photo of sks")
    assert set(json.loads((tmp_path / "instance" / "prompts.json").read_text())) == {"a photo of sks"}
    _run(base, tmp_path / "fallback", data=str(folder), steps=1, caption="a photo of sks")
    prompts = json.loads((tmp_path / "fallback" / "prompts.json").read_text())
    assert prompts.count("a photo of sks") == 2 and len(set(prompts)) == len(PHOTO_SIZES) - 1
    assert "have no caption" not in capsys.readouterr().err
    _run(base, tmp_path / "none", data=str(folder), steps=1)
    assert "warning: 2 of 6 image(s) have no caption" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tensorboard, resume


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_events_hold_the_loss_terms_lr_and_grids(base, tmp_path):
    _run(base, tmp_path / "tb", steps=3, report_to="tensorboard", sample_every=2, lr_scheduler="linear")
    events = _events(tmp_path / "tb" / "logs")
    tags = events.Tags()
    assert {"loss/loss", "loss/denoise", "lr"} <= set(tags["scalars"]) and "samples" in tags["images"]
    assert [e.step for e in events.Scalars("loss/denoise")] == [1, 2, 3]
    logged = _log(tmp_path / "tb")
    assert [e.value for e in events.Scalars("loss/denoise")] == pytest.approx([r["denoise"] for r in logged])
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([r["lr"] for r in logged])
    assert [e.step for e in events.Images("samples")] == [2, 3]


def test_a_gan_run_schedules_both_rates_and_reports_to_tensorboard(tmp_path):
    from genadapt.families.stylegan2 import R1_INTERVAL

    out = tmp_path / "gan"
    adapt(AdaptConfig(base="pocket-stylegan2", data=DATA, steps=3, batch_size=2, num_validation_images=2, out=out,
                      lr_scheduler="linear", lr_warmup_steps=1, report_to="tensorboard"))
    logged = _log(out)
    reference = _reference_lrs("linear", 0.002, 3, num_warmup_steps=1)
    assert [r["lr"] for r in logged] == pytest.approx(reference)
    d_factor = R1_INTERVAL / (R1_INTERVAL + 1)  # StyleGAN2's lazy-R1 correction of D's rate
    assert [r["d_lr"] for r in logged] == pytest.approx([lr * d_factor for lr in reference])
    tags = _events(out / "logs").Tags()
    assert {"loss/d_loss", "loss/g_loss", "loss/d_adv", "loss/g_adv", "lr", "d_lr", "train/real_score"} <= set(tags["scalars"])
    assert "samples" in tags["images"]


def test_resume_is_bit_exact_with_schedule_ema_and_caption_dropout(base, tmp_path, monkeypatch):
    from genadapt.recipes import GracefulStop

    settings = dict(steps=4, checkpointing_steps=100, lr_scheduler="cosine", lr_warmup_steps=1, use_ema=True, ema_decay=0.5,
                    caption_dropout=0.5, shuffle_caption=True, snr_gamma=5.0, noise_offset=0.1, random_flip=True)
    _run(base, tmp_path / "straight", **settings)

    calls = {"count": 0}

    def stop_after_two(self, accelerator):
        calls["count"] += 1
        return calls["count"] == 2

    monkeypatch.setattr(GracefulStop, "requested", stop_after_two)
    with pytest.raises(Interrupted, match="after step 2"):
        _run(base, tmp_path / "resumed", **settings)
    monkeypatch.undo()
    _run(base, tmp_path / "resumed", **settings)

    assert _log(tmp_path / "straight") == _log(tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
