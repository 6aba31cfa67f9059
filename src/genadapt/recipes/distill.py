"""`genadapt distill`: a fewer-step or smaller student from a teacher diffusion pipeline.

Three kinds (distill_anchors.md §2, §4, §6.1):

- `progressive` (Salimans & Ho 2022): rounds that halve the DDIM step count, teacher_steps ->
  teacher_steps/2 -> ... -> student_steps. The student starts as the teacher, learns to make one
  DDIM step where its teacher made two, and becomes the next round's teacher. Artifact: a diffusers
  pipeline folder `pipeline/` whose scheduler is DDIM with timestep_spacing="trailing" (the grid it
  was distilled on), plus every round's UNet in `rounds/<n>-steps/`.
- `consistency` (LCM-LoRA, Luo et al. 2023): the teacher plus a LoRA trained with the latent
  consistency distillation loss (DDIM solver on a skipping-step grid, CFG-guided teacher, LCM's
  boundary scalings, the online LoRA model as its own target). Artifact: `pytorch_lora_weights.safetensors`
  (diffusers; kohya twin and peft folder beside it): load it on the teacher with `load_lora_weights`
  and sample with `LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=K)` (K =
  num_ddim_timesteps, 50 by default) in 1-8 steps at guidance_scale=1 (genadapt.json says so).
- `architecture` (BK-SDM, Kim et al. 2023): a UNet with blocks removed (`layer`, `mid`,
  `innermost`), initialised from the teacher's matching tensors and trained with task loss + output KD
  + feature KD. Artifact: a diffusers pipeline folder `pipeline/`, sampled like the teacher.

Data. A few-shot run has no large image set to distil on, so the student learns on the teacher's own
samples (distill_anchors.md §8: PD, LCM and BK-SDM with λ_task on teacher samples only need points
x0 to noise). The prompts are `prompts`, else the captions of `data` (the shots), else the prompts an
adapt run trained on (`prompts.json`), else pocket-sd's sample prompts; `num_samples` teacher samples
(`teacher_sample_steps` DDIM steps, CFG `guidance`) are generated for them once and cached.

Guidance. `progressive` and `consistency` students bake the teacher's classifier-free guidance in
(LCM-LoRA has no w-input; Meng et al. 2023 distil guided teachers the same way), so they sample with
guidance_scale=1, one UNet evaluation per step. `architecture` students sample with CFG like the teacher.

Run folder: config.yaml, manifest.json, teacher_samples.safetensors, checkpoints/state.pt (resumable:
rerunning the same config continues, a changed config is refused), log.jsonl, summary.json,
report.json (UNet evaluations per image, samples/s, distance to the teacher's many-step samples for the
same noise and prompts, next to the teacher at the student's step count), samples/*.png.

Intended CLI (wired to `distill(DistillConfig(...))`; each flag is the field of the same name, `--prompt`
(repeatable) fills `prompts`, list flags take comma-separated values):

    genadapt distill --teacher pocket-sd|PIPELINE_DIR|ADAPT_RUN --kind progressive|consistency|architecture --out DIR
        [--data SPEC] [--prompt TEXT]... [--num-samples 64] [--teacher-sample-steps 50] [--guidance 4.0]
        [--steps 500] [--learning-rate LR] [--batch-size 8] [--max-grad-norm 1.0] [--seed 0]
        [--student-steps N] [--eval-images 8] [--reference-steps 50] [--checkpointing-steps 100]
        [--mixed-precision no|fp16|bf16] [--config FILE.yaml]
      progressive:  [--teacher-steps 8] [--prediction-type epsilon|v_prediction]
      consistency:  [--num-ddim-timesteps 50] [--loss-type huber|l2] [--huber-c 0.001] [--timestep-scaling 10]
                    [--guidance-max G] [--rank 8] [--alpha A] [--lora-targets to_q,to_k,...] [--lr-warmup-steps 0]
      architecture: [--remove-blocks mid,innermost] [--lambda-task 1] [--lambda-out 1] [--lambda-feat 1]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from genadapt.errors import UserError
from genadapt.families import diffusion
from genadapt.runs import check_resumable, load_checkpoint, progress, save_safetensors, save_torch, use_cpu, write_json, write_manifest, write_yaml
from genadapt.techniques import distill as losses

STATE_FILE = "checkpoints/state.pt"
REPORT_ONLY = {"eval_images", "reference_steps", "kid_images", "features"}  # change the report, not the training
SAMPLES_FILE = "teacher_samples.safetensors"
# diffusers' train_lcm_distill_lora_sd_wds.py: LoRA on every attention, feed-forward and conv layer.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
# The papers' learning rates: PD CIFAR-10 config (Adam 5e-5), LCM-LoRA script (AdamW 1e-4),
# BK-SDM (AdamW 5e-5). Short CPU runs move little at these; raise --learning-rate there.
DEFAULT_LR = {"progressive": 5e-5, "consistency": 1e-4, "architecture": 5e-5}
# Student sampling steps: PD/LCM's few-step targets; a BK student samples like its teacher.
DEFAULT_STUDENT_STEPS = {"progressive": 2, "consistency": 4, "architecture": 25}


class DistillConfig(BaseModel):
    """Everything one `genadapt distill` run needs; every field is a CLI flag of the same name."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = "pocket-sd"  # pocket-sd, a diffusers pipeline folder, or an adapt run folder
    kind: Literal["progressive", "consistency", "architecture"]
    out: str
    data: str | None = None  # the shots: their captions are the prompts
    prompts: list[str] = Field(default_factory=list)
    num_samples: int = Field(64, ge=1)  # teacher samples to distil on (prompts cycled)
    teacher_sample_steps: int = Field(50, ge=1)
    guidance: float = Field(4.0, ge=1.0)  # teacher CFG scale, diffusers convention (1 = none)
    steps: int = Field(500, ge=1)  # optimiser steps (per round for progressive)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    max_grad_norm: float = 1.0
    seed: int = 0
    student_steps: int | None = Field(None, ge=1)  # None: 2 (progressive), 4 (consistency), 25 (architecture)
    # progressive
    teacher_steps: int = Field(8, ge=2)  # the first round's teacher DDIM steps
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the teacher's
    # consistency
    num_ddim_timesteps: int = Field(50, ge=1)  # K; skipping step k = T / K
    timestep_scaling: float = Field(10.0, gt=0)
    loss_type: Literal["huber", "l2"] = "huber"
    huber_c: float = Field(0.001, gt=0)
    guidance_max: float | None = None  # set: g ~ U[guidance, guidance_max] per sample, as the LCM-LoRA script
    rank: int = Field(8, ge=1)
    alpha: float | None = None  # None: = rank (scale 1, as the LCM-LoRA script)
    lora_targets: list[str] = Field(default_factory=lambda: list(LCM_LORA_TARGETS))
    lr_warmup_steps: int = Field(0, ge=0)
    # architecture
    remove_blocks: list[Literal["layer", "mid", "innermost"]] = Field(default_factory=lambda: ["mid", "innermost"])
    lambda_task: float = Field(1.0, ge=0)
    lambda_out: float = Field(1.0, ge=0)
    lambda_feat: float = Field(1.0, ge=0)
    student_width: float = Field(0.5, gt=0, le=1)  # GAN teacher: the student's channel multiplier per resolution
    # report and bookkeeping
    eval_images: int = Field(8, ge=1)
    reference_steps: int = Field(50, ge=1)
    kid_images: int = Field(128, ge=0)  # 0: skip the distribution check (KID to the teacher's many-step samples); else >= 2
    features: str = "pocket"  # the KID feature space: pocket, an eval-encoder folder, or inception:PATH
    checkpointing_steps: int = Field(100, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @property
    def n_steps(self) -> int:
        return self.student_steps or DEFAULT_STUDENT_STEPS[self.kind]

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LR[self.kind]


def _check(config: DistillConfig, num_train_timesteps: int) -> None:
    """Grids that diffusers' DDIM ("trailing") and LCM schedulers reproduce exactly (§9.4 pitfall 2):
    DDIMScheduler steps t -> t - T // n, so n must divide T."""
    if config.kid_images == 1:
        raise UserError("--kid-images 1: KID needs at least 2 samples per set; pass 0 to skip the check, or 2 or more")
    for flag, steps in (("--student-steps", config.n_steps), ("--reference-steps", config.reference_steps), ("--teacher-sample-steps", config.teacher_sample_steps)):
        if num_train_timesteps % steps:
            raise UserError(f"{flag} {steps}: must divide the teacher's {num_train_timesteps} timesteps, so DDIM's grid is exact")
    if config.kind == "progressive":
        ratio = config.teacher_steps // config.n_steps
        if config.teacher_steps % config.n_steps or ratio < 2 or ratio & (ratio - 1):
            raise UserError(f"--teacher-steps {config.teacher_steps}: must be --student-steps {config.n_steps} times a power of two (each round halves)")
        if num_train_timesteps % config.teacher_steps:
            raise UserError(f"--teacher-steps {config.teacher_steps}: must divide the teacher's {num_train_timesteps} timesteps")
    if config.kind == "consistency":
        if num_train_timesteps % config.num_ddim_timesteps:
            raise UserError(f"--num-ddim-timesteps {config.num_ddim_timesteps}: must divide the teacher's {num_train_timesteps} timesteps")
        if config.n_steps > config.num_ddim_timesteps:
            raise UserError(f"--student-steps {config.n_steps}: LCMScheduler samples a subset of the {config.num_ddim_timesteps}-point training grid")
        if config.guidance_max is not None and config.guidance_max < config.guidance:
            raise UserError(f"--guidance-max {config.guidance_max}: must be at least --guidance {config.guidance}")


# --- teacher, prompts, teacher samples ------------------------------------------------------------


def load_teacher(teacher: str) -> diffusion.DiffusionModel:
    """pocket-sd, a pipeline folder, or an adapt run (its LoRA fused into the UNet: the student
    distils what the run samples)."""
    path = Path(teacher)
    if (path / "config.yaml").is_file() and not (path / "model_index.json").is_file():
        from genadapt.api import load_run_model

        model = load_run_model(teacher)
        if getattr(model.unet, "peft_config", None):
            model.pipeline.fuse_lora()
            model.pipeline.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
        model.unet.requires_grad_(False)
    else:
        model = diffusion.load(teacher)
    if model.is_sdxl:
        raise UserError(f"--teacher {teacher}: distillation takes SD 1.x/2.x pipelines; SDXL teachers are not supported yet (adapt and sample are)")
    return model


def resolve_prompts(config: DistillConfig, model):
    """(prompts, the shots' ImageSet or None): --prompt, else the shots' captions, else the adapt
    run's prompts.json, else pocket-sd's sample prompts."""
    images = None
    if config.data:
        from genadapt.data import load_dataset

        images = load_dataset(config.data, resolution=model.resolution)
    if config.prompts:
        return list(config.prompts), images
    if images is not None:
        captions = list(dict.fromkeys(images.captions))
        if not any(captions):
            raise UserError(f"--data {config.data}: the images have no captions; pass --prompt with the caption the teacher was adapted with")
        return captions, images
    run_prompts = Path(config.teacher) / "prompts.json"
    if run_prompts.is_file():
        return list(dict.fromkeys(json.loads(run_prompts.read_text()))), None
    if config.teacher == "pocket-sd":
        from genadapt.zoo.pocket_sd import PocketSDConfig

        return list(PocketSDConfig().sample_prompts), None
    raise UserError(f"--teacher {config.teacher}: no prompts to distil on; pass --data (captioned shots) or --prompt")


def ddim_trailing(scheduler_config, **overrides):
    """DDIM (η = 0) with timestep_spacing="trailing": n steps start at T − 1 and step by T/n, the
    grid Salimans & Ho's sampler uses (t_i = i/N) and the one progressive students are distilled on."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing", **overrides)


@dataclass
class TeacherSamples:
    latents: torch.Tensor  # x0 in the UNet's (scaled) latent space
    prompt_index: torch.Tensor


def teacher_samples(model, config: DistillConfig, prompts: list[str], out: Path) -> TeacherSamples:
    """`num_samples` teacher samples for the prompts (cycled), generated once and cached in the run."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    path = out / SAMPLES_FILE
    if path.is_file():
        cached = load_file(path)
        return TeacherSamples(cached["latents"], cached["prompt_index"])
    pipeline = _student_pipeline(model, model.unet, ddim_trailing(model.pipeline.scheduler.config))
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.arange(config.num_samples) % len(prompts)
    latents = []
    for chunk in tqdm(index.split(16), desc="teacher samples", unit="batch", dynamic_ncols=True):
        with torch.no_grad():
            result = pipeline(
                [prompts[i] for i in chunk.tolist()],
                num_inference_steps=config.teacher_sample_steps,
                guidance_scale=config.guidance,
                generator=generator,
                output_type="latent",
            )
        latents.append(result.images.float().cpu())
    samples = TeacherSamples(torch.cat(latents).contiguous(), index)
    save_safetensors(path, {"latents": samples.latents, "prompt_index": samples.prompt_index})
    return samples


# --- the training loop, shared by every kind ------------------------------------------------------


@dataclass
class Stage:
    """One optimisation run: a progressive round, or the whole consistency/architecture run."""

    name: str
    student: torch.nn.Module  # the (prepared) module whose trainable parameters move
    loss: Callable  # (x0, text_embeds, generator) -> {"loss": ..., other terms}
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler


def _trainable(module) -> dict[str, torch.nn.Parameter]:
    return {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}


def fit(stage_index: int, stage: Stage, data: TeacherSamples, embeds: torch.Tensor, config: DistillConfig, out: Path, accelerator, run: dict, bar) -> None:
    """Optimise one stage from `run["step"]`; `run` holds the generator and history across stages."""
    module = accelerator.unwrap_model(stage.student)
    generator, history = run["generator"], run["history"]
    parameters = list(_trainable(module).values())
    stage.student.train()
    for step in range(run["step"], config.steps):
        index = torch.randint(len(data.latents), (config.batch_size,), generator=generator)
        x0 = data.latents[index].to(accelerator.device)
        text_embeds = embeds[data.prompt_index[index]].to(accelerator.device)
        with accelerator.accumulate(stage.student):
            terms = stage.loss(x0, text_embeds, generator)
            accelerator.backward(terms["loss"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            stage.optimizer.step()
            stage.schedule.step()
            stage.optimizer.zero_grad(set_to_none=True)
        record = {"stage": stage_index, "step": step + 1, **{name: float(value.detach()) for name, value in terms.items()}}
        history.append(record)
        bar.update(1)
        bar.set_postfix_str(f"{stage.name} loss={record['loss']:.4g}")
        done = step + 1
        if accelerator.is_main_process and (done % config.checkpointing_steps == 0 or done == config.steps):
            save_torch(
                out / STATE_FILE,
                {
                    "stage": stage_index,
                    "step": done,
                    "trainable": {name: value.detach().cpu().clone() for name, value in _trainable(module).items()},
                    "optimizer": stage.optimizer.state_dict(),
                    "schedule": stage.schedule.state_dict(),
                    "generator": generator.get_state(),
                    "history": history,
                },
            )
    run["step"] = 0
    stage.student.eval()


def resume(stage_index: int, stage: Stage, run: dict, accelerator) -> None:
    """Continue `stage` mid-way if the checkpoint `distill` read at start is this stage's (it also
    restored the generator and history; a finished earlier stage left its artifact on disk)."""
    state = run["checkpoint"]
    if state is not None and state["stage"] == stage_index:
        trainable = _trainable(accelerator.unwrap_model(stage.student))
        with torch.no_grad():
            for name, value in state["trainable"].items():
                trainable[name].copy_(value)
        stage.optimizer.load_state_dict(state["optimizer"])
        stage.schedule.load_state_dict(state["schedule"])
        run["step"] = state["step"]


# --- the three kinds ------------------------------------------------------------------------------


def _rounds(config: DistillConfig) -> list[tuple[int, int]]:
    """(teacher steps, student steps) per progressive round."""
    rounds, steps = [], config.teacher_steps
    while steps > config.n_steps:
        rounds.append((steps, steps // 2))
        steps //= 2
    return rounds


def _student_pipeline(model, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    components = {**model.pipeline.components, "unet": unet, "scheduler": scheduler}
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _save_pipeline(pipeline, out: Path, info: dict) -> Path:
    model = diffusion.DiffusionModel(pipeline=pipeline, base="", noise_scheduler=None)
    folder = diffusion.save_pipeline(model, out)
    write_json(folder / "genadapt.json", info)
    return folder


def progressive(config, teacher, data, embeds, uncond, out, accelerator, run, bar) -> dict:
    """Salimans & Ho 2022, Algorithm 2: each round halves the DDIM steps; the student starts as (and
    then replaces) its teacher. Adam, lr linearly annealed to 0 within each round, no EMA, clip 1."""
    from diffusers import UNet2DConditionModel

    device = accelerator.device
    schedule = losses.Schedule.from_scheduler(teacher.noise_scheduler, device)
    teacher_type = teacher.noise_scheduler.config.prediction_type
    student_type = config.prediction_type or teacher_type
    student_unet = None
    for round_index, (teacher_steps, student_steps) in enumerate(_rounds(config)):
        folder = out / "rounds" / f"{student_steps}-steps"
        if (folder / "config.json").is_file():
            continue
        if round_index == 0:
            # The first teacher is the CFG-guided original; later teachers already carry the guidance.
            round_teacher = losses.Denoiser(teacher.unet, teacher_type, schedule, config.guidance, uncond)
            student_unet = copy.deepcopy(teacher.unet)
        else:
            previous = UNet2DConditionModel.from_pretrained(out / "rounds" / f"{teacher_steps}-steps").to(device).requires_grad_(False).eval()
            round_teacher = losses.Denoiser(previous, student_type, schedule)
            student_unet = copy.deepcopy(previous)
        student_unet.requires_grad_(True).to(device)
        optimizer = torch.optim.Adam(student_unet.parameters(), lr=config.lr)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / config.steps)
        student_unet, optimizer = accelerator.prepare(student_unet, optimizer)
        student = losses.Denoiser(student_unet, student_type, schedule)
        loss = losses.ProgressiveDistillation(schedule, student_steps)
        stage = Stage(f"round {round_index + 1}: {teacher_steps}->{student_steps} steps", student_unet, lambda x0, c, g: loss(student, round_teacher, x0, c, g), optimizer, lr_schedule)
        resume(round_index, stage, run, accelerator)
        fit(round_index, stage, data, embeds, config, out, accelerator, run, bar)
        if accelerator.is_main_process:  # written beside, then renamed: a round folder is complete or absent
            staging = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            accelerator.unwrap_model(student_unet).save_pretrained(staging, safe_serialization=True)
            os.replace(staging, folder)
        accelerator.wait_for_everyone()
    final_unet = UNet2DConditionModel.from_pretrained(out / "rounds" / f"{config.n_steps}-steps").eval()
    scheduler = ddim_trailing(teacher.pipeline.scheduler.config, prediction_type=student_type)
    pipeline = _student_pipeline(teacher, final_unet, scheduler)
    sampling = {"scheduler": "DDIMScheduler", "timestep_spacing": "trailing", "num_inference_steps": config.n_steps, "guidance_scale": 1.0}
    folder = _save_pipeline(pipeline, out / "pipeline", {"distilled": "progressive", "teacher": config.teacher, "sampling": sampling})
    return {"artifact": folder, "sampling": sampling, "rounds": [f"rounds/{n}-steps" for _, n in _rounds(config)]}


def consistency(config, teacher, data, embeds, uncond, out, accelerator, run, bar) -> dict:
    """LCM-LoRA (Luo et al. 2023b): the teacher's UNet plus a LoRA, trained with latent consistency
    distillation; the teacher is the same UNet with the LoRA off (one UNet in memory)."""
    from genadapt.export.lora import save_lora
    from genadapt.techniques.lora import LoRA

    device = accelerator.device
    schedule = losses.Schedule.from_scheduler(teacher.noise_scheduler, device)
    prediction_type = teacher.noise_scheduler.config.prediction_type
    torch.manual_seed(config.seed)  # LoRA initialisation draws from the global generator
    technique = LoRA(rank=config.rank, alpha=config.alpha, targets=config.lora_targets)
    technique.weight_decay = 1e-2  # the LCM-LoRA script's AdamW weight decay
    technique.prepare(teacher)
    teacher.unet.to(device)
    optimizer = torch.optim.AdamW(list(_trainable(teacher.unet).values()), lr=config.lr, weight_decay=technique.weight_decay)
    warmup = config.lr_warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    unet, optimizer = accelerator.prepare(teacher.unet, optimizer)
    student = losses.Denoiser(unet, prediction_type, schedule)
    loss = losses.ConsistencyDistillation(schedule, config.num_ddim_timesteps, config.timestep_scaling, config.loss_type, config.huber_c)

    def step_loss(x0, text_embeds, generator):
        guidance = config.guidance
        if config.guidance_max is not None:  # the script's w ~ U[w_min, w_max]
            guidance = (config.guidance + (config.guidance_max - config.guidance) * torch.rand(len(x0), generator=generator)).to(x0.device)
        base = losses.Denoiser(accelerator.unwrap_model(unet), prediction_type, schedule, guidance, uncond, base_only=True)
        return loss(student, base, x0, text_embeds, generator)

    stage = Stage("consistency", unet, step_loss, optimizer, lr_schedule)
    resume(0, stage, run, accelerator)
    fit(0, stage, data, embeds, config, out, accelerator, run, bar)
    artifacts = []
    if accelerator.is_main_process:
        teacher.extras["training_metadata"] = {"ss_output_name": out.name, "ss_steps": config.steps, "ss_learning_rate": config.lr, "ss_seed": config.seed, "ss_training_comment": "LCM-LoRA (genadapt distill)"}
        artifacts = save_lora(teacher, technique, out, teacher.extras["training_metadata"])
    sampling = {
        "scheduler": "LCMScheduler",
        "original_inference_steps": config.num_ddim_timesteps,
        "timestep_scaling": config.timestep_scaling,
        "num_inference_steps": config.n_steps,
        "guidance_scale": 1.0,
        "load": "pipe.load_lora_weights(OUT, weight_name='pytorch_lora_weights.safetensors') on the teacher; pipe.fuse_lora() for speed",
    }
    write_json(out / "genadapt.json", {"distilled": "consistency", "teacher": config.teacher, "sampling": sampling})
    return {"artifact": out / "pytorch_lora_weights.safetensors", "artifacts": [str(a) for a in artifacts], "sampling": sampling}


def build_student_unet(teacher_unet, remove: list[str], seed: int = 0):
    """The BK-SDM student for `remove`, with the teacher's matching tensors copied in."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # the tensors that stay fresh get diffusers' initialisation
    student = UNet2DConditionModel.from_config(losses.student_config(teacher_unet.config, remove))
    init = losses.init_from_teacher(student, teacher_unet)
    return student, init


def architecture(config, teacher, data, embeds, uncond, out, accelerator, run, bar) -> dict:
    """BK-SDM (Kim et al. 2023): blocks removed, weights copied by name, task + output KD + feature KD;
    AdamW at a constant learning rate, as their `kd_train_text_to_image.py`."""
    device = accelerator.device
    student_unet, init = build_student_unet(teacher.unet, config.remove_blocks, config.seed)
    student_unet.to(device).requires_grad_(True)
    teacher.unet.to(device)
    pairs = losses.feature_pairs(student_unet, teacher.unet)
    student_taps, teacher_taps = losses.FeatureTaps(student_unet, [s for s, _ in pairs]), losses.FeatureTaps(teacher.unet, [t for _, t in pairs])
    kd = losses.ArchitecturalDistillation(teacher.noise_scheduler, student_taps, teacher_taps, pairs, config.lambda_task, config.lambda_out, config.lambda_feat)
    optimizer = torch.optim.AdamW(student_unet.parameters(), lr=config.lr, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared, optimizer = accelerator.prepare(student_unet, optimizer)

    # A fixed held-out batch (own generator, fresh noise and timesteps) measures the KD loss before and after.
    probe = torch.Generator().manual_seed(config.seed + 2)
    probe_index = torch.randint(len(data.latents), (min(16, len(data.latents)),), generator=probe)
    probe_x = data.latents[probe_index].to(device)
    probe_noise = torch.randn(probe_x.shape, generator=probe).to(device)
    probe_t = torch.randint(teacher.noise_scheduler.config.num_train_timesteps, (len(probe_x),), generator=probe).to(device)
    probe_c = embeds[data.prompt_index[probe_index]].to(device)

    def held_out() -> dict:
        with torch.no_grad():
            terms = kd.terms(student_unet, teacher.unet, probe_x, probe_c, probe_noise, probe_t)
        return {name: float(value) for name, value in terms.items()}

    stage = Stage(f"architecture (-{'-'.join(config.remove_blocks)})", prepared, lambda x0, c, g: kd(prepared, teacher.unet, x0, c, g), optimizer, lr_schedule)
    resume(0, stage, run, accelerator)
    before = held_out() if run["step"] == 0 else None
    fit(0, stage, data, embeds, config, out, accelerator, run, bar)
    after = held_out()
    student_taps.remove()
    teacher_taps.remove()
    final = accelerator.unwrap_model(prepared).eval()
    pipeline = _student_pipeline(teacher, final, copy.deepcopy(teacher.pipeline.scheduler))
    sampling = {"scheduler": type(teacher.pipeline.scheduler).__name__, "num_inference_steps": config.n_steps, "guidance_scale": config.guidance}
    folder = _save_pipeline(pipeline, out / "pipeline", {"distilled": "architecture", "teacher": config.teacher, "removed": config.remove_blocks, "sampling": sampling})
    return {
        "artifact": folder,
        "sampling": sampling,
        "architecture": {
            "removed": config.remove_blocks,
            "copied_tensors": len(init["copied"]),
            "fresh_tensors": init["fresh"],
            "remapped": {k: v for k, v in init["mapping"].items() if k != v},
            "feature_pairs": pairs,
            "held_out_loss_before": before,
            "held_out_loss_after": after,
        },
    }


KINDS = {"progressive": progressive, "consistency": consistency, "architecture": architecture}


# --- report: cost and closeness to the teacher ----------------------------------------------------


def unet_cost(unet, latents: torch.Tensor, text_embeds: torch.Tensor, repeats: int = 3) -> dict:
    """Parameters, FLOPs of one evaluation (torch's FlopCounterMode) and its median wall time."""
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.full((len(latents),), 500, device=latents.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            unet(latents, t, text_embeds)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            unet(latents, t, text_embeds)
            times.append(time.perf_counter() - started)
    return {
        "parameters": sum(p.numel() for p in unet.parameters()),
        "flops_per_eval": int(counter.get_total_flops()) // len(latents),
        "ms_per_eval": 1000 * sorted(times)[len(times) // 2] / len(latents),
        "batch": len(latents),
    }


def _sample(pipeline, prompts, latents, steps, guidance, seed) -> dict:
    """One timed pipeline run from fixed initial latents; counts UNet rows per image (CFG = 2)."""
    rows = []
    handle = pipeline.unet.register_forward_pre_hook(lambda _m, args, kwargs: rows.append(len(args[0] if args else kwargs["sample"])), with_kwargs=True)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            result = pipeline(
                prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=latents.clone(),
                generator=torch.Generator().manual_seed(seed),  # the fresh noise of multistep LCM sampling
                output_type="latent",
            )
    finally:
        handle.remove()
    seconds = time.perf_counter() - started
    return {
        "latents": result.images.float().cpu(),
        "info": {
            "steps": steps,
            "guidance_scale": guidance,
            "scheduler": type(pipeline.scheduler).__name__,
            "unet_evals_per_image": sum(rows) / len(prompts),
            "seconds": seconds,
            "samples_per_s": len(prompts) / seconds,
        },
    }


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents.to(vae.device) / vae.config.scaling_factor).sample.float().clamp(-1, 1).cpu()


def _distance(a_latents, a_pixels, b_latents, b_pixels) -> dict:
    pixel_mse = float((a_pixels - b_pixels).square().mean())
    return {
        "latent_mse": float((a_latents - b_latents).square().mean()),
        "pixel_mse": pixel_mse,
        "psnr_db": float(10 * torch.log10(torch.tensor(4.0 / max(pixel_mse, 1e-12)))),  # pixels span [-1, 1]
    }


def evaluate(config: DistillConfig, prompts: list[str], student_pipeline, student_guidance: float, out: Path, device) -> dict:
    """Student@n and teacher@n (DDIM, trailing) against the teacher's `reference_steps` samples from
    the same initial noise and prompts (distill_anchors.md §9.3: trajectory matching makes MSE to the
    teacher's many-step sample a sample-efficient check). Noise is held out: seed + 1."""
    from genadapt.grid import save_grid

    teacher = load_teacher(config.teacher)  # a fresh teacher: the artifact is judged as a user loads it
    teacher.pipeline.to(device)
    teacher.pipeline.scheduler = ddim_trailing(teacher.pipeline.scheduler.config)
    eval_prompts = [prompts[i % len(prompts)] for i in range(config.eval_images)]
    size = teacher.unet.config.sample_size
    latents = torch.randn((config.eval_images, teacher.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(config.seed + 1)).to(device)

    runs = {
        "reference": _sample(teacher.pipeline, eval_prompts, latents, config.reference_steps, config.guidance, config.seed),
        "teacher_same_steps": _sample(teacher.pipeline, eval_prompts, latents, config.n_steps, config.guidance, config.seed),
        "student": _sample(student_pipeline, eval_prompts, latents, config.n_steps, student_guidance, config.seed),
    }
    if config.kind == "consistency" and config.n_steps != 1:
        # One step is where a consistency model must land on the teacher's trajectory, f(z_T, T) ≈ ODE(z_T);
        # LCM's multistep sampler re-noises with fresh noise, so its samples also drift off that trajectory.
        runs["student_one_step"] = _sample(student_pipeline, eval_prompts, latents, 1, student_guidance, config.seed)
    if config.kind == "consistency":  # LCM is for 1-4 steps: student and teacher at every fewer step count too
        for steps in (1, 2):
            if steps < config.n_steps:
                runs[f"teacher_{steps}_steps"] = _sample(teacher.pipeline, eval_prompts, latents, steps, config.guidance, config.seed)
        if config.n_steps > 2:  # one step is student_one_step
            runs["student_2_steps"] = _sample(student_pipeline, eval_prompts, latents, 2, student_guidance, config.seed)
    if config.kind == "progressive":  # the trajectory the rounds matched: the first teacher's grid
        runs["distillation_target"] = _sample(teacher.pipeline, eval_prompts, latents, config.teacher_steps, config.guidance, config.seed)
    pixels = {name: _decode(teacher.vae, run["latents"]) for name, run in runs.items()}
    report = {}
    for name, run in runs.items():
        entry = dict(run["info"])
        entry["to_reference"] = _distance(run["latents"], pixels[name], runs["reference"]["latents"], pixels["reference"])
        if "distillation_target" in runs:
            entry["to_distillation_target"] = _distance(run["latents"], pixels[name], runs["distillation_target"]["latents"], pixels["distillation_target"])
        entry["speedup_vs_reference"] = entry["samples_per_s"] / runs["reference"]["info"]["samples_per_s"]
        report[name] = entry
        save_grid(pixels[name], out / "samples" / f"{name}-{entry['steps']}-steps.png", columns=min(8, len(eval_prompts)), scale=2)

    probe_latents = latents[: min(4, len(latents))]
    probe_embeds = diffusion.encode_text(teacher, diffusion.tokenize(teacher, eval_prompts[: len(probe_latents)])).embeds.to(device)
    if "student_one_step" in report:
        report["student"]["note"] = (
            "LCMScheduler re-noises with fresh noise between steps, so multistep samples leave the teacher's trajectory: "
            "their distance to the reference measures that drift as well as quality; student_one_step is the trajectory check. "
            "Compare multistep samples by distribution (genadapt evaluate) instead."
        )
    if config.kid_images:
        report["distribution"] = _distribution(config, teacher, student_pipeline, student_guidance, prompts, device)
    report["unet"] = {"teacher": unet_cost(teacher.unet, probe_latents, probe_embeds), "student": unet_cost(student_pipeline.unet, probe_latents, probe_embeds)}
    report["eval"] = {
        "images": config.eval_images,
        "prompts": list(dict.fromkeys(eval_prompts)),
        "noise_seed": config.seed + 1,
        "teacher_scheduler": "DDIMScheduler, timestep_spacing=trailing",
        "distance": "mean squared error between final samples from the same initial latents and prompts: latents in the UNet's latent space, pixels decoded to [-1, 1]",
        "samples_per_s": "pipeline call to latents (text encoding and UNet; VAE decoding excluded) on this machine",
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    return report


def _distribution(config: DistillConfig, teacher, student_pipeline, student_guidance: float, prompts: list[str], device) -> dict:
    """KID of the student@n and of the teacher's DDIM@n, each against the teacher's `reference_steps`
    samples drawn from other noise (many prompts, cycled). This is the check for samplers that leave
    the teacher's trajectory (LCM re-noises between steps), where a same-noise distance misleads.
    The floor is the teacher's many-step samples from a third noise draw against the same reference."""
    from genadapt.eval import metrics
    from genadapt.eval.features import extract, get_extractor

    count = config.kid_images
    kid_prompts = [prompts[i % len(prompts)] for i in range(count)]
    size = teacher.unet.config.sample_size
    extractor = get_extractor(config.features)

    def features(pipeline, steps: int, guidance: float, seed: int) -> torch.Tensor:
        noise = torch.randn((count, teacher.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(seed)).to(device)
        chunks = []  # sample, decode and embed 16 at a time: a 512-px teacher's decoded batch must fit a GPU
        for i in range(0, count, 16):
            latents = _sample(pipeline, kid_prompts[i : i + 16], noise[i : i + 16], steps, guidance, seed + i)["latents"]
            chunks.append(extract(extractor, _decode(teacher.vae, latents), progress=False))
        return torch.cat(chunks)

    seed = config.seed + 100  # neither the training samples' noise nor the per-noise evaluation's
    reference = features(teacher.pipeline, config.reference_steps, config.guidance, seed)
    return {
        "images": count,
        "features": extractor.extractor_id,
        "reference": f"teacher, {config.reference_steps} DDIM steps, guidance {config.guidance}, noise seed {seed}",
        "kid": {
            "teacher_reference_steps_other_noise": metrics.kid_with_ci(features(teacher.pipeline, config.reference_steps, config.guidance, seed + 1), reference),
            "teacher_same_steps": metrics.kid_with_ci(features(teacher.pipeline, config.n_steps, config.guidance, seed + 2), reference),
            "student": metrics.kid_with_ci(features(student_pipeline, config.n_steps, student_guidance, seed + 2), reference),
        },
    }


def _notes(config: DistillConfig, teacher) -> list[str]:
    notes = []
    student_type = config.prediction_type or teacher.noise_scheduler.config.prediction_type
    if config.kind == "progressive" and student_type == "epsilon" and config.n_steps <= 2:
        notes.append(
            "epsilon-prediction student at <= 2 steps: x̂ = (z − σε̂)/α amplifies errors where α is small (Salimans & Ho 2022 §4); "
            "--prediction-type v_prediction avoids it but starts the student away from the teacher, so its first round needs many more steps"
        )
    if config.kind == "progressive" and student_type != teacher.noise_scheduler.config.prediction_type:
        notes.append(f"the student predicts {student_type}, the teacher {teacher.noise_scheduler.config.prediction_type}: round 1 also re-learns the output parametrisation")
    return notes


def _student_for_report(config: DistillConfig, result: dict, device):
    """The exported artifact, loaded as a user would: a pipeline folder, or teacher + LoRA + LCMScheduler."""
    if config.kind == "consistency":
        from diffusers import LCMScheduler

        model = load_teacher(config.teacher)
        model.pipeline.scheduler = LCMScheduler.from_config(
            model.pipeline.scheduler.config, original_inference_steps=config.num_ddim_timesteps, timestep_scaling=config.timestep_scaling
        )
        model.pipeline.load_lora_weights(str(Path(config.out)), weight_name="pytorch_lora_weights.safetensors")
        model.pipeline.fuse_lora()  # timed as deployed: an unfused LoRA adds a matmul pair per layer
        model.pipeline.unload_lora_weights()
        return model.pipeline.to(device), 1.0
    model = diffusion.load(str(result["artifact"]))
    if config.kind == "architecture":  # compared with the teacher on the same (trailing DDIM) grid
        model.pipeline.scheduler = ddim_trailing(model.pipeline.scheduler.config)
        return model.pipeline.to(device), config.guidance
    return model.pipeline.to(device), 1.0


# --- the recipe -----------------------------------------------------------------------------------


def distill(config: DistillConfig, accelerator=None) -> Path:
    """Distil `config.teacher` into a student of `config.kind`; returns the run folder (resumable)."""
    from genadapt.families.gan import is_gan_base

    if is_gan_base(config.teacher):
        if config.kind != "architecture":
            raise UserError(f"--kind {config.kind}: a GAN teacher ({config.teacher}) has no sampling steps to cut; only --kind architecture applies to GANs")
        from genadapt.recipes.distill_gan import distill_gan

        return distill_gan(config)
    from accelerate import Accelerator

    use_cpu()
    out = Path(config.out)
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    main = accelerator.is_main_process
    device = accelerator.device

    teacher = load_teacher(config.teacher)
    _check(config, teacher.noise_scheduler.config.num_train_timesteps)
    prompts, shots = resolve_prompts(config, teacher)
    resolved = {"family": "diffusion", "recipe": "distill", "base": config.teacher, **json.loads(config.model_dump_json())}
    check_resumable(out, STATE_FILE, resolved, ignored=REPORT_ONLY)
    if main:
        write_yaml(out / "config.yaml", resolved)
        write_json(out / "prompts.json", prompts)
        write_manifest(out, config.seed, {"shots": shots} if shots is not None else {}, {"teacher": config.teacher, "prompts": prompts, "resolution": teacher.resolution})

    teacher.pipeline.to(device)
    data = teacher_samples(teacher, config, prompts, out)
    with torch.no_grad():
        embeds = diffusion.encode_text(teacher, diffusion.tokenize(teacher, prompts)).embeds.float().cpu()
        uncond = diffusion.encode_text(teacher, diffusion.tokenize(teacher, [""])).embeds.float().to(device)

    stages = len(_rounds(config)) if config.kind == "progressive" else 1
    # One explicit generator drives batches, noise and timesteps across stages, so a resumed run is the same run.
    run = {"generator": torch.Generator().manual_seed(config.seed), "history": [], "step": 0, "checkpoint": None}
    done = 0
    if (out / STATE_FILE).is_file():
        state = load_checkpoint(out / STATE_FILE, {"generator", "history", "stage", "step", "trainable", "optimizer", "schedule"})
        run["checkpoint"] = state
        run["generator"].set_state(state["generator"])
        run["history"] = state["history"]
        done = state["stage"] * config.steps + state["step"]
    bar = progress(stages * config.steps, done, f"distill {config.kind}")
    started = time.time()
    result = KINDS[config.kind](config, teacher, data, embeds, uncond, out, accelerator, run, bar)
    bar.close()
    train_seconds = time.time() - started
    accelerator.wait_for_everyone()
    if not main:
        return out

    student_pipeline, student_guidance = _student_for_report(config, result, device)
    report = {"kind": config.kind, "teacher": config.teacher, "student_steps": config.n_steps, "sampling": result["sampling"]}
    report["data"] = {
        "source": "teacher samples (no real images: distill_anchors.md §8)",
        "num_samples": config.num_samples,
        "teacher_sample_steps": config.teacher_sample_steps,
        "guidance": config.guidance,
        "prompts": prompts,
    }
    report["notes"] = _notes(config, teacher)
    report.update(evaluate(config, prompts, student_pipeline, student_guidance, out, device))
    last = run["history"][-1] if run["history"] else {}
    report["training"] = {"stages": stages, "steps_per_stage": config.steps, "seconds_this_session": train_seconds, "final": last}
    if "architecture" in result:
        report["architecture"] = result["architecture"]
    if "rounds" in result:
        report["rounds"] = result["rounds"]
    write_json(out / "report.json", report)
    with (out / "log.jsonl").open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in run["history"])
    write_json(out / "summary.json", {"kind": config.kind, "artifact": str(Path(result["artifact"]).relative_to(out)), "steps": config.steps, "stages": stages, "train_seconds": train_seconds, "sampling": result["sampling"]})
    return out
