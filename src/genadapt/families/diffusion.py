"""The diffusion family: load a Stable Diffusion-shaped pipeline, compute its training loss, sample, save.

Works on pocket-sd, any diffusers `StableDiffusionPipeline` folder, or a hub id (downloaded by
diffusers only if the user names one; nothing here downloads on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from genadapt.errors import UserError

FAMILY = "diffusion"


@dataclass
class DiffusionModel:
    pipeline: object  # diffusers.StableDiffusionPipeline
    base: str
    noise_scheduler: object  # DDPMScheduler with the pipeline's training schedule
    family: str = FAMILY
    extras: dict = field(default_factory=dict)  # technique state (added tokens, adapter names...)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.pipeline.vae_scale_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        """The adaptable modules, by the prefix their parameter names carry (`unet.`, `text_encoder.`)."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def named_parameters(self):
        for prefix, module in self.modules().items():
            for name, parameter in module.named_parameters():
                yield f"{prefix}.{name}", parameter


def resolve_base(base: str) -> str:
    if base == "pocket-sd":
        from genadapt.zoo import weights_dir

        return str(weights_dir("pocket-sd"))
    path = Path(base)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--base {base}: not a diffusers pipeline folder (no model_index.json); pass a folder saved with save_pretrained")
        return str(path)
    return base  # a hub id: diffusers resolves it (from its cache when offline)


def load(base: str, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    """A frozen pipeline (every parameter requires_grad=False); techniques decide what trains."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    location = resolve_base(base)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            location, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--base {base}: cannot load a Stable Diffusion pipeline ({first}); pass pocket-sd, a pipeline folder or a hub id you have access to") from None
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        module.requires_grad_(False)
        module.eval()
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    return DiffusionModel(pipeline=pipeline, base=base, noise_scheduler=noise_scheduler)


def encode_images(model: DiffusionModel, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of a fixed image set, computed once; latents are sampled per step."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(batch_size):
            posterior = model.vae.encode(chunk.to(model.vae.device, model.vae.dtype)).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    # Plain NCHW: the VAE can hand back channels-last strides, and torch 2.13's CPU GroupNorm
    # backward crashes on channels-last input when only later layers train.
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def tokenize(model: DiffusionModel, captions: list[str]) -> torch.Tensor:
    return model.tokenizer(
        captions, padding="max_length", max_length=model.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_text(model: DiffusionModel, token_ids: torch.Tensor) -> torch.Tensor:
    return model.text_encoder(token_ids.to(model.text_encoder.device))[0]


def add_noise(model: DiffusionModel, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None):
    """Forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): returns noisy latents, noise, timesteps."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    return model.noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def target_for(model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = model.noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return model.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction")


def predicted_x0(model: DiffusionModel, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x̂_0 from the model output (eq. 15 of Ho et al. for eps; Salimans & Ho 2022 for v)."""
    alphas = model.noise_scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


def denoise_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Simple diffusion loss, Ho et al. 2020 eq. 14: E ||target - model(x_t, t, c)||²."""
    return F.mse_loss(prediction.float(), target.float())


def sample(
    model: DiffusionModel,
    prompts: list[str],
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    negative_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """NCHW images in [-1, 1], one per prompt, deterministic by seed (DDIM unless the pipeline says otherwise)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    images = []
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in tqdm(chunks, desc="sampling", disable=not progress, unit="batch"):
        with torch.no_grad():
            result = model.pipeline(
                chunk,
                num_inference_steps=steps,
                guidance_scale=guidance,
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                generator=generator,
                output_type="pt",
            )
        images.append(result.images.float().mul(2).sub(1))
    return torch.cat(images)


def save_pipeline(model: DiffusionModel, out: Path) -> Path:
    """A diffusers pipeline folder (atomic: written beside, then renamed)."""
    import os
    import shutil

    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.pipeline.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out
