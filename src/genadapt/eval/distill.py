"""What `genadapt distill` reports: a student's cost and its closeness to its teacher.

Every function here is handed models that are already built (pipelines, UNets, generators) and judges
what they produce; loading the artifact as a user would, and the teacher to compare it with, is the
recipe's job (`genadapt.recipes.distill`, `genadapt.recipes.distill_gan`).

Diffusion (`evaluate`): student@n and teacher@n (DDIM, trailing) against the teacher's `reference_steps`
samples from the same initial noise and prompts, UNet cost, and optionally KID (`_distribution`).
GAN (`generator_cost`, `quality`): parameters, FLOPs and ms per image, and pixel distance and KID to the
teacher on held-out latents.
"""

from __future__ import annotations

import time

import torch

from genadapt.families import diffusion

TIMING_BATCH = 16  # images per timed generator call


# --- diffusion ------------------------------------------------------------------------------------


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
    return {"latent_mse": float((a_latents - b_latents).square().mean()), **pixel_distance(a_pixels, b_pixels)}


def evaluate(config, prompts: list[str], teacher, student_pipeline, student_guidance: float, device) -> tuple[dict, dict[str, torch.Tensor]]:
    """(report, decoded samples by run name): student@n and teacher@n against the teacher's
    `reference_steps` samples from the same initial noise and prompts (distill_anchors.md §9.3:
    trajectory matching makes MSE to the teacher's many-step sample a sample-efficient check). Noise is
    held out: seed + 1. `teacher` is a DiffusionModel on `device` whose pipeline samples DDIM (trailing)."""
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
    return report, pixels


def _distribution(config, teacher, student_pipeline, student_guidance: float, prompts: list[str], device) -> dict:
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


# --- GAN ------------------------------------------------------------------------------------------


@torch.no_grad()
def generator_cost(g, device, batch: int = TIMING_BATCH, repeats: int = 7) -> dict:
    """Parameters, FLOPs per image (torch's FlopCounterMode) and median ms per image (fixed noise)."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn((batch, g.style_dim), generator=torch.Generator().manual_seed(0)).to(device)
    with FlopCounterMode(display=False) as counter:
        g([z], randomize_noise=False)
    g([z], randomize_noise=False)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        g([z], randomize_noise=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    synthesis = sum(p.numel() for name, p in g.named_parameters() if not name.startswith("style."))
    return {
        "parameters": sum(p.numel() for p in g.parameters()),
        "synthesis_parameters": synthesis,
        "flops_per_image": int(counter.get_total_flops()) // batch,
        "ms_per_image": 1000 * sorted(times)[len(times) // 2] / batch,
        "batch": batch,
    }


def speedup(teacher_cost: dict, student_cost: dict) -> dict:
    """How many times cheaper the student is, from two `generator_cost` entries."""
    return {
        "ms_per_image": teacher_cost["ms_per_image"] / student_cost["ms_per_image"],
        "flops": teacher_cost["flops_per_image"] / max(1, student_cost["flops_per_image"]),
        "parameters": teacher_cost["parameters"] / student_cost["parameters"],
    }


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> dict:
    mse = float((a - b).square().mean())
    return {"pixel_mse": mse, "psnr_db": float(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))))}  # pixels span [-1, 1]


def quality(student, teacher, n: int, seed: int, extractor=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(report, teacher images, student images): student vs teacher StyleGAN2 generators on `n` held-out
    latents (`seed`) with their fixed noise buffers; KID next to the teacher-vs-teacher floor (seed + 1)."""
    from genadapt.eval.features import extract, get_extractor
    from genadapt.eval.metrics import kid_with_ci
    from genadapt.families.stylegan2 import sample as sample_stylegan2

    teacher_images = sample_stylegan2(teacher, n, seed).cpu()
    student_images = sample_stylegan2(student, n, seed).cpu()
    report = {"to_teacher_same_latents": pixel_distance(student_images, teacher_images)}
    extractor = get_extractor(extractor or "pocket")
    device = next(student.parameters()).device
    extractor = extractor.to(device)
    teacher_feats = extract(extractor, teacher_images, progress=False)
    student_feats = extract(extractor, student_images, progress=False)
    other_feats = extract(extractor, sample_stylegan2(teacher, n, seed + 1).cpu(), progress=False)
    report["kid_student_vs_teacher"] = kid_with_ci(student_feats, teacher_feats, seed=seed)
    report["kid_teacher_vs_teacher_other_seed"] = kid_with_ci(other_feats, teacher_feats, seed=seed)
    report["extractor"] = getattr(extractor, "extractor_id", type(extractor).__name__)
    return report, teacher_images, student_images
