"""`genadapt distill --kind architecture` for a StyleGAN2 teacher: a narrower generator (GAN Compression).

GAN Compression (Li et al., CVPR 2020; distill_anchors.md §6.2) trains a narrower generator G_S to imitate
its teacher G_T on the same inputs:

    L = λ_out · ‖G_S(z, n) − G_T(z, n)‖₁ + λ_feat · Σ_l ‖1×1conv_l(A_S,l) − A_T,l‖²

where A_l are per-layer activations (`Generator.forward(..., return_features=True)`: conv1, then every
synthesis conv) and the 1×1 convolutions are learned adapters from the student's channels to the teacher's,
dropped after training. Here z (style mixing p = 0.9, as StyleGAN2 trains) and the per-layer noise maps n
are drawn fresh every step and fed to both networks, so the data is unlimited teacher output.

Student. Same resolution, style_dim and mapping network as the teacher; every synthesis resolution keeps
`round(student_width · channels)` channels (`student_width`, default 0.5: about a quarter of the synthesis
FLOPs). It starts from the teacher's tensors sliced to the first channels (the mapping network and noise
buffers copied whole), as GAN Compression's sub-networks share a supernet's leading channels.

Left out: the paper's GAN term λ_gan (it needs real images and a discriminator; a pure imitation target
needs neither, distill_anchors.md §8), the once-for-all supernet / channel search, and the perceptual term.
`lambda_task` does not apply.

Artifact: `model/`, a StyleGAN2 folder (`save_stylegan2`; the teacher's discriminator beside the student,
so `genadapt adapt --base RUN/model` can fine-tune it). Run folder as the diffusion recipe: config.yaml,
run.json (artifact `model`), manifest.json, checkpoints/state.pt (resumable), log.jsonl, summary.json,
report.json, samples/*.png. The run goes through `accelerate` like the diffusion recipe (its device).
The report holds parameters, FLOPs and ms per image of both generators, and the student's closeness to
the teacher on held-out latents (seed + 1, the fixed noise buffers): pixel MSE / PSNR to the teacher's
image for the same latent, and KID (eval-encoder features) between student and teacher samples, next to
the teacher-vs-teacher KID of two seeds (the sampling floor).

This module is the loop; the student, adapters and loss are `genadapt.techniques.distill`
(`build_student_generator`, `gan_compression_adapters`, `GANCompressionDistillation`), the report's
measurements `genadapt.eval.distill` (`generator_cost`, `quality`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from genadapt.eval import distill as judge
from genadapt.families import gan
from genadapt.families.stylegan2 import MIXING_PROB, mixing_noise, save_stylegan2
from genadapt.recipes.distill import STATE_FILE, record_run
from genadapt.runs import load_checkpoint, progress, save_torch, write_json, write_manifest
from genadapt.techniques import distill as losses

BETAS = (0.9, 0.99)  # a regression target, not a GAN game: usual momentum
EVAL_SAMPLES = 500  # held-out latents for pixel MSE and KID (at least --eval-images)


def draw(teacher, batch: int, generator: torch.Generator, device):
    """Style-mixed z and per-layer noise, all from `generator` (a resumed run draws the same)."""
    styles, inject_index = mixing_noise(batch, teacher.style_dim, teacher.n_latent, MIXING_PROB, device=device, generator=generator)
    noise = [torch.randn((batch, 1, res, res), generator=generator).to(device) for _, res in teacher.feature_shapes()]
    return styles, inject_index, noise


def distill_gan(config, accelerator=None) -> Path:
    """Distil the StyleGAN2 `config.teacher` into a `config.student_width`-wide generator; returns the run folder."""
    from genadapt.grid import save_grid
    from genadapt.recipes import make_accelerator

    out = Path(config.out)
    accelerator = accelerator or make_accelerator(config.mixed_precision)
    main = accelerator.is_main_process
    device = accelerator.device
    base = gan.load(config.teacher, device=device)
    teacher = base.g_ema.eval()
    teacher.requires_grad_(False)
    width = config.student_width
    lr = config.lr

    record_run(config, "gan", "model", main)
    if main:
        write_manifest(out, config.seed, {}, {"teacher": config.teacher, "resolution": teacher.size, "student_width": width})

    student, student_kwargs = losses.build_student_generator(teacher, width)
    student = student.to(device).train()
    adapters = losses.gan_compression_adapters(student, teacher).to(device)
    loss = losses.GANCompressionDistillation(adapters, config.lambda_out, config.lambda_feat)
    parameters = list(student.parameters()) + list(adapters.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=BETAS)
    prepared, optimizer = accelerator.prepare(student, optimizer)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0

    # A fixed held-out batch (its own seed) measures the losses before and after.
    probe = draw(teacher, 32, torch.Generator().manual_seed(config.seed + 2), device)

    def held_out() -> dict:
        with torch.no_grad():
            terms = loss(student, teacher, *probe)
        return {name: float(value) for name, value in terms.items()}

    if (out / STATE_FILE).is_file():
        state = load_checkpoint(out / STATE_FILE, {"student", "adapters", "optimizer", "generator", "history", "step"})
        student.load_state_dict(state["student"])
        adapters.load_state_dict(state["adapters"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history, start = state["history"], state["step"]
    before = held_out() if start == 0 else None

    def checkpoint(step: int) -> None:
        save_torch(out / STATE_FILE, {
            "step": step,
            "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
            "adapters": {k: v.detach().cpu().clone() for k, v in adapters.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "history": history,
        })

    bar = progress(config.steps, start, f"distill architecture (gan, width {width})")
    started = time.time()
    for step in range(start, config.steps):
        terms = loss(prepared, teacher, *draw(teacher, config.batch_size, generator, device))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(terms["loss"])
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        record = {"step": step + 1, **{name: float(value.detach()) for name, value in terms.items()}}
        history.append(record)
        bar.update(1)
        bar.set_postfix_str(f"loss={record['loss']:.4g}")
        if main and ((step + 1) % config.checkpointing_steps == 0 or step + 1 == config.steps):
            checkpoint(step + 1)
    bar.close()
    train_seconds = time.time() - started
    student.eval()
    after = held_out()
    accelerator.wait_for_everyone()
    if not main:
        return out

    folder = save_stylegan2(
        out / "model", student, base.discriminator, student_kwargs, gan._module_kwargs(base.config["discriminator"]),
        generator=student,
        extra={"distilled": "architecture", "teacher": config.teacher, "student_width": width, "resolution": teacher.size},
    )

    loaded = gan.load(str(folder), device=device).g_ema  # judged as a user loads it
    n_eval = max(config.eval_images, EVAL_SAMPLES)
    report = {"kind": "architecture", "family": "gan", "teacher": config.teacher, "student_width": width}
    report["generator"] = {"teacher": judge.generator_cost(teacher, device), "student": judge.generator_cost(loaded, device)}
    report["speedup"] = judge.speedup(report["generator"]["teacher"], report["generator"]["student"])
    scores, teacher_images, student_images = judge.quality(loaded, teacher, n_eval, config.seed + 1)
    report["quality"] = scores
    report["eval"] = {
        "samples": n_eval,
        "latent_seed": config.seed + 1,
        "noise": "the generators' fixed noise buffers (the student's are the teacher's)",
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    report["training"] = {
        "steps": config.steps,
        "batch_size": config.batch_size,
        "learning_rate": lr,
        "lambda_out": config.lambda_out,
        "lambda_feat": config.lambda_feat,
        "loss": "λ_out·L1(pixels) + λ_feat·Σ_l MSE(1x1conv_l(student_l), teacher_l); no GAN term",
        "feature_layers": len(adapters),
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "seconds_this_session": train_seconds,
        "final": history[-1] if history else {},
    }
    report["channels"] = {"teacher": {str(k): v for k, v in teacher.channels.items() if k <= teacher.size}, "student": {str(k): v for k, v in student_kwargs["channels"].items()}}
    k = min(16, n_eval)
    save_grid(teacher_images[:k], out / "samples" / "teacher.png", columns=8, scale=2)
    save_grid(student_images[:k], out / "samples" / "student.png", columns=8, scale=2)
    write_json(out / "report.json", report)
    with (out / "log.jsonl").open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
    write_json(out / "summary.json", {
        "kind": "architecture", "family": "gan", "artifact": "model", "steps": config.steps, "train_seconds": train_seconds,
        "student_width": width, "speedup_ms_per_image": report["speedup"]["ms_per_image"],
        "pixel_mse_to_teacher": scores["to_teacher_same_latents"]["pixel_mse"],
        "kid_student_vs_teacher": scores["kid_student_vs_teacher"]["value"],
        "device": str(device),
    })
    return out
