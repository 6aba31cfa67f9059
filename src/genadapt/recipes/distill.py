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

Run folder: config.yaml, run.json (what the run is; its artifact `pipeline`, or null for consistency,
whose LoRA loads on the teacher), manifest.json, teacher_samples.safetensors, checkpoints/state.pt
(resumable: rerunning the same config continues, a changed config is refused), log.jsonl, summary.json,
report.json (UNet evaluations per image, samples/s, distance to the teacher's many-step samples for the
same noise and prompts, next to the teacher at the student's step count), samples/*.png.

This module is the loop: teacher, teacher samples, stages, checkpoints, artifact. The losses and the
students are `genadapt.techniques.distill`; the report's measurements are `genadapt.eval.distill`.

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
from typing import Callable

import torch

from genadapt.config import DistillConfig
from genadapt.errors import UserError
from genadapt.eval import distill as judge
from genadapt.families import diffusion
from genadapt.runs import check_resumable, field_defaults, load_checkpoint, progress, save_safetensors, save_torch, use_cpu, write_json, write_manifest, write_yaml
from genadapt.techniques import distill as losses

STATE_FILE = "checkpoints/state.pt"
REPORT_ONLY = {"eval_images", "reference_steps", "kid_images", "features"}  # change the report, not the training
SAMPLES_FILE = "teacher_samples.safetensors"


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
        from genadapt.models import load_run

        model = load_run(teacher)
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

        images = load_dataset(config.data, resolution=model.resolution, caption_extension=config.caption_extension, caption_column=config.caption_column)
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


def _save_pipeline(pipeline, out: Path, info: dict, teacher) -> Path:
    """The student pipeline and its genadapt.json; a textual-inversion teacher's trigger word goes with it (the
    tokenizer already holds the token), so `sample --embedding-weight` works on the student as on the teacher."""
    model = diffusion.DiffusionModel(pipeline=pipeline, base="", noise_scheduler=None)
    folder = diffusion.save(model, out)
    trigger = teacher.extras.get("trigger")
    write_json(folder / "genadapt.json", {**info, **({"trigger": trigger} if trigger else {})})
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
    folder = _save_pipeline(pipeline, out / "pipeline", {"distilled": "progressive", "teacher": config.teacher, "sampling": sampling}, teacher)
    return {"artifact": folder, "sampling": sampling, "rounds": [f"rounds/{n}-steps" for _, n in _rounds(config)]}


def consistency(config, teacher, data, embeds, uncond, out, accelerator, run, bar) -> dict:
    """LCM-LoRA (Luo et al. 2023b): the teacher's UNet plus a LoRA, trained with latent consistency
    distillation; the teacher is the same UNet with the LoRA off (one UNet in memory)."""
    from genadapt.export.lora import save_lora
    from genadapt.techniques.lora import LoRA, LoRASettings

    device = accelerator.device
    schedule = losses.Schedule.from_scheduler(teacher.noise_scheduler, device)
    prediction_type = teacher.noise_scheduler.config.prediction_type
    torch.manual_seed(config.seed)  # LoRA initialisation draws from the global generator
    technique = LoRA(LoRASettings(rank=config.rank, alpha=config.alpha, lora_targets=config.lora_targets))
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
        guidance = losses.lcm_guidance(config.guidance, config.guidance_max, len(x0), generator, x0.device)
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


def architecture(config, teacher, data, embeds, uncond, out, accelerator, run, bar) -> dict:
    """BK-SDM (Kim et al. 2023): blocks removed, weights copied by name, task + output KD + feature KD;
    AdamW at a constant learning rate, as their `kd_train_text_to_image.py`."""
    device = accelerator.device
    student_unet, init = losses.build_student_unet(teacher.unet, config.remove_blocks, config.seed)
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
    folder = _save_pipeline(pipeline, out / "pipeline", {"distilled": "architecture", "teacher": config.teacher, "removed": config.remove_blocks, "sampling": sampling}, teacher)
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


def _teacher_for_report(config: DistillConfig, device):
    """A fresh teacher on DDIM's trailing grid: the artifact is judged against the teacher as a user loads it."""
    teacher = load_teacher(config.teacher)
    teacher.pipeline.to(device)
    teacher.pipeline.scheduler = ddim_trailing(teacher.pipeline.scheduler.config)
    return teacher


# --- the recipe -----------------------------------------------------------------------------------


def record_run(config: DistillConfig, family: str, artifact: str | None, main: bool = True) -> None:
    """Refuse to continue a checkpoint written with other settings; then config.yaml (what the run used)
    and run.json (what it is: `genadapt.models.load_run` loads `<family>.load(RUN/<artifact>)`)."""
    out = Path(config.out)
    resolved = {"family": family, "recipe": "distill", "base": config.teacher, **json.loads(config.model_dump_json())}
    check_resumable(out, STATE_FILE, resolved, ignored=REPORT_ONLY, defaults=field_defaults(DistillConfig))
    if main:
        write_yaml(out / "config.yaml", resolved)
        write_json(out / "run.json", {"kind": "distill", "family": family, "base": config.teacher, "artifact": artifact, "distill_kind": config.kind})


def distill(config: DistillConfig, accelerator=None) -> Path:
    """Distil the diffusion `config.teacher` into a student of `config.kind`; returns the run folder (resumable)."""
    from genadapt.grid import save_grid
    from genadapt.recipes import make_accelerator

    use_cpu()
    out = Path(config.out)
    accelerator = accelerator or make_accelerator(config.mixed_precision)
    main = accelerator.is_main_process
    device = accelerator.device

    teacher = load_teacher(config.teacher)
    _check(config, teacher.noise_scheduler.config.num_train_timesteps)
    prompts, shots = resolve_prompts(config, teacher)
    # LCM-LoRA's artifact is a LoRA on the teacher (load_lora_weights), not a folder a family loads.
    record_run(config, "diffusion", None if config.kind == "consistency" else "pipeline", main)
    if main:
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
    measured, pixels = judge.evaluate(config, prompts, _teacher_for_report(config, device), student_pipeline, student_guidance, device)
    report.update(measured)
    for name, images in pixels.items():
        save_grid(images, out / "samples" / f"{name}-{measured[name]['steps']}-steps.png", columns=min(8, config.eval_images), scale=2)
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
