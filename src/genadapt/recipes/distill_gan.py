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
manifest.json, checkpoints/state.pt (resumable), log.jsonl, summary.json, report.json, samples/*.png.
The report holds parameters, FLOPs and ms per image of both generators, and the student's closeness to
the teacher on held-out latents (seed + 1, the fixed noise buffers): pixel MSE / PSNR to the teacher's
image for the same latent, and KID (eval-encoder features) between student and teacher samples, next to
the teacher-vs-teacher KID of two seeds (the sampling floor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from genadapt.families import gan
from genadapt.families.stylegan2 import MIXING_PROB, mixing_noise, save_stylegan2
from genadapt.families.stylegan2 import sample as sample_stylegan2
from genadapt.families.stylegan2_nets import Generator
from genadapt.runs import check_resumable, load_checkpoint, progress, save_torch, write_json, write_manifest, write_yaml

STATE_FILE = "checkpoints/state.pt"
DEFAULT_LR = 2e-3  # StyleGAN2's generator learning rate (equalized learning rate makes it scale-free)
BETAS = (0.9, 0.99)  # a regression target, not a GAN game: usual momentum
EVAL_SAMPLES = 500  # held-out latents for pixel MSE and KID (at least --eval-images)
TIMING_BATCH = 16


def student_channels(channels: dict[int, int], width: float, size: int) -> dict[int, int]:
    return {res: max(1, round(ch * width)) for res, ch in sorted(channels.items()) if res <= size}


def _slice_init(student: nn.Module, teacher: nn.Module) -> None:
    """Each student tensor = the teacher's tensor cut to the student's shape (leading channels)."""
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for key, value in student.state_dict().items():
            source = teacher_state[key]
            value.copy_(source[tuple(slice(0, n) for n in value.shape)])


def make_student(teacher: Generator, width: float) -> tuple[Generator, dict]:
    kwargs = {
        "size": teacher.size,
        "style_dim": teacher.style_dim,
        "n_mlp": len(teacher.style) - 1,
        "lr_mlp": teacher.style[1].lr_mul,
        "channels": student_channels(teacher.channels, width, teacher.size),
    }
    student = Generator(**kwargs)
    _slice_init(student, teacher)
    return student, kwargs


def make_adapters(student: Generator, teacher: Generator) -> nn.ModuleList:
    """One 1×1 conv per feature layer, student channels -> teacher channels (GAN Compression's adapters)."""
    return nn.ModuleList(
        nn.Conv2d(cs, ct, 1) for (cs, _), (ct, _) in zip(student.feature_shapes(), teacher.feature_shapes())
    )


def draw(teacher: Generator, batch: int, generator: torch.Generator, device):
    """Style-mixed z and per-layer noise, all from `generator` (a resumed run draws the same)."""
    styles, inject_index = mixing_noise(batch, teacher.style_dim, teacher.n_latent, MIXING_PROB, device=device, generator=generator)
    noise = [torch.randn((batch, 1, res, res), generator=generator).to(device) for _, res in teacher.feature_shapes()]
    return styles, inject_index, noise


def losses(student, teacher, adapters, styles, inject_index, noise, lambda_out: float, lambda_feat: float) -> dict:
    with torch.no_grad():
        target, _, target_feats = teacher(styles, inject_index=inject_index, noise=noise, return_features=True)
    image, _, feats = student(styles, inject_index=inject_index, noise=noise, return_features=True)
    pixel = F.l1_loss(image, target)
    feat = sum(F.mse_loss(adapter(f), t) for adapter, f, t in zip(adapters, feats, target_feats))
    return {"loss": lambda_out * pixel + lambda_feat * feat, "pixel_l1": pixel, "feature_mse": feat}


# --- cost and quality -------------------------------------------------------------------------------


@torch.no_grad()
def generator_cost(g: Generator, device, batch: int = TIMING_BATCH, repeats: int = 7) -> dict:
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


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> dict:
    mse = float((a - b).square().mean())
    return {"pixel_mse": mse, "psnr_db": float(10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))))}  # [-1, 1]


def quality(student: Generator, teacher: Generator, n: int, seed: int, extractor=None) -> dict:
    """Student vs teacher on `n` held-out latents (`seed`) with the fixed noise buffers."""
    from genadapt.eval.features import extract, get_extractor
    from genadapt.eval.metrics import kid_with_ci

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


# --- the recipe -------------------------------------------------------------------------------------


def distill_gan(config) -> Path:
    """Distil the StyleGAN2 `config.teacher` into a `config.student_width`-wide generator; returns the run folder."""
    from genadapt.grid import save_grid
    from genadapt.recipes.distill import REPORT_ONLY

    out = Path(config.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = gan.load(config.teacher, device=device)
    teacher = base.g_ema.eval()
    teacher.requires_grad_(False)
    width = config.student_width
    lr = config.learning_rate or DEFAULT_LR

    resolved = {"family": "gan", "recipe": "distill", "base": config.teacher, **json.loads(config.model_dump_json())}
    check_resumable(out, STATE_FILE, resolved, ignored=REPORT_ONLY)
    write_yaml(out / "config.yaml", resolved)
    write_manifest(out, config.seed, {}, {"teacher": config.teacher, "resolution": teacher.size, "student_width": width})

    student, student_kwargs = make_student(teacher, width)
    student = student.to(device).train()
    adapters = make_adapters(student, teacher).to(device)
    parameters = list(student.parameters()) + list(adapters.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=BETAS)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0

    # A fixed held-out batch (its own seed) measures the losses before and after.
    probe = draw(teacher, 32, torch.Generator().manual_seed(config.seed + 2), device)

    def held_out() -> dict:
        with torch.no_grad():
            terms = losses(student, teacher, adapters, *probe, config.lambda_out, config.lambda_feat)
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
        styles, inject_index, noise = draw(teacher, config.batch_size, generator, device)
        terms = losses(student, teacher, adapters, styles, inject_index, noise, config.lambda_out, config.lambda_feat)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        record = {"step": step + 1, **{name: float(value.detach()) for name, value in terms.items()}}
        history.append(record)
        bar.update(1)
        bar.set_postfix_str(f"loss={record['loss']:.4g}")
        if (step + 1) % config.checkpointing_steps == 0 or step + 1 == config.steps:
            checkpoint(step + 1)
    bar.close()
    train_seconds = time.time() - started
    student.eval()
    after = held_out()

    folder = save_stylegan2(
        out / "model", student, base.discriminator, student_kwargs, gan._module_kwargs(base.config["discriminator"]),
        generator=student,
        extra={"distilled": "architecture", "teacher": config.teacher, "student_width": width, "resolution": teacher.size},
    )

    loaded = gan.load(str(folder), device=device).g_ema  # judged as a user loads it
    n_eval = max(config.eval_images, EVAL_SAMPLES)
    report = {"kind": "architecture", "family": "gan", "teacher": config.teacher, "student_width": width}
    report["generator"] = {"teacher": generator_cost(teacher, device), "student": generator_cost(loaded, device)}
    t, s = report["generator"]["teacher"], report["generator"]["student"]
    report["speedup"] = {
        "ms_per_image": t["ms_per_image"] / s["ms_per_image"],
        "flops": t["flops_per_image"] / max(1, s["flops_per_image"]),
        "parameters": t["parameters"] / s["parameters"],
    }
    scores, teacher_images, student_images = quality(loaded, teacher, n_eval, config.seed + 1)
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
    })
    return out
