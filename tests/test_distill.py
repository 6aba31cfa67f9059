"""Each distillation kind's defining property, on a tiny SD pipeline briefly trained as a denoiser.

The teacher is `build_tiny_pipeline` plus ~100 denoising steps on digit latents: its sampling ODE
then curves like a real model's (a random UNet's barely does), which is what distillation must track.
Distances are MSE between final latents from the same initial noise and prompts (report.json).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from diffusion_fixtures import build_tiny_pipeline
from genadapt.families import diffusion
from genadapt.config import DistillConfig
from genadapt.recipes.distill import ddim_trailing, distill
from genadapt.techniques.distill import build_student_unet

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
SMALL = dict(prompts=PROMPTS, num_samples=16, teacher_sample_steps=20, batch_size=4, eval_images=8, reference_steps=20, checkpointing_steps=50, kid_images=64)


def _train_teacher(folder, steps=100):
    """A few denoising steps (Ho et al. 2020) on digit latents rescaled to unit variance, caption dropout 0.1."""
    from genadapt.data import load_dataset

    pipeline_folder = build_tiny_pipeline(folder)
    model = diffusion.load(str(pipeline_folder))
    images = load_dataset("builtin:digits", resolution=model.resolution)
    mean, std = diffusion.encode_images(model, images.tensors()[:256])
    model.vae.register_to_config(scaling_factor=float(1.0 / mean.std()))  # as pocket-sd sets it
    scale = model.vae.config.scaling_factor
    with torch.no_grad():
        embeds = diffusion.encode_text(model, diffusion.tokenize(model, images.captions[:256] + [""])).embeds
    generator = torch.Generator().manual_seed(0)
    unet = model.unet.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        index = torch.randint(len(mean), (16,), generator=generator)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scale
        text = torch.where((torch.rand(len(index), generator=generator) < 0.1).view(-1, 1, 1), embeds[-1:], embeds[index])
        noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
        loss = diffusion.denoise_loss(unet(noisy, timesteps, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.requires_grad_(False).eval()
    model.pipeline.save_pretrained(folder / "teacher")
    return str(folder / "teacher")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _train_teacher(tmp_path_factory.mktemp("distill-teacher"))


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_progressive_student_tracks_the_two_step_teacher(teacher, tmp_path):
    out = distill(DistillConfig(teacher=teacher, kind="progressive", out=str(tmp_path / "pd"), teacher_steps=4, student_steps=2, steps=120, learning_rate=1e-4, **SMALL))
    report = _report(out)
    student, same_steps = report["student"], report["teacher_same_steps"]
    # Salimans & Ho's defining property: n student steps reproduce 2n teacher DDIM steps from the same
    # noise, better than the teacher's own n steps do.
    assert student["to_distillation_target"]["latent_mse"] < 0.5 * same_steps["to_distillation_target"]["latent_mse"]
    assert student["to_reference"]["latent_mse"] < same_steps["to_reference"]["latent_mse"]
    assert student["unet_evals_per_image"] == 2 and same_steps["unet_evals_per_image"] == 4  # guidance is baked in
    pipeline = diffusion.load(str(out / "pipeline")).pipeline
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler" and pipeline.scheduler.config.timestep_spacing == "trailing"
    assert json.loads((out / "pipeline" / "genadapt.json").read_text())["sampling"]["num_inference_steps"] == 2
    assert (out / "rounds" / "2-steps" / "config.json").is_file()
    from genadapt.models import load_run, run_record

    assert run_record(out) == {"kind": "distill", "family": "diffusion", "base": teacher, "artifact": "pipeline", "distill_kind": "progressive"}
    assert load_run(out).unet.config == pipeline.unet.config  # the run folder loads as its artifact


def test_consistency_lora_loads_on_the_teacher_and_samples_in_few_steps(teacher, tmp_path):
    from diffusers import LCMScheduler

    weights = next(Path(teacher).glob("unet/*.safetensors"))
    teacher_hash = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = distill(DistillConfig(teacher=teacher, kind="consistency", out=str(tmp_path / "lcm"), student_steps=2, num_ddim_timesteps=8, rank=4, steps=200, learning_rate=1e-3, **SMALL))
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == teacher_hash, "distillation must not write into the teacher"
    assert json.loads((out / "run.json").read_text())["artifact"] is None  # a LoRA on the teacher, not a folder a family loads
    report = _report(out)
    # A consistency function maps z_T onto the teacher's ODE solution in one evaluation (Song et al. 2023,
    # §3; LCM §4): one student step beats two guided teacher DDIM steps (4 UNet evaluations).
    assert report["student_one_step"]["to_reference"]["latent_mse"] < 0.5 * report["teacher_same_steps"]["to_reference"]["latent_mse"]
    assert report["student"]["unet_evals_per_image"] == 2 and report["student_one_step"]["unet_evals_per_image"] == 1
    # The distribution check for a sampler that re-noises: KID to the teacher's many-step samples, with its floor.
    kid = report["distribution"]["kid"]
    assert set(kid) == {"teacher_reference_steps_other_noise", "teacher_same_steps", "student"}
    assert all(entry["n_a"] == entry["n_b"] == 64 and entry["ci_low"] <= entry["value"] <= entry["ci_high"] for entry in kid.values())

    pristine = diffusion.load(teacher)
    model = diffusion.load(teacher)
    model.pipeline.scheduler = LCMScheduler.from_config(model.pipeline.scheduler.config, original_inference_steps=8)
    model.pipeline.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    base = {k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in pristine.unet.state_dict().items()), "load_lora_weights must leave the base weights alone"
    lora_modules = {k.split(".lora_")[0] for k in model.unet.state_dict() if ".lora_A." in k}
    assert any(".attn1.to_q" in k for k in lora_modules) and any(k.endswith("resnets.0.conv1") for k in lora_modules), "every LCM-LoRA target loads"

    # Two LCMScheduler steps (999, 499 on the 8-point grid): the LoRA is what turns the teacher into a
    # few-step sampler. LCM's second step re-noises with fresh noise, so it leaves the teacher's
    # trajectory; the test compares it with the teacher under the same sampler, without the LoRA.
    latents = torch.randn((8, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    prompts = [PROMPTS[i % 2] for i in range(8)]

    def final(pipeline, steps, guidance):
        return pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), generator=torch.Generator().manual_seed(0), output_type="latent").images

    with torch.no_grad():
        lcm_lora = final(model.pipeline, 2, 1.0)
        model.pipeline.disable_lora()
        lcm_base = final(model.pipeline, 2, 4.0)
        pristine.pipeline.scheduler = ddim_trailing(pristine.pipeline.scheduler.config)
        reference = final(pristine.pipeline, 20, 4.0)
    assert torch.isfinite(lcm_lora).all()
    assert (lcm_lora - reference).square().mean() < 0.5 * (lcm_base - reference).square().mean()


def test_architecture_student_is_smaller_starts_from_the_teacher_and_learns(teacher, tmp_path):
    source = diffusion.load(teacher).unet
    student, init = build_student_unet(source, ["mid", "innermost"])
    # BK-SDM-Tiny initialisation: student up stage 0 is the teacher's up stage 1 (the innermost was
    # removed); the down path keeps its names. Checked before any training.
    assert init["mapping"]["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.1.resnets.1.conv1.weight"
    assert torch.equal(student.up_blocks[0].resnets[1].conv1.weight, source.up_blocks[1].resnets[1].conv1.weight)
    assert torch.equal(student.up_blocks[0].attentions[0].proj_out.weight, source.up_blocks[1].attentions[0].proj_out.weight)
    assert torch.equal(student.down_blocks[1].attentions[0].proj_in.weight, source.down_blocks[1].attentions[0].proj_in.weight)
    assert student.mid_block is None and len(student.down_blocks) == len(source.down_blocks) - 1

    out = distill(DistillConfig(teacher=teacher, kind="architecture", out=str(tmp_path / "bk"), student_steps=10, steps=80, learning_rate=3e-4, **SMALL))
    report = _report(out)
    cost = report["unet"]
    assert cost["student"]["parameters"] < 0.8 * cost["teacher"]["parameters"]
    assert cost["student"]["flops_per_eval"] < cost["teacher"]["flops_per_eval"]
    kd = report["architecture"]
    before, after = kd["held_out_loss_before"], kd["held_out_loss_after"]
    assert after["kd_out"] + after["kd_feat"] < 0.5 * (before["kd_out"] + before["kd_feat"])
    exported = diffusion.load(str(out / "pipeline")).unet
    assert exported.mid_block is None and sum(p.numel() for p in exported.parameters()) == cost["student"]["parameters"]


def test_bk_base_student_takes_each_up_stage_last_pair_from_the_teacher_last_pair():
    """BK-SDM-Base (`layer`): 2 -> 1 pairs per down stage, 3 -> 2 per up stage; the student's last up pair
    consumes the skip from the stage below, so it starts from the teacher's last (BK-SDM's
    `copy_weight_from_teacher`: up_blocks.i.resnets.1 <- up_blocks.i.resnets.2)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=16,
    )  # fmt: skip
    student, init = build_student_unet(teacher, ["layer"])
    assert [len(b.resnets) for b in student.up_blocks] == [2, 2] and [len(b.resnets) for b in student.down_blocks] == [1, 1]
    assert init["mapping"]["up_blocks.1.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert init["mapping"]["up_blocks.1.attentions.1.proj_in.weight"] == "up_blocks.1.attentions.2.proj_in.weight"
    assert torch.equal(student.up_blocks[1].resnets[1].conv1.weight, teacher.up_blocks[1].resnets[2].conv1.weight)
    assert not init["fresh"], "every student tensor has a teacher tensor of its shape"


def test_interrupted_progressive_run_resumes_into_the_same_run(teacher, tmp_path, monkeypatch):
    """Two rounds (4 -> 2 -> 1 steps): a run killed mid-way through round 2 continues from its checkpoint
    and logs exactly the losses of an uninterrupted run; changed settings are refused."""
    import genadapt.recipes.distill as recipe
    from genadapt.errors import UserError

    tiny = dict(SMALL, num_samples=4, teacher_sample_steps=4, eval_images=2, reference_steps=4, checkpointing_steps=4)
    settings = dict(teacher=teacher, kind="progressive", teacher_steps=4, student_steps=1, steps=6, learning_rate=1e-4, **tiny)
    whole = distill(DistillConfig(out=str(tmp_path / "whole"), **settings))

    real_progress = recipe.progress

    def killed_after(limit):
        def make(*args, **kwargs):
            bar = real_progress(*args, **kwargs)
            update = bar.update

            def update_or_die(n=1):
                update(n)
                if bar.n >= limit:
                    raise KeyboardInterrupt
            bar.update = update_or_die
            return bar
        return make

    config = DistillConfig(out=str(tmp_path / "resumed"), **settings)
    monkeypatch.setattr(recipe, "progress", killed_after(11))  # round 2, step 5: its checkpoint is step 4
    with pytest.raises(KeyboardInterrupt):
        distill(config)
    monkeypatch.setattr(recipe, "progress", real_progress)
    resumed = distill(config)

    def losses(out):
        return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    assert losses(resumed) == losses(whole) and len(losses(whole)) == 12
    with pytest.raises(UserError, match="other settings"):
        distill(DistillConfig(out=str(tmp_path / "resumed"), **dict(settings, learning_rate=2e-4)))


def test_kid_check_needs_two_samples_or_none(tmp_path):
    from genadapt.errors import UserError
    from genadapt.recipes.distill import _check

    with pytest.raises(UserError, match="kid-images 1"):
        _check(DistillConfig(teacher="pocket-sd", kind="progressive", out=str(tmp_path), kid_images=1), 1000)
    _check(DistillConfig(teacher="pocket-sd", kind="progressive", out=str(tmp_path), kid_images=0), 1000)


def test_the_prompts_come_from_the_shots_captions_in_the_users_convention(tmp_path):
    """--data with kohya .caption sidecars (--caption-extension) or a metadata column (--caption-column): those are the prompts."""
    from types import SimpleNamespace

    from PIL import Image

    from genadapt.recipes.distill import resolve_prompts

    for name, spec in (("sidecars", {"caption_extension": ".caption"}), ("metadata", {"caption_column": "prompt"})):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
            (folder / f"{i}.caption").write_text(f"a banner {i}")
            rows.append(json.dumps({"file_name": f"{i}.png", "prompt": f"a banner {i}"}))
        if name == "metadata":
            (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
            for i in range(3):
                (folder / f"{i}.caption").unlink()
        config = DistillConfig(kind="progressive", out=str(tmp_path / "d"), data=str(folder), **spec)
        prompts, images = resolve_prompts(config, SimpleNamespace(resolution=8))
        assert sorted(prompts) == ["a banner 0", "a banner 1", "a banner 2"] and len(images) == 3, name
