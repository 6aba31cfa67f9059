"""`genadapt distill --kind architecture` on a StyleGAN2 teacher (GAN Compression): a narrower student
that imitates its teacher. Tiny random teacher, CPU, one thread."""

import json

import pytest
import torch

from genadapt.api import distill
from genadapt.config import DistillConfig
from genadapt.errors import UserError
from genadapt.eval import distill as judge
from genadapt.families import gan
from genadapt.families.stylegan2 import sample, save_stylegan2
from genadapt.families.stylegan2_nets import Discriminator, Generator
from genadapt.recipes import distill_gan as dg
from genadapt.techniques.distill import build_student_generator, gan_compression_adapters

G_KWARGS = {"size": 16, "style_dim": 32, "n_mlp": 2, "channels": {4: 64, 8: 64, 16: 64}}
D_KWARGS = {"size": 16, "channels": {4: 16, 8: 16, 16: 16}}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher") / "model"
    return save_stylegan2(folder, Generator(**G_KWARGS).eval(), Discriminator(**D_KWARGS), G_KWARGS, D_KWARGS)


def test_student_shape_and_slice_init():
    torch.manual_seed(0)
    teacher = Generator(**G_KWARGS)
    student, kwargs = build_student_generator(teacher, 0.25)
    assert kwargs["channels"] == {4: 16, 8: 16, 16: 16}
    assert torch.equal(student.style[1].weight, teacher.style[1].weight)  # mapping network copied
    assert torch.equal(student.noises.noise_3, teacher.noises.noise_3)  # same fixed noise
    assert torch.equal(student.convs[0].conv.weight, teacher.convs[0].conv.weight[:, :16, :16])
    adapters = gan_compression_adapters(student, teacher)
    assert [a.in_channels for a in adapters] == [16] * 5 and [a.out_channels for a in adapters] == [64] * 5


def test_gan_teacher_other_kind_is_refused(teacher_dir, tmp_path):
    with pytest.raises(UserError, match="only --kind architecture"):
        distill(DistillConfig(teacher=str(teacher_dir), kind="progressive", out=str(tmp_path / "run")))


def test_distill_gan_student_imitates_teacher(teacher_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(dg, "EVAL_SAMPLES", 32)
    monkeypatch.setattr(judge, "TIMING_BATCH", 8)
    monkeypatch.setattr(judge, "quality", _quality_with_small_extractor(judge.quality))
    out = tmp_path / "run"
    config = DistillConfig(teacher=str(teacher_dir), kind="architecture", out=str(out), steps=60, batch_size=8,
                           student_width=0.25, checkpointing_steps=30)
    assert distill(config) == out
    report = json.loads((out / "report.json").read_text())
    for name in ("config.yaml", "run.json", "manifest.json", "log.jsonl", "summary.json", "checkpoints/state.pt", "samples/student.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text()) == {"kind": "distill", "family": "gan", "base": str(teacher_dir), "artifact": "model", "distill_kind": "architecture"}
    assert json.loads((out / "summary.json").read_text())["device"] == report["eval"]["device"]  # the accelerator's

    teacher_cost, student_cost = report["generator"]["teacher"], report["generator"]["student"]
    assert student_cost["synthesis_parameters"] < teacher_cost["synthesis_parameters"] / 4
    assert student_cost["flops_per_image"] < teacher_cost["flops_per_image"] / 4
    assert student_cost["ms_per_image"] < teacher_cost["ms_per_image"]

    # A valid StyleGAN2 folder: gan.load reads it and it samples at the teacher's resolution.
    model = gan.load(str(out / "model"))
    from genadapt.models import load_run

    assert load_run(out).g_ema.channels == model.g_ema.channels  # the run folder loads as its artifact
    assert {r: c for r, c in model.g_ema.channels.items() if r <= 16} == {4: 16, 8: 16, 16: 16}
    assert gan.sample(model, 2, seed=0).shape == (2, 3, 16, 16)

    # The defining property: training moves the student towards the teacher on held-out latents.
    teacher = gan.load(str(teacher_dir)).g_ema
    fresh, _ = build_student_generator(teacher, 0.25)
    z_seed = 123
    target = sample(teacher, 32, z_seed)
    before = float((sample(fresh, 32, z_seed) - target).square().mean())
    after = float((sample(model.g_ema, 32, z_seed) - target).square().mean())
    assert after < 0.7 * before, (before, after)
    training = report["training"]
    assert training["held_out_loss_after"]["loss"] < training["held_out_loss_before"]["loss"]
    assert report["quality"]["to_teacher_same_latents"]["pixel_mse"] == pytest.approx(after, rel=1.0)
    assert "value" in report["quality"]["kid_student_vs_teacher"]

    # Rerunning the finished run resumes from its checkpoint (no steps left) and agrees.
    distill(config)
    again = json.loads((out / "report.json").read_text())
    assert again["quality"]["to_teacher_same_latents"] == report["quality"]["to_teacher_same_latents"]


def _quality_with_small_extractor(quality):
    """The pocket eval-encoder when shipped; otherwise a fixed random conv, so the test runs anywhere."""
    from genadapt.eval.features import get_extractor

    def run(student, teacher, n, seed, extractor=None):
        try:
            get_extractor("pocket")
        except UserError:
            torch.manual_seed(0)
            extractor = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(2))
        return quality(student, teacher, n, seed, extractor)

    return run
