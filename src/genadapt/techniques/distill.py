"""Distillation losses: small callables whose bodies read like the papers' equations.

Notation (distill_anchors.md §1): a VP schedule on the teacher's discrete timesteps,
z_t = α_t x + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t); a DDIM (η = 0) step t → s is
z_s = α_s x̂(z_t) + σ_s ε̂(z_t) (Song et al. 2021, eq. 12). Timestep −1 stands for the end of a
DDIM run, where diffusers' DDIMScheduler uses `final_alpha_cumprod`.

- `ProgressiveDistillation`: Salimans & Ho 2022, Algorithm 2 (two teacher DDIM steps -> one student step).
- `ConsistencyDistillation`: Luo et al. 2023 (LCM), Algorithm 1 as coded in diffusers'
  `train_lcm_distill_lora_sd_wds.py`, the LCM-LoRA variant (Luo et al. 2023b): no target network.
- `ArchitecturalDistillation`: Kim et al. 2023 (BK-SDM), §3.2: task + output KD + feature KD.
- `GANCompressionDistillation`: Li et al. CVPR 2020 (GAN Compression), §3.1: output L1 + feature KD
  through learned 1×1 convolutions, for a narrower StyleGAN2 generator.

Each returns a dict of named terms with the total under "loss", so every term is logged. The students
are built here too: BK-SDM's UNet with blocks removed, GAN Compression's generator with fewer channels.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Schedule:
    """ᾱ_t of the teacher's discrete schedule, plus ᾱ at t = −1 (the last DDIM step's destination)."""

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler, device=None) -> "Schedule":
        alphas_cumprod = scheduler.alphas_cumprod.float()
        # DDIMScheduler's convention: set_alpha_to_one=False ends sampling at ᾱ_0, not at a clean x.
        final = torch.tensor(1.0) if scheduler.config.get("set_alpha_to_one", False) else alphas_cumprod[0]
        return cls(alphas_cumprod.to(device), final.float().to(device))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) shaped (B, 1, 1, 1); t = −1 gives the final DDIM destination."""
        t = t.to(self.alphas_cumprod.device)
        abar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], self.final_alpha_cumprod)
        return abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)


def x0_eps(output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """(x̂, ε̂) from a network output: ε-prediction (Ho et al. 2020, eq. 15), v-prediction
    (Salimans & Ho 2022, §4: x̂ = α z − σ v̂, ε̂ = σ z + α v̂) or x-prediction ("sample")."""
    if prediction_type == "epsilon":
        return (z - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * z - sigma * output, sigma * z + alpha * output
    if prediction_type == "sample":
        return output, (z - alpha * output) / sigma
    raise ValueError(f"prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """DDIM, η = 0 (Song et al. 2021, eq. 12): z_s = α_s x̂ + σ_s ε̂."""
    return alpha_s * x0 + sigma_s * eps


@contextmanager
def adapters_disabled(unet):
    """The base model under a peft LoRA: LCM-LoRA's teacher is the student with its adapter off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@dataclass
class Denoiser:
    """A UNet read as (x̂, ε̂), optionally classifier-free guided (Ho & Salimans 2022, eq. 6):
    out = out_u + g (out_c − out_u), in diffusers' convention (g = 1: no guidance). Guiding the raw
    output equals guiding x̂ and ε̂ (the conversion is affine for fixed z, t); LCM's form
    x̂_c + w (x̂_c − x̂_u) is the same with w = g − 1."""

    unet: torch.nn.Module
    prediction_type: str
    schedule: Schedule
    guidance: float | torch.Tensor = 1.0
    uncond_embeds: torch.Tensor | None = None  # the empty prompt, (1, L, D)
    base_only: bool = False  # evaluate with the LoRA adapters switched off

    def output(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        guided = not (isinstance(self.guidance, (int, float)) and self.guidance == 1.0)
        if guided:
            uncond = self.uncond_embeds.expand(len(z), -1, -1)
            out_u, out_c = self.unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, embeds])).sample.chunk(2)
            guidance = self.guidance.view(-1, 1, 1, 1) if torch.is_tensor(self.guidance) else self.guidance
            return out_u + guidance * (out_c - out_u)
        return self.unet(z, t, embeds).sample

    def __call__(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor):
        if self.base_only:
            with adapters_disabled(self.unet):
                output = self.output(z, t, embeds)
        else:
            output = self.output(z, t, embeds)
        alpha, sigma = self.schedule.alpha_sigma(t)
        return x0_eps(output.float(), z, alpha, sigma, self.prediction_type)


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)


class ProgressiveDistillation:
    """Salimans & Ho 2022, Algorithm 2, on a student grid of N steps over T discrete timesteps.

    i ~ U{0..N−1}, t = (i+1)·T/N − 1, t' = t − T/(2N), t'' = t − T/N (−1: the end of sampling),
    the same points as diffusers' DDIMScheduler with timestep_spacing="trailing" at 2N and N steps.
    Two teacher DDIM steps z_t → z_t' → z_t''; the x-target that makes one student DDIM step land
    on z_t'' exactly: x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t), which is x̂' when
    σ_t'' = 0. Loss: "truncated SNR" weighting (§4) max(SNR_t, 1)·‖x̂_θ − x̃‖² = max(‖x̂ − x̃‖², ‖ε̂ − ε̃‖²)
    (`snr_trunc`, the default of every google-research/diffusion_distillation config).
    """

    def __init__(self, schedule: Schedule, student_steps: int):
        total = schedule.num_train_timesteps
        if total % (2 * student_steps):
            raise ValueError(f"{total} timesteps do not split into 2x{student_steps} equal DDIM steps")
        self.schedule, self.student_steps, self.dt = schedule, student_steps, total // student_steps

    def timesteps(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = (index + 1) * self.dt - 1
        return t, t - self.dt // 2, t - self.dt

    def target(self, teacher: Denoiser, z: torch.Tensor, t, t1, t2, embeds) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha1, sigma1 = self.schedule.alpha_sigma(t1)
        alpha2, sigma2 = self.schedule.alpha_sigma(t2)
        x0, eps = teacher(z, t, embeds)
        z1 = ddim_step(x0, eps, alpha1, sigma1)
        x1, eps1 = teacher(z1, t1, embeds)
        z2 = ddim_step(x1, eps1, alpha2, sigma2)
        ratio = sigma2 / sigma
        return (z2 - ratio * z) / (alpha2 - ratio * alpha)

    def __call__(self, student: Denoiser, teacher: Denoiser, x: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator) -> dict:
        index = torch.randint(self.student_steps, (len(x),), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        t, t1, t2 = self.timesteps(index)
        alpha, sigma = self.schedule.alpha_sigma(t)
        z = alpha * x + sigma * noise
        with torch.no_grad():
            x_target = self.target(teacher, z, t, t1, t2, embeds)
        x_student, _ = student(z, t, embeds)
        weight = (alpha.square() / sigma.square()).clamp(min=1.0).flatten()
        mse = _per_sample_mse(x_student, x_target)
        return {"loss": (weight * mse).mean(), "x_mse": mse.mean().detach()}


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """The consistency parametrisation f = c_skip x + c_out x̂ (Song et al. 2023, eq. 5) in LCM's discrete
    form (diffusers' `LCMScheduler.get_scalings_for_boundary_condition_discrete`): with s = timestep_scaling·t,
    c_skip = σ_d² / (s² + σ_d²), c_out = s / sqrt(s² + σ_d²); c_skip(0) = 1, c_out(0) = 0."""
    scaled = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber metric (Song & Dhariwal 2023, iCT §3.3): sqrt(‖a − b‖² + c²) − c, elementwise as
    diffusers' LCM scripts compute it."""
    return (torch.sqrt((a.float() - b.float()).square() + c**2) - c).mean()


class ConsistencyDistillation:
    """Latent consistency distillation, LCM-LoRA form (Luo et al. 2023, Algorithm 1; Luo et al. 2023b),
    the consistency distillation loss of Song et al. 2023 (eq. 7) with a DDIM solver and CFG teacher.

    DDIM solver on K points of the teacher's T timesteps, skipping step k = T/K:
    n ~ U{0..K−1}, t_{n+k} = (n+1)·k − 1, t_n = max(t_{n+k} − k, 0);
    z = α x + σ ε at t_{n+k}; teacher (LoRA off, CFG scale g) gives ẑ_{t_n} by one DDIM step;
    f_θ(z, t) = c_skip(t) z + c_out(t) x̂_θ(z, t);
    loss d(f_θ(z_{t_{n+k}}, t_{n+k}), sg f_θ(ẑ_{t_n}, t_n)): the target is the online LoRA model
    itself (LCM-LoRA has no EMA target), d = pseudo-Huber (c = 0.001) or L2.
    """

    def __init__(self, schedule: Schedule, num_ddim_timesteps: int = 50, timestep_scaling: float = 10.0, loss_type: str = "huber", huber_c: float = 0.001):
        total = schedule.num_train_timesteps
        if total % num_ddim_timesteps:
            raise ValueError(f"{total} timesteps do not split into {num_ddim_timesteps} equal solver steps")
        self.schedule, self.k = schedule, total // num_ddim_timesteps
        self.num_ddim_timesteps, self.timestep_scaling = num_ddim_timesteps, timestep_scaling
        self.loss_type, self.huber_c = loss_type, huber_c

    def consistency_function(self, model: Denoiser, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = boundary_scalings(t, timestep_scaling=self.timestep_scaling)
        x0, _ = model(z, t, embeds)
        return c_skip * z + c_out * x0

    def __call__(self, student: Denoiser, teacher: Denoiser, x: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator) -> dict:
        index = torch.randint(self.num_ddim_timesteps, (len(x),), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        t_start = (index + 1) * self.k - 1
        t_end = (t_start - self.k).clamp(min=0)
        alpha, sigma = self.schedule.alpha_sigma(t_start)
        z = alpha * x + sigma * noise
        prediction = self.consistency_function(student, z, t_start, embeds)
        with torch.no_grad():
            x0, eps = teacher(z, t_start, embeds)
            z_prev = ddim_step(x0, eps, *self.schedule.alpha_sigma(t_end))
            target = self.consistency_function(student, z_prev, t_end, embeds)
        if self.loss_type == "huber":
            loss = pseudo_huber(prediction, target, self.huber_c)
        else:
            loss = F.mse_loss(prediction.float(), target.float())
        return {"loss": loss}


def lcm_guidance(low: float, high: float | None, batch: int, generator: torch.Generator, device=None) -> float | torch.Tensor:
    """The CFG scale of LCM's teacher: `low`, or per sample w ~ U[w_min, w_max] (Luo et al. 2023, Algorithm 1:
    ω ~ U[ω_min, ω_max], as the LCM-LoRA script `train_lcm_distill_lora_sd_wds.py` draws it)."""
    if high is None:
        return low
    return (low + (high - low) * torch.rand(batch, generator=generator)).to(device)


def _feature(output):
    """A hooked module's main output: blocks return (hidden, skips), transformers a dataclass."""
    if isinstance(output, tuple):
        output = output[0]
    return getattr(output, "sample", output)


class FeatureTaps:
    """Forward hooks that keep the outputs of named submodules (detach them on the teacher side)."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = [
            module.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: self.features.__setitem__(name, _feature(out)))
            for name in names
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ArchitecturalDistillation:
    """BK-SDM (Kim et al. 2023, §3.2), as in Nota-NetsPresso/BK-SDM `kd_train_text_to_image.py`:
    L = λ_task ‖out_S − target‖² + λ_out ‖out_S − out_T‖² + λ_feat Σ_l ‖F_S^l − F_T^l‖²
    on the same z_t, t, c for both nets (all MSE with mean reduction; λ = 1, 1, 1 in the paper).
    target is the forward process's ε (or v); t ~ U{0..T−1}.
    """

    def __init__(self, noise_scheduler, student_taps: FeatureTaps, teacher_taps: FeatureTaps, pairs: list[tuple[str, str]], lambda_task=1.0, lambda_out=1.0, lambda_feat=1.0):
        self.noise_scheduler = noise_scheduler
        self.student_taps, self.teacher_taps, self.pairs = student_taps, teacher_taps, pairs
        self.lambdas = (lambda_task, lambda_out, lambda_feat)

    def terms(self, student, teacher, x, embeds, noise, t) -> dict:
        z = self.noise_scheduler.add_noise(x, noise, t)
        with torch.no_grad():
            out_teacher = teacher(z, t, embeds).sample
        out_student = student(z, t, embeds).sample
        task = F.mse_loss(out_student.float(), target_for_scheduler(self.noise_scheduler, x, noise, t).float())
        kd_out = F.mse_loss(out_student.float(), out_teacher.float())
        kd_feat = sum(
            F.mse_loss(self.student_taps.features[s].float(), self.teacher_taps.features[t_name].detach().float()) for s, t_name in self.pairs
        )
        lambda_task, lambda_out, lambda_feat = self.lambdas
        loss = lambda_task * task + lambda_out * kd_out + lambda_feat * kd_feat
        return {"loss": loss, "task": task.detach(), "kd_out": kd_out.detach(), "kd_feat": kd_feat.detach()}

    def __call__(self, student, teacher, x: torch.Tensor, embeds: torch.Tensor, generator: torch.Generator) -> dict:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        t = torch.randint(self.noise_scheduler.config.num_train_timesteps, (len(x),), generator=generator).to(x.device)
        return self.terms(student, teacher, x, embeds, noise, t)


def target_for_scheduler(noise_scheduler, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoising target of the teacher's parametrisation (Ho et al. 2020 ε; Salimans & Ho 2022 v)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(x, noise, t)
    if prediction_type == "sample":
        return x
    return noise


# --- BK-SDM students: blocks removed from the teacher's UNet, weights copied by name ---------------

REMOVABLE = ("layer", "mid", "innermost")
# Per-down-block settings a UNet2DConditionModel config may hold as lists (down order).
_PER_BLOCK = ("block_out_channels", "layers_per_block", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "cross_attention_dim", "only_cross_attention")


def _per_block(value, stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


def student_config(teacher_config: dict, remove: list[str]) -> dict:
    """BK-SDM's removals (Kim et al. 2023, §3.1): `layer` drops one residual(+attention) pair per
    stage (BK-SDM-Base: layers_per_block 2 -> 1, so up blocks 3 -> 2), `mid` drops the mid block
    (BK-SDM-Small), `innermost` drops the innermost down and up stage (BK-SDM-Tiny). Widths stay the
    teacher's, so features compare without projectors."""
    from genadapt.errors import UserError

    config = {key: value for key, value in dict(teacher_config).items() if not key.startswith("_")}
    stages = len(config["down_block_types"])
    if "layer" in remove:
        layers = _per_block(config["layers_per_block"], stages)
        if min(layers) < 2:
            raise UserError(f"--remove-blocks layer: the teacher has layers_per_block={config['layers_per_block']}; a stage needs 2 pairs to lose one (use mid, innermost)")
        config["layers_per_block"] = [n - 1 for n in layers] if isinstance(config["layers_per_block"], (list, tuple)) else layers[0] - 1
    if "mid" in remove:
        if config.get("mid_block_type") is None:
            raise UserError("--remove-blocks mid: the teacher has no mid block")
        config["mid_block_type"] = None
    if "innermost" in remove:
        if stages < 2:
            raise UserError("--remove-blocks innermost: the teacher has a single stage")
        config["down_block_types"] = list(config["down_block_types"])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        for key in _PER_BLOCK:
            if isinstance(config.get(key), (list, tuple)) and len(config[key]) == stages:
                config[key] = list(config[key])[:-1]
        if isinstance(config.get("reverse_transformer_layers_per_block"), (list, tuple)):
            config["reverse_transformer_layers_per_block"] = list(config["reverse_transformer_layers_per_block"])[1:]
    return config


def _up_layers(config: dict) -> list[int]:
    """Residual blocks per up stage: diffusers gives each up stage layers_per_block + 1."""
    stages = len(config["down_block_types"])
    return [n + 1 for n in reversed(_per_block(config["layers_per_block"], stages))]


def teacher_name(name: str, student: dict, teacher: dict) -> str:
    """The teacher tensor a student tensor starts from, as BK-SDM's `copy_weight_from_teacher`:
    down stages and the first pairs of each up stage by identity; an up stage's last pair from
    the teacher's last pair (it consumes the skip from the stage below); with the innermost stage
    removed, student up stage j is teacher up stage j + 1."""
    parts = name.split(".")
    if parts[0] != "up_blocks":
        return name
    shift = len(teacher["up_block_types"]) - len(student["up_block_types"])
    stage = int(parts[1])
    parts[1] = str(stage + shift)
    if len(parts) > 3 and parts[2] in ("resnets", "attentions"):
        index, n_student, n_teacher = int(parts[3]), _up_layers(student)[stage], _up_layers(teacher)[stage + shift]
        parts[3] = str(index if index < n_student - 1 else n_teacher - 1)
    return ".".join(parts)


def init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, list[str]]:
    """Copy every teacher tensor whose mapped name and shape match; report what stayed fresh."""
    mapping = {}
    teacher_state = teacher.state_dict()
    copied, fresh = [], []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = teacher_name(name, dict(student.config), dict(teacher.config))
            if source in teacher_state and teacher_state[source].shape == tensor.shape:
                tensor.copy_(teacher_state[source])
                copied.append(name)
                mapping[name] = source
            else:
                fresh.append(name)
    return {"copied": copied, "fresh": fresh, "mapping": mapping}


def build_student_unet(teacher_unet, remove: list[str], seed: int = 0):
    """The BK-SDM student for `remove`, with the teacher's matching tensors copied in."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # the tensors that stay fresh get diffusers' initialisation
    student = UNet2DConditionModel.from_config(student_config(teacher_unet.config, remove))
    init = init_from_teacher(student, teacher_unet)
    return student, init


def feature_pairs(student: torch.nn.Module, teacher: torch.nn.Module) -> list[tuple[str, str]]:
    """BK-SDM's feature-KD taps: the output of every down and up stage (student name, teacher name).
    A down stage that lost its downsampler (the new last stage) is tapped at its last layer, as
    BK-SDM-Tiny taps `down_blocks.2.attentions.{1|0}.proj_out`."""
    student_config_, teacher_config = dict(student.config), dict(teacher.config)
    pairs = []
    for index, block in enumerate(student.down_blocks):
        teacher_block = teacher.down_blocks[index]
        if (block.downsamplers is None) == (teacher_block.downsamplers is None):
            pairs.append((f"down_blocks.{index}", f"down_blocks.{index}"))
            continue
        kind = "attentions" if getattr(block, "attentions", None) else "resnets"
        last_student, last_teacher = len(getattr(block, kind)) - 1, len(getattr(teacher_block, kind)) - 1
        suffix = ".proj_out" if kind == "attentions" else ""
        pairs.append((f"down_blocks.{index}.{kind}.{last_student}{suffix}", f"down_blocks.{index}.{kind}.{last_teacher}{suffix}"))
    for index in range(len(student.up_blocks)):
        pairs.append((f"up_blocks.{index}", teacher_name(f"up_blocks.{index}", student_config_, teacher_config)))
    return pairs


# --- GAN Compression: a narrower StyleGAN2 generator that imitates its teacher -----------------------


def student_channels(channels: dict[int, int], width: float, size: int) -> dict[int, int]:
    """`round(width · channels)` (at least 1) at every synthesis resolution up to `size`."""
    return {res: max(1, round(ch * width)) for res, ch in sorted(channels.items()) if res <= size}


def slice_init(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Each student tensor = the teacher's tensor cut to the student's shape (leading channels), as
    GAN Compression's sub-networks share a once-for-all supernet's leading channels (Li et al. CVPR 2020)."""
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for key, value in student.state_dict().items():
            source = teacher_state[key]
            value.copy_(source[tuple(slice(0, n) for n in value.shape)])


def build_student_generator(teacher, width: float):
    """(student, its Generator kwargs): the teacher's resolution, style_dim and mapping network, every
    synthesis resolution `width` times as wide, initialised by `slice_init`."""
    from genadapt.families.stylegan2_nets import Generator

    kwargs = {
        "size": teacher.size,
        "style_dim": teacher.style_dim,
        "n_mlp": len(teacher.style) - 1,
        "lr_mlp": teacher.style[1].lr_mul,
        "channels": student_channels(teacher.channels, width, teacher.size),
    }
    student = Generator(**kwargs)
    slice_init(student, teacher)
    return student, kwargs


def gan_compression_adapters(student, teacher) -> torch.nn.ModuleList:
    """GAN Compression's f_l (Li et al. CVPR 2020, §3.1): one learnable 1×1 conv per feature layer, student
    channels -> teacher channels, trained with the student and dropped after training."""
    return torch.nn.ModuleList(
        torch.nn.Conv2d(cs, ct, 1) for (cs, _), (ct, _) in zip(student.feature_shapes(), teacher.feature_shapes())
    )


class GANCompressionDistillation:
    """GAN Compression (Li et al. CVPR 2020, §3.1) without its GAN term, for StyleGAN2:
    L = λ_out ‖G_S(z, n) − G_T(z, n)‖₁ + λ_feat Σ_l ‖f_l(A_S,l) − A_T,l‖²
    on the same style-mixed z and per-layer noise n for both generators; A_l are the activations
    `Generator.forward(..., return_features=True)` returns (conv1, then every synthesis conv), f_l the
    1×1 adapters (`gan_compression_adapters`). L1 and MSE with mean reduction. λ_out and λ_feat are the
    paper's λ_recon and λ_distill; its λ_gan·L_GAN needs real images and a discriminator, so it is left out.
    """

    def __init__(self, adapters: torch.nn.ModuleList, lambda_out: float = 1.0, lambda_feat: float = 1.0):
        self.adapters, self.lambda_out, self.lambda_feat = adapters, lambda_out, lambda_feat

    def __call__(self, student, teacher, styles, inject_index, noise) -> dict:
        with torch.no_grad():
            target, _, target_feats = teacher(styles, inject_index=inject_index, noise=noise, return_features=True)
        image, _, feats = student(styles, inject_index=inject_index, noise=noise, return_features=True)
        pixel = F.l1_loss(image, target)
        feat = sum(F.mse_loss(adapter(f), t) for adapter, f, t in zip(self.adapters, feats, target_feats))
        return {"loss": self.lambda_out * pixel + self.lambda_feat * feat, "pixel_l1": pixel, "feature_mse": feat}
