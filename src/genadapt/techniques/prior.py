"""DreamBooth prior preservation (Ruiz et al. 2023, eq. 2): λ E‖ε' − ε_θ(x'_t, t', c_pr)‖² on class images
the source model generates before the first step."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from genadapt.config import setting
from genadapt.families import diffusion
from genadapt.techniques import Implementation, Step, Technique, register


class PriorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prior_prompt: str | None = setting(None, "--loss prior: prompt for the class images.  [default: --caption, else the first caption]", aliases=("--class-prompt",))
    num_class_images: int = setting(50, "--loss prior: class images the source generates.", ge=1)


class PriorPreservation:
    name = "prior"

    def __init__(self, settings: PriorSettings):
        self.settings = settings

    def prepare(self, model, images, config) -> None:
        from genadapt.grid import save_grid

        prompt = self.settings.prior_prompt or config.caption or (images.captions[0] if images.captions[0] else "")
        prompts = [prompt] * self.settings.num_class_images
        with torch.no_grad():
            class_images = diffusion.sample(model, prompts, steps=config.sample_steps, guidance=config.guidance_scale, seed=config.seed + 1)
            self.latents_mean, self.latents_std = diffusion.encode_images(model, class_images)
            self.text = diffusion.encode_text(model, diffusion.tokenize(model, [prompt]))
        self.scale = model.vae.config.scaling_factor
        save_grid(class_images, config.out / "class_images.png", scale=2)

    def loss(self, step: Step) -> dict[str, torch.Tensor]:
        model, generator = step.model, step.generator
        index = torch.randint(len(self.latents_mean), (len(step.batch["latents"]),), generator=generator)
        noise = torch.randn(self.latents_mean[index].shape, generator=generator)
        latents = (self.latents_mean[index] + self.latents_std[index] * noise) * self.scale
        noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
        prediction = diffusion.predict(model, model.unet, noisy, timesteps, self.text.expand(len(latents)))
        return {"prior": diffusion.denoise_loss(prediction, diffusion.target_for(model, latents, noise, timesteps))}


register(Technique(
    name="prior",
    kind="loss",
    summary="DreamBooth prior preservation on class images the source generates",
    families={"diffusion": Implementation(
        build=PriorPreservation, settings=PriorSettings, default_weight=1.0,
        compare={"train": "full", "loss": ["prior"], "num_class_images": 16, "learning_rate": 1e-4},
    )},
))
